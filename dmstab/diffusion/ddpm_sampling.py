"""Ancestral DDPM (Ho et al. 2020) and DDIM (Song et al. 2021 Eq. 12) over a respaced chain.

Both are ``Sampler``s (dmstab.diffusion.sampling): denoise(x, t) is the model with its labels
bound, called on the original timestep; x_T and every step's noise come from the NoiseSource.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dmstab.diffusion.gaussian import GaussianDiffusion, ReverseStep, gather_per_sample
from dmstab.diffusion.sampling import Callback, Denoise, NoiseSource

Spacing = Literal["even", "ddim"]
# improved-diffusion's pairing: DDPM respaces evenly ("250"), DDIM by an integer stride ("ddim250")
DDPM_SPACING: Spacing = "even"
DDIM_SPACING: Spacing = "ddim"


def space_sections(num_timesteps: int, section_counts: Sequence[int]) -> list[int]:
    """The original steps kept by improved-diffusion's multi-section respacing ("10,15,20").

    The T steps split into len(section_counts) consecutive sections of T // n steps, the first
    T % n of them one step longer. A section of size S keeping c steps keeps its first step
    plus a running sum of the fractional stride (S−1)/(c−1), each partial sum rounded (Python's
    round, ties to even): its first and last steps when c ≥ 2, its first alone when c = 1.
    """
    if not section_counts or any(count < 1 for count in section_counts):
        raise ValueError("every section must keep at least 1 step")
    size_per_section, longer = divmod(num_timesteps, len(section_counts))
    kept: list[int] = []
    start = 0
    for index, count in enumerate(section_counts):
        size = size_per_section + (1 if index < longer else 0)
        if count > size:
            raise ValueError(
                f"section {index + 1} spans {size} of the {num_timesteps} steps, so it keeps "
                f"1 … {size}, not {count}"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        partial_sums = itertools.accumulate(itertools.repeat(stride, count - 1), initial=0.0)
        kept += [start + round(position) for position in partial_sums]
        start += size
    return kept


def space_timesteps(num_timesteps: int, num_steps: int, kind: Spacing) -> list[int]:
    """The original steps kept when sampling with num_steps steps (improved-diffusion respacing).

    "even": one section of ``space_sections``, a running sum of the fractional stride
    (T−1)/(N−1), each partial sum rounded (ties to even), so 0 and T−1 are both kept. The float
    sum, not the exact i·(T−1)/(N−1), decides the ties: that is improved-diffusion's
    `space_timesteps`, whose kept steps these equal for every N (the product i·stride keeps
    other steps at 283 of the 999 step counts of T = 1000).
    "ddim": range(0, T, stride) for the smallest integer stride giving exactly N steps.
    """
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [2, {num_timesteps}], got {num_steps}")
    if kind == "even":
        return space_sections(num_timesteps, [num_steps])
    if kind == "ddim":
        for stride in range(1, num_timesteps):
            kept = range(0, num_timesteps, stride)
            if len(kept) == num_steps:
                return list(kept)
        counts = {len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps)}
        below = max(count for count in counts if count < num_steps)
        above = min(count for count in counts if count > num_steps)
        raise ValueError(
            f"no integer stride gives exactly {num_steps} of {num_timesteps} steps; "
            f"the nearest counts one gives are {below} and {above}"
        )
    raise ValueError(f"unknown timestep spacing {kind!r}; allowed: 'even', 'ddim'")


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The chain DDPM and DDIM walk: `diffusion` respaced to `num_steps` steps, and how.

    spacing None lets the sampler pick improved-diffusion's pairing: "even" for DDPM ("250"),
    "ddim" for DDIM ("ddim250"). Non-empty `sections` replace either by the multi-section
    respacing ("10,15,20", ``space_sections``) for every sampler, as in improved-diffusion;
    they must keep num_steps steps in all. eta is DDIM's η (Song et al. Eq. 16; DDPM needs 0).
    clip_denoised clamps every x̂0 to [−1, 1].
    """

    diffusion: GaussianDiffusion
    num_steps: int
    eta: float = 0.0
    clip_denoised: bool = True
    spacing: Spacing | None = None
    sections: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError(f"eta must be non-negative for DDIM, got {self.eta}")
        if self.sections and sum(self.sections) != self.num_steps:
            raise ValueError(
                f"sections {list(self.sections)} keep {sum(self.sections)} steps, "
                f"not {self.num_steps}"
            )

    def respaced(self, spacing: Spacing) -> GaussianDiffusion:
        """The diffusion over the kept steps: the sections when given, else `spacing` unless
        the schedule names one."""
        T = self.diffusion.num_timesteps
        if self.sections:
            return self.diffusion.respaced(space_sections(T, self.sections))
        return self.diffusion.respaced(space_timesteps(T, self.num_steps, self.spacing or spacing))


def ddpm_step(step: ReverseStep, noise: Tensor | None) -> Tensor:
    """Ancestral step x_{t−1} = μ_θ + σ_t·z (Ho et al. 2020 Alg. 2); no noise at the last step."""
    if noise is None:
        return step.mean
    return step.mean + torch.exp(0.5 * step.log_variance) * noise


def ddpm(
    denoise: Denoise,
    noise: NoiseSource,
    schedule: DiscreteSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """noise.count images as float32 in [−1, 1], (count, C, H, W), on noise.device.

    Ho et al. 2020 Alg. 2 from x_T = noise.next(), one draw of the noise source per step but
    the last. Σ is the learned one when the diffusion learns it, else "fixedlarge"
    (σ_t² = β_t). callback(done, total) runs after each step.
    """
    if schedule.eta != 0:
        raise ValueError(f"eta must be 0 for DDPM (η is DDIM's), got {schedule.eta}")
    spaced, num_steps = schedule.respaced(DDPM_SPACING), schedule.num_steps
    with torch.no_grad():
        x = noise.next()
        for done, index in enumerate(reversed(range(num_steps)), start=1):
            t = torch.full((noise.count,), index, dtype=torch.long, device=x.device)
            step = spaced.p_mean_variance(denoise, x, t, clip_denoised=schedule.clip_denoised)
            x = ddpm_step(step, noise.next() if index > 0 else None)
            if callback is not None:
                callback(done, num_steps)
    return x.clamp(-1.0, 1.0)


def ddim_tables(diffusion: GaussianDiffusion, eta: float) -> tuple[Tensor, Tensor]:
    """Per-step float64 (σ_t, √(1−ᾱ_{t−1}−σ_t²)) of Song et al. 2021 Eqs. 12 and 16.

    σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}); computed in float64 because
    1−ᾱ_{t−1}−σ_t² cancels badly in float32 near t = 0.
    """
    alpha_bar, alpha_bar_prev = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * diffusion.betas)
    direction = torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0.0))
    return sigma, direction


def ddim_step(
    diffusion: GaussianDiffusion,
    tables: tuple[Tensor, Tensor],
    step: ReverseStep,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor | None,
) -> Tensor:
    """Song et al. 2021 Eq. 12: √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1}−σ_t²)·ε̂ + σ_t·z, ε̂ from x̂0."""
    sigma_table, direction_table = tables
    eps = diffusion.predict_eps(x_t, t, step.pred_x0)
    signal = gather_per_sample(torch.sqrt(diffusion.alphas_cumprod_prev), t, x_t.ndim)
    mean = signal * step.pred_x0 + gather_per_sample(direction_table, t, x_t.ndim) * eps
    if noise is None:
        return mean
    return mean + gather_per_sample(sigma_table, t, x_t.ndim) * noise


def ddim(
    denoise: Denoise,
    noise: NoiseSource,
    schedule: DiscreteSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """noise.count images as float32 in [−1, 1], (count, C, H, W), on noise.device.

    Song et al. 2021 Eq. 12 from x_T = noise.next(); with η > 0 one draw of the noise source
    per step but the last, with η = 0 none (the images depend on x_T alone).
    callback(done, total) runs after each step.
    """
    spaced, num_steps = schedule.respaced(DDIM_SPACING), schedule.num_steps
    tables = ddim_tables(spaced, schedule.eta)
    with torch.no_grad():
        x = noise.next()
        for done, index in enumerate(reversed(range(num_steps)), start=1):
            t = torch.full((noise.count,), index, dtype=torch.long, device=x.device)
            step = spaced.p_mean_variance(denoise, x, t, clip_denoised=schedule.clip_denoised)
            z = noise.next() if schedule.eta > 0 and index > 0 else None
            x = ddim_step(spaced, tables, step, x, t, z)
            if callback is not None:
                callback(done, num_steps)
    return x.clamp(-1.0, 1.0)
