"""Trained networks from checkpoints: the weights `sample`, `fid` and guidance load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmstab.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_weights
from dmstab.config import Recipe, apply_overrides, from_mapping
from dmstab.diffusion.edm import Denoiser
from dmstab.diffusion.sampling import unconditional
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.tracking import (
    TAG_KIND,
    TAG_OUTPUT,
    TAG_OUTPUT_COUNT,
    TAG_SIGMA_RELS,
    latest_checkpoint_run,
    latest_run,
    resolve_uri,
    run_directory,
)

SAMPLING_KEYS = ("sample.", "tracking.", "train.device=")


def find_checkpoint(source: str | None, experiment: str | None, uri: str | None) -> Path:
    """A checkpoint path, a run directory, a training run id, or (None) the latest training run."""
    if source is not None and Path(source).suffix == ".pt":
        return Path(source)
    if source is not None and Path(source).exists():
        return Path(source) / CHECKPOINT_NAME if Path(source).is_dir() else Path(source)
    run_id = source or latest_run(experiment, "train", uri)
    if run_id is None:
        where = f"MLflow experiment '{experiment}'" if experiment else resolve_uri(uri)
        raise DmstabError(f"no training run in {where}; pass a run id or a checkpoint path")
    return run_directory(run_id, uri) / CHECKPOINT_NAME


def latest_checkpoint(experiment: str | None, uri: str | None) -> tuple[Path, str]:
    """The checkpoint of the run that wrote one last (training or `ema-reconstruct`), and
    which run that is, in words: what `dmstab sample` and `dmstab fid` take by default."""
    record = latest_checkpoint_run(experiment, uri)
    if record is None:
        where = f"MLflow experiment '{experiment}'" if experiment else resolve_uri(uri)
        raise DmstabError(f"no training run in {where}; pass a run id or a checkpoint path")
    if record.tags.get(TAG_KIND) == "train":
        path = run_directory(record.run_id, uri) / CHECKPOINT_NAME
        return path, f"the latest training run {record.run_id}"
    output, count = record.tags[TAG_OUTPUT], int(record.tags.get(TAG_OUTPUT_COUNT, "0"))
    if count != 1:
        raise DmstabError(
            f"the latest run {record.run_id} (ema-reconstruct) wrote {count} checkpoints in "
            f"{output}; name one of them, or a training run id"
        )
    sigma_rels = record.tags.get(TAG_SIGMA_RELS, "?")
    return Path(output), f"the latest run {record.run_id} (ema-reconstruct, σrel {sigma_rels})"


def network_from_state(
    state: dict[str, Any], recipe: Recipe, *, use_ema: bool, source: Path
) -> nn.Module:
    """The recipe's network carrying the checkpoint's EMA (or raw) weights, in eval mode."""
    model = build_model(recipe, int(state.get("num_classes", 0)))
    ema = state.get("ema")
    weights = ema.get("shadow") if isinstance(ema, dict) else None
    if not use_ema:
        weights = state.get("model")
    elif not isinstance(weights, dict):
        raise DmstabError(f"checkpoint {source} has no EMA weights; use sample.use_ema=false")
    if not isinstance(weights, dict):
        raise DmstabError(f"checkpoint {source} has no model weights")
    return load_weights(model, weights, source)


def _restricted(overrides: Sequence[str], allowed: tuple[str, ...]) -> None:
    for text in overrides:
        if not text.startswith(allowed):
            key = text.partition("=")[0]
            accepted = ", ".join(a.rstrip("=") + ("*" if a.endswith(".") else "") for a in allowed)
            raise DmstabError(
                f"override '{key}' cannot change a trained model; accepted: {accepted}"
            )


def stored_recipe(
    state: dict[str, Any],
    source: Path,
    overrides: Sequence[str] = (),
    *,
    allowed: tuple[str, ...] = SAMPLING_KEYS,
) -> Recipe:
    """The training recipe a dmstab checkpoint carries, with `overrides` of the `allowed`
    prefixes applied (sampling keys by default)."""
    _restricted(overrides, allowed)
    stored = state.get("recipe")
    if not isinstance(stored, dict):
        raise DmstabError(f"checkpoint {source} carries no recipe; it was not written by dmstab")
    return from_mapping(apply_overrides(stored, overrides))


def load_guide(recipe: Recipe, device: torch.device) -> Denoiser | None:
    """The guide denoiser `sample.guide` names (a checkpoint path or run id), else None.

    EDM2 Sec. 5 guides with a smaller unconditional model of the same data; an unconditional
    guide is called without labels, a class-conditional one with the main model's labels.
    """
    spec = recipe.sample.guide
    if spec is None or spec == "self" or recipe.sample.guidance == 1.0:
        return None
    path = find_checkpoint(spec, None, recipe.tracking.uri)
    state = load_checkpoint(path)
    guide_recipe = stored_recipe(state, path)
    if guide_recipe.diffusion.formulation != "edm" or recipe.diffusion.formulation != "edm":
        raise DmstabError("guidance with a guide model needs EDM models on both sides")
    if (guide_recipe.data.name, guide_recipe.data.resolution) != (
        recipe.data.name,
        recipe.data.resolution,
    ):
        raise DmstabError(
            f"guide {path} was trained on {guide_recipe.data.name} at "
            f"{guide_recipe.data.resolution}px, the model on {recipe.data.name} at "
            f"{recipe.data.resolution}px"
        )
    guide = network_from_state(state, guide_recipe, use_ema=True, source=path).to(device)
    return guide if guide_recipe.model.class_cond else unconditional(guide)
