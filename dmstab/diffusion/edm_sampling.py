"""EDM's 2nd-order Heun sampler (Karras et al. 2022 Algs. 1–2) over Karras noise levels.

The probability-flow ODE dx/dσ = (x − D(x, σ))/σ is integrated from σ_max to 0 over the
noise levels of a SigmaSchedule. ``heun`` is a ``Sampler`` (dmstab.diffusion.sampling):
denoise(x, σ) is D with its labels bound and any guidance mixed in (``with_labels``,
``guided``); every random draw — x_T and each churn step's noise — comes from a dmstab
NoiseSource, so a seed fixes the samples whatever the batch split.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dmstab.diffusion.sampling import Callback, Denoise, NoiseSource
from dmstab.errors import DmstabError

# EDM's defaults for ImageNet and EDM2's for every model: 32 steps, NFE 63 (EDM2 Sec. 5).
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def karras_sigmas(
    num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """EDM Eq. 5 noise levels, float64 (num_steps + 1,), from σ_max down to σ_min, then 0.

    σ_i = (σmax^(1/ρ) + i/(N−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ for i < N, and σ_N = 0.
    """
    if num_steps < 2:
        raise DmstabError(f"sampling steps is {num_steps}; must be at least 2")
    if not 0 < sigma_min < sigma_max:
        raise DmstabError(
            f"sigma_min {sigma_min} and sigma_max {sigma_max} must satisfy 0 < min < max"
        )
    if not rho > 0:
        raise DmstabError(f"rho is {rho}; must be > 0")
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    top, bottom = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (top + ramp * (bottom - top)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@dataclass(frozen=True)
class Churn:
    """EDM Alg. 2's stochasticity: S_churn, the σ range [S_min, S_max] it acts on, S_noise."""

    s_churn: float
    s_min: float = 0.0
    s_max: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if not (self.s_churn >= 0 and self.s_noise >= 0 and self.s_min <= self.s_max):
            raise DmstabError(
                "stochastic sampling needs s_churn >= 0, s_noise >= 0 and s_min <= s_max; got "
                f"{self.s_churn}, {self.s_noise}, {self.s_min}, {self.s_max}"
            )

    def gamma(self, sigma: float, num_steps: int) -> float:
        """γ = min(S_churn/N, √2 − 1) for S_min ≤ σ ≤ S_max, else 0."""
        if self.s_churn > 0 and self.s_min <= sigma <= self.s_max:
            return min(self.s_churn / num_steps, math.sqrt(2.0) - 1.0)
        return 0.0


def heun_step(denoise: Denoise, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """EDM Alg. 1: an Euler step of dx/dσ = (x − D)/σ, then the trapezoidal correction.

    The step to σ = 0 stays first order (the slope is undefined there), hence NFE 2N − 1.
    """
    batch = x.shape[0]
    sigma_now = torch.full((batch,), sigma, dtype=x.dtype, device=x.device)
    slope = (x - denoise(x, sigma_now)) / sigma
    euler = x + (sigma_next - sigma) * slope
    if sigma_next == 0:
        return euler
    sigma_then = torch.full((batch,), sigma_next, dtype=x.dtype, device=x.device)
    slope_next = (euler - denoise(euler, sigma_then)) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (slope + slope_next)


@dataclass(frozen=True, eq=False)
class SigmaSchedule:
    """The noise levels σ_0 > … > σ_N ≥ 0 Heun walks (``karras_sigmas`` gives EDM Eq. 5's)
    and EDM Alg. 2's churn, None for the deterministic sampler (Alg. 1)."""

    sigmas: Tensor
    churn: Churn | None = None

    def __post_init__(self) -> None:
        levels: list[float] = self.sigmas.tolist() if self.sigmas.ndim == 1 else []
        if len(levels) < 2 or levels[-1] < 0 or any(s <= 0 for s in levels[:-1]):
            raise DmstabError("sigmas must be a 1-D list of ≥ 2 noise levels > 0, the last ≥ 0")
        if any(later >= earlier for earlier, later in itertools.pairwise(levels)):
            raise DmstabError("sigmas must decrease strictly (from σ_max towards 0)")


def heun(
    denoise: Denoise,
    noise: NoiseSource,
    schedule: SigmaSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """noise.count samples, float32 (count, C, H, W) on noise.device, from x_T = σ_0·noise.next().

    Deterministic (EDM Alg. 1) without churn; with it, EDM Alg. 2 raises σ to σ̂ = (1+γ)σ
    by adding √(σ̂² − σ²)·S_noise·z before each step, z the next draw of the noise source.
    callback(done, total) runs after each step. Outputs are not clamped (they may be latents).
    """
    levels: list[float] = schedule.sigmas.tolist()
    churn, num_steps = schedule.churn, len(levels) - 1
    with torch.no_grad():
        x = noise.next() * levels[0]
        for done, (sigma, sigma_next) in enumerate(itertools.pairwise(levels), 1):
            sigma_hat = sigma
            if churn is not None and (gamma := churn.gamma(sigma, num_steps)) > 0:
                sigma_hat = sigma * (1.0 + gamma)
                z = noise.next()
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * churn.s_noise * z
            x = heun_step(denoise, x, sigma_hat, sigma_next)
            if callback is not None:
                callback(done, num_steps)
    return x
