"""Accuracy and memory of the Lanczos basis in float32 against float64, at any size.

    python benchmarks/lanczos_precision.py --size 52546438 --device cuda   # the CIFAR-10 model's P
    python benchmarks/lanczos_precision.py --size 1000000                  # CPU

H = R·diag(d)·R with R = I − 2uuᵀ (a random Householder reflection, so no axis is special) has
the known eigenvalues d: −9, 8.9, a triple 3 and a bulk uniform in [−2, 2]. Products cost O(P)
and are computed in the vectors' dtype, as a float32 model's Hessian-vector products are.
For each variant: the top-3 eigenvalues by `top_eigenpairs` (100 iterations, `--tolerance`,
by default recipes/fig4_hessian_cifar10_dm.yaml's 1e-3), their largest relative error, the
alignment of the top eigenvector, the loss of orthogonality max|QᵀQ − I| of one 80-step SLQ
basis, and the peak device memory beside the formula of dmstab.analysis.hessian_memory.
Variants: float64 (the basis before), float32 with float64 inner products (dmstab's), and
float32 with float32 inner products (what a plain `basis @ w` gives). Report the lines in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

import dmstab.analysis.hessian as hessian
from dmstab.analysis.hessian import VectorSpace, inner_products, top_eigenpairs
from dmstab.analysis.hessian_memory import WORK_VECTORS

TOP = [-9.0, 8.9, 3.0]


def householder_problem(size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bulk = torch.rand(size - 5, generator=generator, dtype=torch.float64) * 4 - 2
    d = torch.cat([torch.tensor([-9.0, 8.9, 3.0, 3.0, 3.0], dtype=torch.float64), bulk])
    u = torch.randn(size, generator=generator, dtype=torch.float64)
    return d, u / u.norm()


def operator(d: Tensor, u: Tensor) -> Callable[[Tensor], Tensor]:
    def product(v: Tensor) -> Tensor:
        reflected = v - 2 * (u @ v) * u
        scaled = d * reflected
        return scaled - 2 * (u @ scaled) * u

    return product


@contextmanager
def float32_sums() -> Iterator[None]:
    """Inner products accumulated in the basis's float32 (a plain matrix-vector product)."""
    hessian.inner_products = lambda rows, vector: (rows @ vector).double()  # type: ignore[assignment]
    try:
        yield
    finally:
        hessian.inner_products = inner_products


def orthogonality(basis: Tensor) -> float:
    """max |QᵀQ − I| over the basis rows, every dot product summed in float64."""
    gram = torch.stack([inner_products(basis, row) for row in basis])
    return float(
        (gram - torch.eye(len(basis), dtype=torch.float64, device=gram.device)).abs().max()
    )


def measure(
    name: str, size: int, dtype: torch.dtype, device: torch.device, tolerance: float
) -> None:
    d, u = householder_problem(size)
    d, u = d.to(device, dtype), u.to(device, dtype)
    space = VectorSpace(dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    found = top_eigenpairs(
        operator(d, u), size, 3, iterations=100, tol=tolerance,
        generator=torch.Generator().manual_seed(2), space=space,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    error = max(abs(a - b) / abs(b) for a, b in zip(found.values, TOP, strict=True))
    first = torch.zeros(size, dtype=dtype, device=device)
    first[0] = 1
    eigenvector = first - 2 * u[0] * u  # R·e_1, the eigenvector of −9
    alignment = 1 - abs(hessian.dot(found.vectors[0], eigenvector))
    del found, first, eigenvector
    krylov = hessian._Lanczos(
        operator(d, u), space.normal(size, torch.Generator().manual_seed(4)), 80
    )
    for _ in range(80):
        krylov.step()
    loss = orthogonality(krylov.basis[: krylov.filled])
    del krylov
    entry = torch.finfo(dtype).bits // 8
    formula = (100 + 3 + WORK_VECTORS) * size * entry + 2 * hessian.SCRATCH_ELEMENTS * 8
    memory = (
        f"peak {peak / 1e9:.2f} GB beside (100 + 3 + {WORK_VECTORS})·P·{entry} B + scratch = "
        f"{formula / 1e9:.2f} GB"
        if peak
        else "peak not measured on the CPU"
    )
    print(
        f"{name:<34} P={size:,}  top-3 max rel. error {error:.1e}  1−|v1·q1| {alignment:.1e}  "
        f"max|QᵀQ−I| (80 steps) {loss:.1e}  top-3 in {seconds:.0f} s  {memory}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="the recipe's: 1e-3")
    parser.add_argument("--skip-float64", action="store_true", help="P·8·103 B may not fit")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}")
    print(f"tolerance {args.tolerance:g}")
    measure("float32, float64 sums (dmstab)", args.size, torch.float32, device, args.tolerance)
    with float32_sums():
        measure("float32, float32 sums", args.size, torch.float32, device, args.tolerance)
    if not args.skip_float64:
        measure("float64 (the basis before)", args.size, torch.float64, device, args.tolerance)


if __name__ == "__main__":
    main()
