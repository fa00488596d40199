"""The Hessian spectrum of one loss at a model's weights (AAAI Fig. 4): λ1..λk and their
eigenvectors by Lanczos with deflation, tr H by Hutchinson, and the eigenvalue density by
stochastic Lanczos quadrature, whose mean is tr H / P and whose variance estimates
(1/P)·tr H² − (tr H / P)², broadened by Gaussians onto a grid as PyHessian does."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmstab.analysis.fixed_batch import GanNetwork, check_fixed_batch_keys
from dmstab.analysis.hessian import (
    BroadenedDensity,
    HessianOperator,
    Loss,
    Method,
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    spectral_density,
    top_eigenpairs,
)
from dmstab.analysis.progress import Progress, report
from dmstab.config import AnalysisSection, Recipe
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError

HvpMethod = Literal["auto", "forward_over_reverse", "double_backward"]


@dataclass(frozen=True)
class HessianConfig(AnalysisSection):
    """`hessian:` (AAAI Fig. 4): the loss Hessian on one fixed batch with fixed noise.

    Top-`top_k` eigenvalues by Lanczos with deflation (at most `max_iterations` steps each,
    until the Ritz residual is below `tolerance`·|λ|), trace by Hutchinson (`trace_samples`),
    density by stochastic Lanczos quadrature (`slq_runs` runs of `lanczos_steps`), broadened
    on a grid by Gaussians of variance `density_sigma_squared`·max(1, range) (PyHessian's
    `density_generate`, whose default σ² is 1e-5).
    Hessian-vector products by `method`; `auto` takes forward-over-reverse on CUDA (about 3×
    faster on an H100) and double backward on the CPU (faster there, docs/performance.md).
    For GANs, `network`'s loss with the other network fixed.
    """

    section: ClassVar[str] = "hessian"

    batch_size: int = 64
    """the fixed batch"""
    timesteps: tuple[int, ...] = ()
    """DDPM timesteps with a loss of their own (the t-averaged loss is always computed)"""
    top_k: int = 3
    """eigenvalues of largest magnitude, by Lanczos with deflation"""
    max_iterations: int = 100
    """Lanczos steps per eigenvalue at most"""
    tolerance: float = 1e-3
    """stop an eigenvalue's Lanczos when the Ritz residual is below tolerance·|λ|"""
    trace_samples: int = 100
    """Hutchinson probes"""
    slq_runs: int = 4
    """stochastic Lanczos quadrature: runs (random start vectors)"""
    lanczos_steps: int = 80
    """stochastic Lanczos quadrature: Lanczos steps per run"""
    density_sigma_squared: float = 1e-5
    """σ² of the Gaussians that broaden the SLQ density onto a grid, as PyHessian's
    `density_generate` (kernel variance σ²·max(1, grid range)); positive"""
    method: HvpMethod = "auto"
    """Hessian-vector products: `forward_over_reverse` (`torch.func`), `double_backward`, or `auto`:
    the first on CUDA, the second on CPU (faster there,
    docs/performance.md#cpu-hessian-vector-products-and-landscape-grid-points)"""
    network: GanNetwork = "generator"
    """GANs: the network whose weights move (the other is fixed)"""
    seed: int = 0
    """seeds the batch, noise, timesteps and probe vectors"""


def check_hessian(recipe: Recipe) -> None:
    h = recipe.analysis(HessianConfig)
    check_fixed_batch_keys(recipe, "hessian", h.batch_size, h.timesteps)
    rules = (
        (h.top_k >= 1, "hessian.top_k must be at least 1"),
        (h.max_iterations >= 1, "hessian.max_iterations must be at least 1"),
        (h.tolerance > 0, "hessian.tolerance must be positive"),
        (h.trace_samples >= 1, "hessian.trace_samples must be at least 1"),
        (
            h.slq_runs >= 1 and h.lanczos_steps >= 2,
            "hessian needs slq_runs >= 1 and lanczos_steps >= 2",
        ),
        (
            h.density_sigma_squared > 0,
            f"hessian.density_sigma_squared is {h.density_sigma_squared}; must be positive",
        ),
    )
    for ok, message in rules:
        if not ok:
            raise DmstabError(message)


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The Hessian of one fixed-batch loss, seen through `parameters`-dimensional HVPs."""

    top: list[float]
    eigenvectors: Tensor  # (k, parameters) float32, row i the unit eigenvector of top[i]
    trace: TraceEstimate
    density: SpectralDensity
    broadened: BroadenedDensity  # `density` on a grid, with `density_sigma_squared`
    parameters: int
    layout: dict[str, tuple[int, ...]]  # name -> shape of the parameters, in vector order

    @property
    def mean(self) -> float:
        """The mean eigenvalue, tr H / P."""
        return self.trace.mean / self.parameters

    def metrics(self, prefix: str) -> dict[str, float]:
        values = {f"{prefix}/lambda_{i + 1}": value for i, value in enumerate(self.top)}
        values[f"{prefix}/trace"] = self.trace.mean
        values[f"{prefix}/trace_se"] = self.trace.standard_error
        values[f"{prefix}/mean"] = self.mean
        values[f"{prefix}/variance"] = self.density.variance()
        return values


def hvp_method(setting: HvpMethod, model: nn.Module) -> Method:
    """`hessian.method`, with `auto` resolved for the model's device: forward-over-reverse on
    CUDA, double backward on the CPU (where torch's forward-mode convolutions are slower)."""
    if setting != "auto":
        return setting
    on_cuda = next(model.parameters()).device.type == "cuda"
    return "forward_over_reverse" if on_cuda else "double_backward"


class CountedProducts:
    """The Hessian operator, counting its products for `progress(done, total)`. The total is
    the most products the three estimates may take (top-k Lanczos, Hutchinson, SLQ); an
    estimate that stops early (converged, or an exhausted Krylov space) jumps to its end."""

    def __init__(
        self,
        operator: Callable[[Tensor], Tensor],
        size: int,
        config: HessianConfig,
        progress: Progress | None,
    ) -> None:
        self.operator, self.progress, self.done = operator, progress, 0
        top_k = min(config.top_k, size) * min(config.max_iterations, size)
        density = config.slq_runs * min(config.lanczos_steps, size)
        self.ends = list(itertools.accumulate((top_k, config.trace_samples, density)))
        report(progress, 0, self.ends[-1])

    def __call__(self, vector: Tensor) -> Tensor:
        product = self.operator(vector)
        self.done += 1
        report(self.progress, self.done, self.ends[-1])
        return product

    def finished(self, estimate: int) -> None:
        """Estimate number `estimate` (0, 1, 2) is done: the count moves to its end."""
        if self.done < self.ends[estimate]:
            self.done = self.ends[estimate]
            report(self.progress, self.done, self.ends[-1])


def spectrum(
    model: nn.Module,
    loss: Loss,
    config: HessianConfig,
    progress: Progress | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> Spectrum:
    """λ1..λk with their eigenvectors, Hutchinson trace and SLQ density of ∇²loss at the
    model's weights (the math attention kernel: CPU fused attention kernels have no
    forward-over-reverse derivative). `progress(done, total)` follows the Hessian-vector
    products (`CountedProducts`). Under `context`, `loss` is this rank's share of the batch
    and every rank computes the same spectrum from the summed products."""
    method = hvp_method(config.method, model)
    hessian = HessianOperator(model, loss, method=method, context=context)
    operator = CountedProducts(hessian, hessian.size, config, progress)
    generator = torch.Generator().manual_seed(config.seed)
    space = hessian.space
    with sdpa_kernel(SDPBackend.MATH):
        top = top_eigenpairs(
            operator,
            hessian.size,
            config.top_k,
            iterations=config.max_iterations,
            tol=config.tolerance,
            generator=generator,
            space=space,
        )
        # To the host at once: the SLQ basis gets the device (dmstab.analysis.hessian_memory).
        top_values, eigenvectors = top.values, top.vectors.to("cpu", torch.float32)
        del top
        operator.finished(0)
        trace = hutchinson_trace(
            operator, hessian.size, config.trace_samples, generator=generator, space=space
        )
        operator.finished(1)
        density = spectral_density(
            operator,
            hessian.size,
            steps=config.lanczos_steps,
            runs=config.slq_runs,
            generator=generator,
            space=space,
        )
        operator.finished(2)
    return Spectrum(
        top_values,
        eigenvectors,
        trace,
        density,
        density.broadened(config.density_sigma_squared),
        hessian.size,
        {name: tuple(shape) for name, shape in zip(hessian.names, hessian.shapes, strict=True)},
    )
