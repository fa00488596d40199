"""Which of a resolved recipe's keys a run uses: its MLflow params are these and no others.

Every schema key has a value in every recipe, but many shape only some runs: EDM's noise
levels do nothing to a DDPM run, DDIM's η nothing to a Heun sampler, `train.spike_window`
nothing when spikes are not watched. A key is applicable unless a rule below, or the
registration of the component that reads it (`Component.reads`), says that this recipe does
not use it; a key left unset (None) is not a setting of the run either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dmstab.config.registry import Registry
from dmstab.config.schema import SAMPLERS, TIMESTEP_SAMPLERS, Recipe

Rule = Callable[[Recipe], bool]


def _diffusion_model(recipe: Recipe) -> bool:
    return not recipe.model.adversarial


def _ddpm(recipe: Recipe) -> bool:
    return _diffusion_model(recipe) and recipe.diffusion.formulation == "ddpm"


def _edm(recipe: Recipe) -> bool:
    return _diffusion_model(recipe) and recipe.diffusion.formulation == "edm"


def _weighting(name: str) -> Rule:
    return lambda recipe: _ddpm(recipe) and recipe.diffusion.weighting == name


def _evaluates(recipe: Recipe) -> bool:
    return recipe.eval.every > 0 or bool(recipe.eval.at)


def _skips(recipe: Recipe) -> bool:
    """Whether the loss guard may skip steps (and so counts them against `max_skipped`)."""
    return recipe.train.nonfinite == "skip" or (
        recipe.train.spike_factor > 0 and recipe.train.spike_policy == "skip"
    )


# Key (a full `section.key`, or a `section.` prefix) -> when a recipe uses it. The first rule
# whose key matches decides, so a full key goes before its section's prefix.
RULES: tuple[tuple[str, Rule], ...] = (
    ("data.download", lambda r: r.data.name == "cifar10"),
    ("data.synthetic_", lambda r: r.data.name == "synthetic"),
    ("diffusion.formulation", _diffusion_model),
    ("diffusion.min_snr_gamma", _weighting("min_snr")),
    ("diffusion.p2_", _weighting("p2")),
    ("diffusion.fdm_", _weighting("fdm")),
    ("diffusion.p_mean", _edm),
    ("diffusion.p_std", _edm),
    ("diffusion.sigma_data", _edm),
    ("diffusion.label_dropout", lambda r: _edm(r) and r.model.class_cond),
    ("diffusion.", _ddpm),  # schedule, steps, target, weighting
    ("timesteps.", _ddpm),
    ("optim.ref_kimg", lambda r: r.optim.schedule == "inverse_sqrt"),
    ("optim.rampup_kimg", lambda r: r.optim.schedule == "inverse_sqrt"),
    ("optim.", _diffusion_model),  # a GAN's two Adams are `model.g_lr`, `model.d_lr`, ...
    ("ema.snapshot_", lambda r: bool(r.ema.power_sigma_rels)),
    ("train.steps", lambda r: r.train.kimg <= 0),
    ("train.kimg", lambda r: r.train.kimg > 0),
    ("train.micro_batch_size", lambda r: r.train.micro_batch_size > 0),
    ("train.spike_", lambda r: r.train.spike_factor > 0),
    ("train.max_skipped", _skips),
    ("train.keep_checkpoints", lambda r: bool(r.train.keep_checkpoints)),
    ("sample.sampler", _diffusion_model),  # a GAN draws its images in one forward pass
    ("sample.steps", _diffusion_model),
    ("sample.eta", lambda r: r.sample.sampler in _readers(SAMPLERS, "sample.eta")),
    ("sample.sections", lambda r: _ddpm(r) and bool(r.sample.sections)),
    ("sample.clip_denoised", _ddpm),
    ("sample.sigma_", _edm),
    ("sample.rho", _edm),
    ("sample.s_", lambda r: _edm(r) and r.sample.s_churn > 0),
    ("sample.guidance", _edm),
    ("sample.guide", lambda r: _edm(r) and r.sample.guidance != 1.0),
    ("eval.", _evaluates),
    ("tracking.run_name", lambda r: False),  # the run's name itself
    ("paper.", lambda r: bool(r.paper.source)),
)


def _readers(registry: Registry, key: str) -> set[str]:
    """The names registered in `registry` whose component reads `key`."""
    return {component.name for component in registry if key in component.reads}


def _read_by_selection(recipe: Recipe, key: str) -> bool:
    """A key some timestep sampler reads is used when the selected one reads it."""
    readers = _readers(TIMESTEP_SAMPLERS, key)
    return not readers or recipe.timesteps.sampler in readers


def applies(recipe: Recipe, key: str) -> bool:
    """Whether `recipe` uses the flat key `section.key` (nested dicts: its first two parts)."""
    section_key = ".".join(key.split(".")[:2])
    for pattern, rule in RULES:
        prefix = pattern.endswith((".", "_"))
        if section_key == pattern or (prefix and section_key.startswith(pattern)):
            if not rule(recipe):
                return False
            break
    return _read_by_selection(recipe, section_key)


def applicable(recipe: Recipe, flat: dict[str, Any]) -> dict[str, Any]:
    """The entries of the flattened recipe `flat` that `recipe` uses and that are set."""
    return {
        key: value
        for key, value in flat.items()
        if value is not None and value != "" and applies(recipe, key)
    }
