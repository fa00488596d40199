"""Samplers by name (`sample.sampler`): each one function with the ``Sampler`` signature.

A new sampler is one such function and one ``register_sampler`` call naming the formulation
whose schedule it walks: ddpm samplers get a ``DiscreteSchedule`` (the recipe's β schedule
respaced to `sample.steps`), edm samplers a ``SigmaSchedule`` (Karras noise levels). Its name
is then a valid `sample.sampler`, `eval.sampler` and `consistency.samplers` entry, and a recipe
that names it is checked when it loads: the formulation, the step count against the sampler's
respacing (or against `sample.sections`, improved-diffusion's multi-section respacing, which
only samplers that respace take), and `sample.eta` against whether the sampler takes DDIM's η.
"""

from __future__ import annotations

from typing import Any

from dmstab.config import SAMPLERS, Recipe
from dmstab.diffusion.ddpm_sampling import (
    DDIM_SPACING,
    DDPM_SPACING,
    Spacing,
    ddim,
    ddpm,
    space_sections,
    space_timesteps,
)
from dmstab.diffusion.edm_sampling import heun
from dmstab.diffusion.sampling import Sampler
from dmstab.errors import DmstabError


def register_sampler(
    name: str,
    sampler: Sampler[Any],
    *,
    formulation: str,
    spacing: Spacing | None = None,
    takes_eta: bool = False,
) -> None:
    """Make `sampler` selectable as `name` for `formulation`'s models; a name is registered once.

    `spacing`: how a ddpm sampler respaces the β schedule (``space_timesteps``), so that a step
    count it cannot keep is refused when the recipe loads. `takes_eta`: whether it reads
    `sample.eta` (DDIM's η); one that does not refuses a non-zero η.
    """

    def check(recipe: Recipe, key: str, steps: int) -> None:
        if recipe.diffusion.formulation != formulation:
            raise DmstabError(
                f"{key}.sampler {name} samples diffusion.formulation {formulation} models; "
                f"this recipe's is {recipe.diffusion.formulation}"
            )
        if recipe.sample.sections:
            check_sections(recipe, key, steps, name, respaces=spacing is not None)
        elif spacing is not None:
            try:
                space_timesteps(recipe.diffusion.steps, steps, spacing)
            except ValueError as error:
                raise DmstabError(f"{key}.steps={steps} for sampler {name}: {error}") from None
        if not takes_eta and recipe.sample.eta != 0:
            raise DmstabError(
                f"sample.eta={recipe.sample.eta} is DDIM's η, which {key}.sampler {name} does "
                "not take; set sample.eta=0 or use sampler ddim"
            )

    SAMPLERS.register(name, sampler, check=check, reads=("sample.eta",) if takes_eta else ())


def check_sections(recipe: Recipe, key: str, steps: int, sampler: str, *, respaces: bool) -> None:
    """`sample.sections` can respace the recipe's β schedule for `sampler` at `steps` steps."""
    sections = list(recipe.sample.sections)
    if not respaces:
        raise DmstabError(
            f"sample.sections={sections} respace the ddpm β schedule, which {key}.sampler "
            f"{sampler} does not walk; use ddpm or ddim, or sample.sections=[]"
        )
    try:
        space_sections(recipe.diffusion.steps, sections)
    except ValueError as error:
        raise DmstabError(f"sample.sections={sections}: {error}") from None
    if sum(sections) != steps:
        raise DmstabError(
            f"sample.sections={sections} keep {sum(sections)} steps in all but {key}.steps is "
            f"{steps}; set {key}.steps={sum(sections)}"
        )


def find_sampler(name: str) -> Sampler[Any]:
    """The sampler registered as `name` (a one-line error naming the registered ones if none)."""
    sampler: Sampler[Any] = SAMPLERS.get(name).implementation
    return sampler


register_sampler("ddpm", ddpm, formulation="ddpm", spacing=DDPM_SPACING)
register_sampler("ddim", ddim, formulation="ddpm", spacing=DDIM_SPACING, takes_eta=True)
register_sampler("heun", heun, formulation="edm")
