"""The Hessian of a training loss, seen only through Hessian-vector products (AAAI Fig. 4).

The loss is a deterministic function of the parameters θ (a fixed batch, fixed noise and fixed
timesteps), so H = ∇²L(θ) is a fixed symmetric matrix; nothing here ever forms it. Products
H·v come from forward-over-reverse differentiation (torch.func.jvp of torch.func.grad) or from
double backward, and feed:

- the top eigenpairs by Lanczos with deflation: one Lanczos run per eigenvalue on H with the
  eigenvectors already found projected out, stopped when the Ritz pair's residual
  ‖Hx − θx‖ = β_m·|e_mᵀy| falls below `tol`·|θ| (Golub & Van Loan §10.1). PyHessian's power
  iteration stops early when the top two magnitudes are close (an indefinite GAN Hessian's ±λ):
  Lanczos converges in far fewer products and deflation keeps repeated eigenvalues,
- the trace by Hutchinson's estimator, E[zᵀHz] = tr H for Rademacher z, with its standard error,
- the spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): Lanczos with
  full reorthogonalisation from random unit vectors; the Ritz values are the nodes and the
  squared first components of the Ritz vectors their weights. On a grid, the nodes are
  broadened by Gaussians as PyHessian does (`SpectralDensity.broadened`).

Vectors are flat tensors over all parameters (in `named_parameters` order) in a `VectorSpace`:
for a model, its parameters' device and dtype (float32 for a float32 model), so products never
leave the device. A Lanczos basis is one preallocated (steps, P) tensor; every inner product
(α, β, the reorthogonalisation coefficients) is summed in float64, chunk by chunk, so a float32
basis loses only float32 rounding of the vectors themselves (docs/performance.md).

Under `torchrun` each rank's `loss` is its share of a sharded batch (dmstab.analysis.fixed_batch)
and the operator adds the ranks' products on the model's device (NCCL or gloo), so every rank
holds the same H·v and runs the same iterations on the same vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from dmstab.distributed import SINGLE_PROCESS, DistributedContext

Loss = Callable[[nn.Module], Tensor]  # the model -> a scalar loss on fixed data
Method = Literal["forward_over_reverse", "double_backward"]

# float64 scratch per chunk of a (rows, P) × P product: on a GPU 2**24 elements (128 MiB, few
# kernel launches); on the CPU 2**18 (2 MiB, within its caches: 2× faster than 2**22 there).
SCRATCH_ELEMENTS = 1 << 24
HOST_SCRATCH_ELEMENTS = 1 << 18
HOST = torch.device("cpu")


@dataclass(frozen=True)
class VectorSpace:
    """Where flat parameter vectors live and their precision. Random vectors are drawn on the
    host from the caller's generator in float64 (the same numbers on every device) and moved
    once per Lanczos run or Hutchinson probe, never per product."""

    dtype: torch.dtype = torch.float64
    device: torch.device = HOST

    def empty(self, rows: int, size: int) -> Tensor:
        return torch.empty(rows, size, dtype=self.dtype, device=self.device)

    def normal(self, size: int, generator: torch.Generator) -> Tensor:
        drawn = torch.randn(size, generator=generator, dtype=torch.float64)
        return drawn.to(self.device, self.dtype)

    def rademacher(self, size: int, generator: torch.Generator) -> Tensor:
        # int8 draws consume the generator as float64 ones do: the same ±1, an eighth the bytes.
        bits = torch.randint(0, 2, (size,), generator=generator, dtype=torch.int8)
        return bits.to(self.device, self.dtype) * 2 - 1


def inner_products(rows: Tensor, vector: Tensor) -> Tensor:
    """rows @ vector as float64, each dot product summed in float64: float32 rows are widened
    one chunk of columns at a time (at most `SCRATCH_ELEMENTS` of scratch), so no (rows, P)
    float64 copy is ever made."""
    if rows.dtype == torch.float64 and vector.dtype == torch.float64:
        return rows @ vector
    count, size = rows.shape
    scratch = HOST_SCRATCH_ELEMENTS if rows.device.type == "cpu" else SCRATCH_ELEMENTS
    width = max(1, scratch // max(count, 1))
    total = torch.zeros(count, dtype=torch.float64, device=rows.device)
    for start in range(0, size, width):
        chunk = slice(start, start + width)
        total += rows[:, chunk].double() @ vector[chunk].double()
    return total


def dot(first: Tensor, second: Tensor) -> float:
    """first · second, summed in float64."""
    return float(inner_products(first[None], second)[0])


def _unit(vector: Tensor) -> Tensor:
    return vector / math.sqrt(dot(vector, vector))


def _project_out(rows: Tensor, vector: Tensor) -> Tensor:
    """vector − RᵀR·vector for orthonormal rows R: the component orthogonal to them (classical
    Gram–Schmidt with float64 coefficients)."""
    if len(rows) == 0:
        return vector
    return vector - rows.T @ inner_products(rows, vector).to(vector.dtype)


class HessianOperator:
    """v ↦ H·v for the Hessian of `loss(model)` with respect to the model's parameters; under
    `context` the sum over ranks of each rank's H·v (its `loss` is its share of the batch)."""

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        method: Method = "forward_over_reverse",
        context: DistributedContext = SINGLE_PROCESS,
    ):
        self.model = model
        self.loss = loss
        self.method = method
        self.context = context
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shapes = [params[name].shape for name in self.names]
        self.point = {name: params[name].detach() for name in self.names}
        self.size = sum(math.prod(shape) for shape in self.shapes)
        first = self.point[self.names[0]]
        dtype = torch.float32
        for value in self.point.values():
            dtype = torch.promote_types(dtype, value.dtype)
        # The vectors: the parameters' device, their dtype but at least float32 (bf16 weights
        # would make the Lanczos basis useless).
        self.space = VectorSpace(dtype, first.device)
        # Double backward's kept graph: the parameters' copies it differentiates with respect to
        # and the loss's gradient at them, built by the first product (`_double_backward`).
        self._leaves: list[Tensor] = []
        self._gradient: tuple[Tensor, ...] | None = None

    def _unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(vector, [math.prod(shape) for shape in self.shapes])
        return {
            name: piece.reshape(shape).to(self.point[name].device, self.point[name].dtype)
            for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def _loss_at(self, params: Mapping[str, Tensor]) -> Tensor:
        # functional_call swaps the parameters in for one call, so `loss` sees the model itself,
        # methods and type included (the EDM objective calls the denoiser's `logvar`).
        named = {f"model.{name}": value for name, value in params.items()}
        loss: Tensor = functional_call(_LossOf(self.model, self.loss), named, ())
        return loss

    def __call__(self, vector: Tensor) -> Tensor:
        """H·vector, returned on the vector's device in its dtype: no copy when the vector is in
        `space` (a host vector for a CUDA model makes one round trip)."""
        direction = self._unflatten(vector)
        if self.method == "forward_over_reverse":
            gradient = grad(self._loss_at)
            product = jvp(gradient, (self.point,), (direction,))[1]
        else:
            product = self._double_backward(direction)
        flat = torch.cat([product[name].reshape(-1) for name in self.names])
        if self.context.active:  # on the model's device: NCCL reduces CUDA tensors only
            flat = self.context.all_reduce_sum(flat)
        return flat.to(vector.device, vector.dtype)  # back beside the caller's vectors

    def _double_backward(self, direction: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """H·direction as the vector-Jacobian product of the gradient g = ∇L(θ): since H = ∂g/∂θ
        is symmetric, (∂g/∂θ)ᵀ·v = H·v. The gradient's graph (one forward and one backward with
        create_graph) is built at the operator's point on the first product and kept, so each
        product is one backward through it, as PyHessian does; it lives as long as the operator."""
        if self._gradient is None:
            self._leaves = [self.point[name].clone().requires_grad_(True) for name in self.names]
            loss = self._loss_at(dict(zip(self.names, self._leaves, strict=True)))
            self._gradient = torch.autograd.grad(loss, self._leaves, create_graph=True)
        # A gradient entry that does not depend on θ (a loss linear in it) has no graph and adds
        # nothing to the product.
        pairs = [
            (g, direction[name])
            for g, name in zip(self._gradient, self.names, strict=True)
            if g.requires_grad
        ]
        second = torch.autograd.grad(
            [g for g, _ in pairs],
            self._leaves,
            grad_outputs=[v for _, v in pairs],
            retain_graph=True,
        )
        return dict(zip(self.names, second, strict=True))


class _LossOf(nn.Module):
    """`loss(model)` as a module, so that torch.func.functional_call can evaluate it with other
    values in place of the model's parameters."""

    def __init__(self, model: nn.Module, loss: Loss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self) -> Tensor:
        return self.loss(self.model)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class Eigenpairs:
    """Eigenvalues of largest magnitude, largest first, and their unit eigenvectors (rows)."""

    values: list[float]
    vectors: Tensor  # (k, size), row i belongs to values[i]


def top_eigenpairs(
    operator: Callable[[Tensor], Tensor],
    size: int,
    k: int,
    *,
    iterations: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator,
    space: VectorSpace = VectorSpace(),
) -> Eigenpairs:
    """The k eigenpairs of largest magnitude, largest first: for each, at most `iterations`
    Lanczos steps on H with the eigenvectors already found projected out (deflation), until the
    largest-magnitude Ritz pair's residual is below `tol`·|θ|. The vectors are the unit Ritz
    vectors (in `space`), each orthogonal to those found before it (up to rounding)."""
    count = min(k, size)
    found = space.empty(count, size)  # row j: the j-th eigenvector found
    eigenvalues: list[float] = []
    for j in range(count):
        steps = min(iterations, size - j)
        value, found[j] = _deflated_top_pair(  # the start vector is the callee's alone
            operator, found[:j], space.normal(size, generator), steps, tol
        )
        eigenvalues.append(value)
    order = sorted(range(count), key=lambda i: abs(eigenvalues[i]), reverse=True)
    return Eigenpairs([eigenvalues[i] for i in order], found[order])


def _deflated_top_pair(
    operator: Callable[[Tensor], Tensor], found: Tensor, start: Tensor, steps: int, tol: float
) -> tuple[float, Tensor]:
    """The largest-magnitude Ritz pair of at most `steps` Lanczos steps on H restricted to the
    complement of `found`'s rows. Its basis lives only in this call, so one basis exists at a
    time (`dmstab.analysis.hessian_memory`)."""

    def deflated(v: Tensor) -> Tensor:
        return _project_out(found, operator(_project_out(found, v)))

    krylov = _Lanczos(deflated, _project_out(found, start), steps)
    del start  # q_1 is in the basis: one vector less while the run lasts
    for _ in range(steps):
        krylov.step()
        values, vectors = krylov.ritz()
        top = int(values.abs().argmax())
        if krylov.residual(vectors[:, top]) <= tol * abs(float(values[top])):
            break
    return float(values[top]), _unit(krylov.ritz_vector(vectors[:, top]))


@dataclass(frozen=True)
class TraceEstimate:
    mean: float
    standard_error: float
    samples: int


def hutchinson_trace(
    operator: Callable[[Tensor], Tensor],
    size: int,
    samples: int,
    *,
    generator: torch.Generator,
    space: VectorSpace = VectorSpace(),
) -> TraceEstimate:
    """tr H ≈ mean of zᵀHz over Rademacher z (Hutchinson 1989), with its standard error."""
    if samples < 2:
        raise ValueError("Hutchinson's estimate needs at least 2 samples for its error")
    values = []
    for _ in range(samples):
        z = space.rademacher(size, generator)
        values.append(dot(z, operator(z)))
    estimates = torch.tensor(values, dtype=torch.float64)
    return TraceEstimate(
        float(estimates.mean()), float(estimates.std() / math.sqrt(samples)), samples
    )


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: per run, Ritz values (nodes) and weights summing to 1."""

    nodes: Tensor  # (runs, steps)
    weights: Tensor  # (runs, steps)

    def moment(self, power: int) -> float:
        """∫ λ^power dμ ≈ (1/n)·tr(H^power), averaged over runs."""
        return float((self.weights * self.nodes**power).sum(dim=1).mean())

    def variance(self) -> float:
        return self.moment(2) - self.moment(1) ** 2

    def broadened(self, sigma_squared: float) -> BroadenedDensity:
        """PyHessian's Gaussian-broadened density (`density_generate` in its density_plot.py):
        on `DENSITY_BINS` points from the runs' mean smallest node − `DENSITY_OVERHEAD` to their
        mean largest node + `DENSITY_OVERHEAD`, each run's Σ_j w_j·N(x; λ_j, v) with the kernel
        variance v = σ²·max(1, grid range), averaged over runs and rescaled so that its sum
        times the bin width is 1. Padding of a run cut short (weight 0) is no node."""
        real = self.weights > 0
        largest = torch.where(real, self.nodes, -math.inf).amax(dim=1).mean()
        smallest = torch.where(real, self.nodes, math.inf).amin(dim=1).mean()
        grid = torch.linspace(
            float(smallest) - DENSITY_OVERHEAD,
            float(largest) + DENSITY_OVERHEAD,
            DENSITY_BINS,
            dtype=torch.float64,
        )
        variance = sigma_squared * max(1.0, float(grid[-1] - grid[0]))
        density = torch.zeros_like(grid)
        for nodes, weights in zip(self.nodes, self.weights, strict=True):  # one run at a time
            kernel = torch.exp(-((grid[None, :] - nodes[:, None]) ** 2) / (2 * variance))
            density += weights @ kernel / math.sqrt(2 * math.pi * variance)
        density /= len(self.nodes)
        density /= float(density.sum()) * float(grid[1] - grid[0])
        return BroadenedDensity(grid, density, variance)


# PyHessian's `density_generate` defaults: grid points and the margin beyond the extreme nodes.
DENSITY_BINS = 10_000
DENSITY_OVERHEAD = 0.01


@dataclass(frozen=True, eq=False)
class BroadenedDensity:
    """A spectral density on a grid: `density[i]` at `grid[i]`, Σ density·Δx = 1, from
    Gaussians of variance `kernel_variance`."""

    grid: Tensor  # (DENSITY_BINS,)
    density: Tensor  # (DENSITY_BINS,)
    kernel_variance: float


class _Lanczos:
    """Lanczos iterations with full reorthogonalisation, one step at a time: an orthonormal
    Krylov basis q_1..q_m, preallocated as one (capacity, P) tensor in the start vector's dtype
    and device, and the tridiagonal T = QᵀHQ with diagonal α and off-diagonal β (float64)."""

    def __init__(self, operator: Callable[[Tensor], Tensor], start: Tensor, capacity: int) -> None:
        self.operator = operator
        self.basis = start.new_empty((capacity, start.numel()))
        self.basis[0] = _unit(start)
        self.filled = 1  # rows of `basis` holding q_1..q_filled
        self.alphas: list[float] = []
        self.betas: list[float] = []  # β_j couples q_j and q_{j+1}; the last one is the residual's
        self.exhausted = False  # the Krylov space is invariant: T's eigenvalues are exact

    def step(self) -> None:
        """One product H·q_j, its α_j, β_j and (while there is room) q_{j+1}."""
        assert len(self.alphas) < self.filled, "the basis holds `capacity` steps"
        q = self.basis[len(self.alphas)]
        w = self.operator(q)
        self.alphas.append(dot(q, w))
        used = self.basis[: self.filled]
        w = _project_out(used, _project_out(used, w))  # full reorthogonalisation, twice is enough
        beta = math.sqrt(dot(w, w))
        self.betas.append(beta)
        # An invariant subspace leaves w as rounding noise of the basis's dtype relative to T.
        scale = max(max(abs(a) for a in self.alphas), max(self.betas))
        if beta <= 100 * torch.finfo(w.dtype).eps * scale:
            self.exhausted = True
        elif self.filled < len(self.basis):
            torch.div(w, beta, out=self.basis[self.filled])
            self.filled += 1

    def ritz(self) -> tuple[Tensor, Tensor]:
        """T's eigenvalues (ascending) and eigenvectors."""
        n = len(self.alphas)
        tridiagonal = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if n > 1:
            off = torch.tensor(self.betas[: n - 1], dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        return values, vectors

    def residual(self, y: Tensor) -> float:
        """‖H·Qy − θ·Qy‖ = β_m·|y_m| for an eigenvector y of T (0 once exhausted)."""
        return 0.0 if self.exhausted else self.betas[-1] * abs(float(y[-1]))

    def ritz_vector(self, y: Tensor) -> Tensor:
        """Q·y, in the basis's dtype and device."""
        return self.basis[: len(y)].T @ y.to(self.basis.device, self.basis.dtype)


def lanczos(
    operator: Callable[[Tensor], Tensor], start: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    """The eigen-decomposition (Ritz values, Ritz vectors) of the tridiagonal T of at most
    `steps` Lanczos iterations from `start`, with full reorthogonalisation."""
    krylov = _Lanczos(operator, start, steps)
    for _ in range(steps):
        krylov.step()
        if krylov.exhausted:  # an invariant subspace: T is exact and smaller
            break
    return krylov.ritz()


def spectral_density(
    operator: Callable[[Tensor], Tensor],
    size: int,
    *,
    steps: int = 80,
    runs: int = 1,
    generator: torch.Generator,
    space: VectorSpace = VectorSpace(),
) -> SpectralDensity:
    """SLQ: `runs` Lanczos runs of min(`steps`, size) steps from random unit vectors."""
    steps = min(steps, size)
    nodes, weights = [], []
    for _ in range(runs):
        values, vectors = lanczos(operator, space.normal(size, generator), steps)
        padded = torch.zeros(steps, dtype=torch.float64)
        padded_weights = torch.zeros(steps, dtype=torch.float64)
        padded[: len(values)] = values
        padded_weights[: len(values)] = vectors[0] ** 2
        nodes.append(padded)
        weights.append(padded_weights)
    return SpectralDensity(torch.stack(nodes), torch.stack(weights))
