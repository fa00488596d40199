"""Discrete-time Gaussian diffusion built from a recipe."""

from __future__ import annotations

from dmstab.diffusion.gaussian import GaussianDiffusion
from dmstab.diffusion.schedules import make_betas
from dmstab.diffusion.timesteps import CLTSSampler, TimestepSampler, UniformSampler
from dmstab.recipe import Recipe


def build_diffusion(recipe: Recipe) -> GaussianDiffusion:
    d = recipe.diffusion
    return GaussianDiffusion(
        make_betas(d.schedule, d.steps),
        target=d.target,
        learn_sigma=recipe.model.learn_sigma,
        hybrid_loss=recipe.model.learn_sigma,
    )


def build_timestep_sampler(recipe: Recipe) -> TimestepSampler:
    """Uniform U(t) = 1/T, or CLTS (AAAI Eqs. 6-7) with the recipe's μ, σ, target iteration."""
    T = recipe.diffusion.steps
    ts = recipe.timesteps
    if ts.sampler == "clts":
        return CLTSSampler(T, mu=ts.mu, sigma=ts.sigma, target_iteration=ts.target_iteration)
    return UniformSampler(T)


__all__ = ["GaussianDiffusion", "TimestepSampler", "build_diffusion", "build_timestep_sampler"]
