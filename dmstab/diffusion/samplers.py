"""Samplers by name (`sample.sampler`): each one function with the ``Sampler`` signature.

A new sampler is one such function and one ``register_sampler`` call naming the formulation
whose schedule it walks: ddpm samplers get a ``DiscreteSchedule`` (the recipe's β schedule
respaced to `sample.steps`), edm samplers a ``SigmaSchedule`` (Karras noise levels). Its name
is then a valid `sample.sampler`, `eval.sampler` and `consistency.samplers` entry.
"""

from __future__ import annotations

from typing import Any

from dmstab.config import SAMPLERS, Recipe
from dmstab.diffusion.ddpm_sampling import ddim, ddpm
from dmstab.diffusion.edm_sampling import heun
from dmstab.diffusion.sampling import Sampler
from dmstab.errors import DmstabError


def register_sampler(name: str, sampler: Sampler[Any], *, formulation: str) -> None:
    """Make `sampler` selectable as `name` for `formulation`'s models; a name is registered once."""

    def check(recipe: Recipe, key: str) -> None:
        if recipe.diffusion.formulation != formulation:
            raise DmstabError(
                f"{key}.sampler {name} samples diffusion.formulation {formulation} models; "
                f"this recipe's is {recipe.diffusion.formulation}"
            )

    SAMPLERS.register(name, sampler, check=check)


def find_sampler(name: str) -> Sampler[Any]:
    """The sampler registered as `name` (a one-line error naming the registered ones if none)."""
    sampler: Sampler[Any] = SAMPLERS.get(name).implementation
    return sampler


register_sampler("ddpm", ddpm, formulation="ddpm")
register_sampler("ddim", ddim, formulation="ddpm")
register_sampler("heun", heun, formulation="edm")
