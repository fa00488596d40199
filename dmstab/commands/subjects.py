"""The trained models an analysis reads: run ids, checkpoint paths, or a recipe it trains.

`dmstab consistency`, `landscape` and `hessian` take either trained models (a training run
id, a run directory or a checkpoint `.pt`) or a recipe; for a recipe they reuse its latest
FINISHED training run (found by fingerprint) or train it, continuing an unfinished run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmstab.atomic import require_writable_directory
from dmstab.checkpoint import CHECKPOINT_NAME, kept_checkpoint, load_checkpoint
from dmstab.config import ANALYSES, Recipe, load_recipe
from dmstab.console import SampleProgress, TrainProgress
from dmstab.errors import DmstabError
from dmstab.tracking import check_store_writable, find_finished_run, run_directory
from dmstab.train.loop import Progress, train
from dmstab.train.restore import find_checkpoint, network_from_state, stored_recipe


def analysis_overrides() -> tuple[str, ...]:
    """What an analysis may change of a trained model's recipe: how it is sampled and
    analysed (every registered analysis's section)."""
    return ("sample.", "tracking.", "train.device=", *(f"{a.name}." for a in ANALYSES))


@dataclass(frozen=True)
class Subject:
    """One trained model: its checkpoint, the checkpoint's contents and its recipe."""

    checkpoint: Path
    state: dict[str, Any]
    recipe: Recipe
    label: str

    @property
    def run_id(self) -> str | None:
        run_id = self.state.get("run_id")
        return str(run_id) if run_id else None

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def num_classes(self) -> int:
        return int(self.state.get("num_classes", 0))

    def network(self, device: torch.device, *, use_ema: bool) -> nn.Module:
        """The recipe's network with the checkpoint's EMA (or raw) weights, in eval mode."""
        model = network_from_state(self.state, self.recipe, use_ema=use_ema, source=self.checkpoint)
        return model.to(device)

    def kept(self, step: int) -> Subject:
        """The same run at a checkpoint kept by `train.keep_checkpoints` (AAAI Fig. 3's epochs)."""
        if step == self.step:
            return self
        path = kept_checkpoint(self.checkpoint.parent, step)
        if not path.is_file():
            raise DmstabError(
                f"run {self.run_id or self.checkpoint.parent} kept no checkpoint at step {step} "
                f"({path} is missing); train it with train.keep_checkpoints=[{step}]"
            )
        return Subject(path, load_checkpoint(path), self.recipe, f"{self.label}@{step}")


def load_subject(
    source: str | None, overrides: Sequence[str] = (), *, uri: str | None = None, label: str = ""
) -> Subject:
    """A run id, run directory or checkpoint path (None: the latest training run), with
    analysis `overrides` applied."""
    checkpoint = find_checkpoint(source, None, uri)
    state = load_checkpoint(checkpoint)
    recipe = stored_recipe(state, checkpoint, overrides, allowed=analysis_overrides())
    return Subject(checkpoint, state, recipe, label or _default_label(source, state))


def _default_label(source: str | None, state: dict[str, Any]) -> str:
    run_id = state.get("run_id")
    if run_id:
        return str(run_id)[:8]
    return Path(source).stem if source else "latest"


def trained_subject(
    recipe: Recipe,
    *,
    label: str,
    progress: Progress | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> Subject:
    """`recipe`'s latest FINISHED training run, or a new one trained now (continuing the
    latest unfinished run of the recipe, as `dmstab train --resume auto`)."""
    run_id = find_finished_run(recipe)
    if run_id is None:
        checkpoint = train(recipe, resume="auto", progress=progress, on_sample=on_sample).checkpoint
    else:
        checkpoint = run_directory(run_id, recipe.tracking.uri) / CHECKPOINT_NAME
        if not checkpoint.is_file():
            raise DmstabError(
                f"finished run {run_id} of recipe {recipe.name} has no {checkpoint}; "
                "delete the run in MLflow to train it again, or pass a checkpoint"
            )
    state = load_checkpoint(checkpoint)
    return Subject(checkpoint, state, recipe, label)


ANALYSES_DIR = Path("analyses")  # an analysis's arrays go to analyses/KIND/RUN_ID


def check_analysis_writable(recipe: Recipe) -> None:
    """Refuse an analysis whose MLflow store or analyses/ folder cannot take files, before it
    trains, loads or computes anything."""
    check_store_writable(recipe.tracking.uri)
    require_writable_directory(ANALYSES_DIR, "the analyses folder")


@dataclass(frozen=True)
class AnalysisInputs:
    """An analysis command's arguments: one recipe to train (or reuse), or trained models
    (none: the latest training run), and `section.key=value` overrides for either."""

    recipe: Recipe | None
    sources: tuple[str, ...]
    overrides: tuple[str, ...]


def parse_inputs(arguments: Sequence[str], *, will_write: bool = True) -> AnalysisInputs:
    """Arguments with '=' are overrides; a .yaml/.yml file is a recipe; the rest are models.
    `will_write`: refuse a recipe whose store or analyses folder cannot take files (a dry run
    writes nothing)."""
    overrides = tuple(a for a in arguments if "=" in a)
    sources = tuple(a for a in arguments if "=" not in a)
    recipes = [s for s in sources if Path(s).suffix in (".yaml", ".yml")]
    if not recipes:
        return AnalysisInputs(None, sources, overrides)
    if len(sources) > 1:
        raise DmstabError(
            f"give one recipe or trained models (run ids, checkpoints), not {' and '.join(sources)}"
        )
    recipe = load_recipe(recipes[0], overrides)
    if will_write:
        check_analysis_writable(recipe)  # the recipe's training checks its own train.out_dir
    return AnalysisInputs(recipe, (), overrides)


def subjects_for(
    inputs: AnalysisInputs,
    *,
    progress: Progress | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> list[Subject]:
    """The recipe's trained model, or each source's (the latest training run for none)."""
    if inputs.recipe is not None:
        recipe = inputs.recipe
        return [trained_subject(recipe, label=recipe.name, progress=progress, on_sample=on_sample)]
    return [load_subject(source, inputs.overrides) for source in inputs.sources or (None,)]


def subjects_from_arguments(arguments: Sequence[str]) -> list[Subject]:
    """The models an analysis command's arguments name, trained first where a recipe says so."""
    inputs = parse_inputs(arguments)
    return subjects_for(inputs, progress=TrainProgress(), on_sample=SampleProgress("sample"))
