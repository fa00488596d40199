"""How much memory `dmstab hessian` needs, before it runs (`dmstab hessian RECIPE --dry-run`).

The spectrum (dmstab.analysis.spectrum.spectrum) holds, on the model's device, at its largest:

- one Lanczos basis, a preallocated (m, P) tensor of vectors in the parameters' dtype (float32
  for a float32 model): m = min(max_iterations, P) for the first of the top-k eigenvalues,
  m = min(lanczos_steps, P) for an SLQ run; one basis exists at a time,
- beside the top-k bases, the k eigenvectors being found, (k, P); they go to the host before
  the SLQ runs start,
- `WORK_VECTORS` vectors of P: inside a Hessian-vector product the deflated direction, the
  parameters' copy (double backward) or nothing (forward-over-reverse), the gradient, its
  derivative and the flattened product; around it the temporaries of the reorthogonalisation,
- the float64 scratch of the inner products: a chunk of the basis widened to float64 and the
  vector's chunk, each at most `SCRATCH_ELEMENTS` entries (fewer on the CPU),
- the model's parameters and buffers (a GAN's two networks).

So the vector part peaks at (max(min(I, P) + min(k, P), min(S, P)) + 5)·P·b bytes for
I = max_iterations, S = lanczos_steps, k = top_k and b bytes per entry. Not included: the
activations of a Hessian-vector product (they grow with hessian.batch_size), the CUDA context
and the allocator's cache. Forward-over-reverse keeps a forward pass's activations, their
tangents and the backward pass's during each product. Double backward builds the gradient's
graph once (a forward pass's activations and those of the first backward with create_graph,
about what one such product held before) at the first product and keeps it, between products
too, until the spectrum ends; each product adds the second backward's temporaries.

On the host: every loss's eigenvectors until they are saved (losses·k·P·4 bytes) and one
float64 random vector being drawn (P·8 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dmstab.analysis.hessian import SCRATCH_ELEMENTS
from dmstab.analysis.spectrum import HessianConfig

WORK_VECTORS = 5
EIGENVECTOR_BYTES = 4  # the spectrum keeps its eigenvectors as float32


@dataclass(frozen=True)
class HessianMemory:
    """The peak bytes of one Hessian spectrum, by what holds them."""

    parameters: int  # P: the moving network's trainable parameters
    entry_bytes: int  # bytes per vector entry: the parameters' dtype, at least float32
    basis_rows: int  # Lanczos basis rows, with the top-k eigenvectors beside the top-k bases
    basis: int
    work: int
    scratch: int
    model: int  # parameters and buffers of every network the analysis holds
    host: int  # eigenvectors of every loss, and one float64 random draw

    @property
    def device(self) -> int:
        """Everything on the model's device but activations."""
        return self.basis + self.work + self.scratch + self.model

    def lines(self) -> list[str]:
        """The estimate as the dry run prints it, one part a line."""
        b = self.entry_bytes
        parts = [
            ("Lanczos basis and top-k eigenvectors", f"{self.basis_rows} × P × {b} B", self.basis),
            ("work vectors", f"{WORK_VECTORS} × P × {b} B", self.work),
            ("float64 scratch of inner products", "", self.scratch),
            ("model parameters and buffers", "", self.model),
            ("device total (activations not included)", "", self.device),
            ("host: every loss's eigenvectors", "", self.host),
        ]
        return [f"  {name:<40} {size:>16} {_gigabytes(count):>10}" for name, size, count in parts]


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB"


def hessian_memory(
    config: HessianConfig, moving: nn.Module, fixed: tuple[nn.Module, ...] = (), losses: int = 1
) -> HessianMemory:
    """The peak memory of `losses` spectra of the Hessian over `moving`'s trainable parameters,
    with `fixed` networks held too (a GAN's other one). The modules may live on the meta device:
    only their shapes and dtypes are read."""
    trainable = [p for p in moving.parameters() if p.requires_grad]
    size = sum(p.numel() for p in trainable)
    dtype = torch.float32
    for p in trainable:
        dtype = torch.promote_types(dtype, p.dtype)
    entry = torch.empty((), dtype=dtype).element_size()
    k = min(config.top_k, size)
    rows = max(min(config.max_iterations, size) + k, min(config.lanczos_steps, size))
    held = [t for module in (moving, *fixed) for t in (*module.parameters(), *module.buffers())]
    return HessianMemory(
        parameters=size,
        entry_bytes=entry,
        basis_rows=rows,
        basis=rows * size * entry,
        work=WORK_VECTORS * size * entry,
        scratch=8 * (min(SCRATCH_ELEMENTS, rows * size) + min(SCRATCH_ELEMENTS, size)),
        model=sum(t.numel() * t.element_size() for t in held),
        host=losses * k * size * EIGENVECTOR_BYTES + size * 8,
    )
