"""Discrete-time Gaussian diffusion built from a recipe."""

from __future__ import annotations

import torch

from dmstab.config import Recipe
from dmstab.diffusion.fdm import fdm_input_scale
from dmstab.diffusion.gaussian import GaussianDiffusion
from dmstab.diffusion.schedules import make_betas
from dmstab.diffusion.timesteps import (
    CLTSSampler,
    LossSecondMomentSampler,
    ShiftedGaussianSampler,
    TimestepSampler,
    UniformSampler,
)


def build_diffusion(recipe: Recipe) -> GaussianDiffusion:
    """The recipe's DDPM; weighting fdm also scales the model input by FDM's kernel scale."""
    d = recipe.diffusion
    betas = make_betas(d.schedule, d.steps)
    input_scale = None
    if d.weighting == "fdm":
        input_scale = fdm_input_scale(
            torch.cumprod(1.0 - betas, dim=0),
            multiplier=d.fdm_multiplier,
            beta_min=d.fdm_beta_min,
            beta_d=d.fdm_beta_d,
        )
    return GaussianDiffusion(
        betas,
        target=d.target,
        learn_sigma=recipe.model.learn_sigma,
        hybrid_loss=recipe.model.learn_sigma,
        input_scale=input_scale,
    )


def build_timestep_sampler(recipe: Recipe) -> TimestepSampler:
    """The recipe's timesteps.sampler: uniform, clts (AAAI Eqs. 6-7), shifted_gaussian (the
    paper's first attempt) or importance (improved-diffusion's loss-second-moment sampler)."""
    T = recipe.diffusion.steps
    ts = recipe.timesteps
    if ts.sampler == "clts":
        return CLTSSampler(T, mu=ts.mu, sigma=ts.sigma, target_iteration=ts.target_iteration)
    if ts.sampler == "shifted_gaussian":
        return ShiftedGaussianSampler(
            T, mu=ts.mu, sigma=ts.sigma, target_iteration=ts.target_iteration
        )
    if ts.sampler == "importance":
        return LossSecondMomentSampler(T, history=ts.history, uniform_prob=ts.uniform_prob)
    return UniformSampler(T)


__all__ = ["GaussianDiffusion", "TimestepSampler", "build_diffusion", "build_timestep_sampler"]
