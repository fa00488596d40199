"""A toy sampler `sample.sampler: toy_one_jump`: x̂0 of x_T in one network call.

It walks the ddpm formulation's DiscreteSchedule but uses only its first (noisiest) step,
t = T−1, and returns the clipped x̂0 there: the one-step denoiser E[x0 | x_T].
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmstab.diffusion.ddpm_sampling import DiscreteSchedule
from dmstab.diffusion.samplers import register_sampler
from dmstab.diffusion.sampling import Callback, Denoise, NoiseSource


def one_jump(
    denoise: Denoise,
    noise: NoiseSource,
    schedule: DiscreteSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    diffusion = schedule.diffusion
    with torch.no_grad():
        x = noise.next()
        t = torch.full((noise.count,), diffusion.num_timesteps - 1, device=x.device)
        step = diffusion.p_mean_variance(denoise, x, t, clip_denoised=True)
        if callback is not None:
            callback(1, 1)
    return step.pred_x0


register_sampler("toy_one_jump", one_jump, formulation="ddpm")
