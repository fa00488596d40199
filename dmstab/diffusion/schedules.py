"""Noise schedules β_1..β_T for discrete-time diffusion (Ho et al. 2020; Nichol & Dhariwal 2021;
Rombach et al. 2022's latent diffusion)."""

import math
from typing import Literal

import torch
from torch import Tensor

ScheduleName = Literal["linear", "cosine", "scaled_linear"]


def linear_betas(num_timesteps: int) -> Tensor:
    """Ho et al. 2020's linear β, 1e-4 to 0.02, rescaled by 1000/T as in improved-diffusion."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int) -> Tensor:
    """Stable Diffusion's β: √β linear from √0.00085 to √0.012 over T steps (ldm
    `make_beta_schedule("linear")`; U-ViT's `stable_diffusion_beta_schedule`, its U-ViT-H/2
    and H/4 on latents)."""
    roots = torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64)
    return roots**2


def cosine_alpha_bar(u: Tensor, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal 2021 Eq. 17 numerator f(u) = cos²(((u + s)/(1 + s))·π/2), u = t/T."""
    return torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 Eq. 17: β_t = 1 − ᾱ(t)/ᾱ(t−1), clipped to max_beta.

    Index i (0-based) holds the step from u = i/T to u = (i+1)/T, so before clipping the
    cumulative product gives ᾱ_i = f((i+1)/T)/f(0), as in improved-diffusion.
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = cosine_alpha_bar(u, s)
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def make_betas(name: ScheduleName, num_timesteps: int) -> Tensor:
    """The named schedule with T = num_timesteps steps, as float64."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    if name == "scaled_linear":
        return scaled_linear_betas(num_timesteps)
    raise ValueError(
        f"unknown beta schedule {name!r}; allowed: 'linear', 'cosine', 'scaled_linear'"
    )
