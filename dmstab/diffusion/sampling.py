"""Fixed-noise ancestral DDPM (Ho et al. 2020) and DDIM (Song et al. 2021 Eq. 12) sampling.

"One seed fixes everything": every random draw — x_T and each step's noise — comes from a
NoiseSource whose per-image streams depend only on (seed, image index). Two models sampled
with the same seed therefore see the same x_T and the same per-step noise, whatever the batch
split; the consistency experiment (AAAI 2024 Table 1) relies on this.
"""

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dmstab.diffusion.gaussian import GaussianDiffusion, Model, ReverseStep, gather_per_sample

Spacing = Literal["even", "ddim"]
SamplerName = Literal["ddpm", "ddim"]

# improved-diffusion's pairing: "250" (even) for DDPM, "ddim250" (integer stride) for DDIM.
_DEFAULT_SPACING: dict[SamplerName, Spacing] = {"ddpm": "even", "ddim": "ddim"}


def space_timesteps(num_timesteps: int, num_steps: int, kind: Spacing) -> list[int]:
    """The original steps kept when sampling with num_steps steps (improved-diffusion respacing).

    "even": round(i·(T−1)/(N−1)) for i < N, so 0 and T−1 are both kept.
    "ddim": range(0, T, stride) for the smallest integer stride giving exactly N steps.
    """
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [2, {num_timesteps}], got {num_steps}")
    if kind == "even":
        spacing = (num_timesteps - 1) / (num_steps - 1)
        return [round(i * spacing) for i in range(num_steps)]
    if kind == "ddim":
        for stride in range(1, num_timesteps):
            kept = range(0, num_timesteps, stride)
            if len(kept) == num_steps:
                return list(kept)
        raise ValueError(
            f"no integer stride gives exactly {num_steps} of {num_timesteps} steps; "
            "choose another step count or even spacing"
        )
    raise ValueError(f"unknown timestep spacing {kind!r}; allowed: 'even', 'ddim'")


class NoiseSource:
    """Gaussian noise for images first_index … first_index+count−1, one stream per image.

    Image i's stream is numpy's PCG64 seeded by SeedSequence([seed, first_index + i]).
    (A torch CPU generator keeps only the low 32 bits of its seed, so seed·2³² + index would
    give every seed the same noise, and a 32-bit hash would collide within ~10⁵ images.)
    The first ``next()`` is x_T; each later call is one sampling step's noise.
    """

    def __init__(
        self, seed: int, first_index: int, count: int, shape: tuple[int, int, int]
    ) -> None:
        if seed < 0 or first_index < 0:
            raise ValueError(
                f"seed and first_index must be non-negative, got {seed}, {first_index}"
            )
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.count = count
        self.shape = shape
        self._streams = [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, first_index + i])))
            for i in range(count)
        ]

    def next(self) -> Tensor:
        """The next draw of every image's stream: (count, C, H, W) float32 on the CPU."""
        draws = np.empty((self.count, *self.shape), dtype=np.float32)
        for stream, slot in zip(self._streams, draws, strict=True):
            stream.standard_normal(dtype=np.float32, out=slot)
        return torch.from_numpy(draws)


def ddpm_step(step: ReverseStep, noise: Tensor | None) -> Tensor:
    """Ancestral step x_{t−1} = μ_θ + σ_t·z (Ho et al. 2020 Alg. 2); no noise at the last step."""
    if noise is None:
        return step.mean
    return step.mean + torch.exp(0.5 * step.log_variance) * noise


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


def sample_images(
    model: Model,
    diffusion: GaussianDiffusion,
    *,
    sampler: SamplerName,
    num_steps: int,
    eta: float,
    noise: NoiseSource,
    device: torch.device,
    y: Tensor | None = None,
    clip_denoised: bool = True,
    callback: Callable[[int, int], None] | None = None,
    spacing: Spacing | None = None,
) -> Tensor:
    """noise.count images as float32 in [−1, 1], (count, C, H, W), on device.

    The schedule is respaced to num_steps (spacing defaults to "even" for DDPM and "ddim" for
    DDIM, as improved-diffusion pairs them); the model sees original timesteps. DDPM uses the
    learned Σ when the diffusion learns it, else "fixedlarge" (σ_t² = β_t); eta applies to
    DDIM only. clip_denoised clamps every x̂0 to [−1, 1]. callback(done, total) runs after
    each step.
    """
    if sampler not in _DEFAULT_SPACING:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: 'ddpm', 'ddim'")
    if eta < 0 or (sampler == "ddpm" and eta != 0):
        raise ValueError(f"eta must be 0 for DDPM and non-negative for DDIM, got {eta}")
    if y is not None and y.shape[0] != noise.count:
        raise ValueError(f"y has {y.shape[0]} labels for {noise.count} images")
    kept = space_timesteps(diffusion.num_timesteps, num_steps, spacing or _DEFAULT_SPACING[sampler])
    spaced = diffusion.respaced(kept)
    draws_step_noise = sampler == "ddpm" or eta > 0
    tables = ddim_tables(spaced, eta)
    labels = None if y is None else y.to(device)
    with torch.no_grad():
        x = noise.next().to(device)
        for done, index in enumerate(reversed(range(num_steps)), start=1):
            t = torch.full((noise.count,), index, dtype=torch.long, device=device)
            step = spaced.p_mean_variance(model, x, t, labels, clip_denoised=clip_denoised)
            z = noise.next().to(device) if draws_step_noise and index > 0 else None
            x = (
                ddpm_step(step, z)
                if sampler == "ddpm"
                else ddim_step(spaced, tables, step, x, t, z)
            )
            if callback is not None:
                callback(done, num_steps)
    return x.clamp(-1.0, 1.0)
