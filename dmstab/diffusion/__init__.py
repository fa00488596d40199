"""Discrete-time Gaussian diffusion built from a recipe."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dmstab.config import TIMESTEP_SAMPLERS, Recipe
from dmstab.config.registry import RecipeCheck
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
from dmstab.errors import DmstabError


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
        learn_sigma=recipe.model.learns_variance(),
        hybrid_loss=recipe.model.learns_variance(),
        input_scale=input_scale,
    )


def register_timestep_sampler(
    name: str,
    build: Callable[[Recipe], TimestepSampler],
    check: RecipeCheck | None = None,
    reads: tuple[str, ...] = (),
) -> None:
    """Make `build(recipe)` the training timestep sampler `timesteps.sampler: name`; `check`
    rejects a recipe its `timesteps.*` keys do not suit; `reads` names the `timesteps.*` keys
    it reads. A name is registered once."""
    TIMESTEP_SAMPLERS.register(name, build, check=check, reads=reads)


def build_timestep_sampler(recipe: Recipe) -> TimestepSampler:
    """The recipe's `timesteps.sampler`, built by its registration."""
    build: Callable[[Recipe], TimestepSampler] = TIMESTEP_SAMPLERS.get(
        recipe.timesteps.sampler
    ).implementation
    return build(recipe)


def _uniform(recipe: Recipe) -> UniformSampler:
    return UniformSampler(recipe.diffusion.steps)


def _clts(recipe: Recipe) -> CLTSSampler:
    """AAAI Eqs. 6–7: the curriculum from uniform to N(μ, σ) by `target_iteration`."""
    ts = recipe.timesteps
    return CLTSSampler(
        recipe.diffusion.steps, mu=ts.mu, sigma=ts.sigma, target_iteration=ts.target_iteration
    )


def _shifted_gaussian(recipe: Recipe) -> ShiftedGaussianSampler:
    """The paper's first attempt: N(t; μ_i, σ), μ_i moving from T−1 to μ."""
    ts = recipe.timesteps
    return ShiftedGaussianSampler(
        recipe.diffusion.steps, mu=ts.mu, sigma=ts.sigma, target_iteration=ts.target_iteration
    )


def _importance(recipe: Recipe) -> LossSecondMomentSampler:
    """improved-diffusion's loss-second-moment sampler."""
    ts = recipe.timesteps
    return LossSecondMomentSampler(
        recipe.diffusion.steps, history=ts.history, uniform_prob=ts.uniform_prob
    )


def _check_mean_in_range(recipe: Recipe) -> None:
    """The Gaussians' mean μ is a timestep: in [0, T)."""
    mu, T = recipe.timesteps.mu, recipe.diffusion.steps
    if not 0.0 <= mu < T:
        raise DmstabError(f"timesteps.mu is {mu}; must be in [0, diffusion.steps) = [0, {T})")


GAUSSIAN_KEYS = ("timesteps.mu", "timesteps.sigma", "timesteps.target_iteration")
register_timestep_sampler("uniform", _uniform)
register_timestep_sampler("clts", _clts, _check_mean_in_range, GAUSSIAN_KEYS)
register_timestep_sampler(
    "shifted_gaussian", _shifted_gaussian, _check_mean_in_range, GAUSSIAN_KEYS
)
register_timestep_sampler(
    "importance", _importance, reads=("timesteps.history", "timesteps.uniform_prob")
)


__all__ = [
    "GaussianDiffusion",
    "TimestepSampler",
    "build_diffusion",
    "build_timestep_sampler",
    "register_timestep_sampler",
]
