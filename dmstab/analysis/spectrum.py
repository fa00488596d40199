"""The Hessian spectrum of one loss at a model's weights (AAAI Fig. 4): λ1..λk by Lanczos with
deflation, tr H by Hutchinson, and the eigenvalue density by stochastic Lanczos quadrature,
whose mean is tr H / P and whose variance estimates (1/P)·tr H² − (tr H / P)²."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmstab.analysis.hessian import (
    HessianOperator,
    Loss,
    Method,
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)
from dmstab.config import HessianConfig, HvpMethod


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The Hessian of one fixed-batch loss, seen through `parameters`-dimensional HVPs."""

    top: list[float]
    trace: TraceEstimate
    density: SpectralDensity
    parameters: int

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


def spectrum(model: nn.Module, loss: Loss, config: HessianConfig) -> Spectrum:
    """λ1..λk, Hutchinson trace and SLQ density of ∇²loss at the model's weights (the math
    attention kernel: CPU fused attention kernels have no forward-over-reverse derivative)."""
    operator = HessianOperator(model, loss, method=hvp_method(config.method, model))
    generator = torch.Generator().manual_seed(config.seed)
    with sdpa_kernel(SDPBackend.MATH):
        top = top_eigenvalues(
            operator,
            operator.size,
            config.top_k,
            iterations=config.max_iterations,
            tol=config.tolerance,
            generator=generator,
        )
        trace = hutchinson_trace(operator, operator.size, config.trace_samples, generator=generator)
        density = spectral_density(
            operator,
            operator.size,
            steps=config.lanczos_steps,
            runs=config.slq_runs,
            generator=generator,
        )
    return Spectrum(top, trace, density, operator.size)
