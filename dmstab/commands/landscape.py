"""`dmstab landscape`: loss surfaces around one trained model (AAAI Fig. 2) and the loss along
the line between two checkpoints (Fig. 3), on a fixed batch with fixed noise and timesteps.

- Surface: L(θ + x·d1 + y·d2) over [−span, span]² for two random directions normalised per
  filter (or per layer, `landscape.norm`) with biases and norm layers zeroed ("biasbn", Li et
  al. 2018).
- Interpolation: L(α·θa + (1 − α)·θb) for α on [alpha_min, alpha_max], θb the earlier
  checkpoint (the paper's epoch 10) and θa the later (epoch 100).

Both use the trained (raw, not EMA) weights, every loss of `dmstab.analysis.fixed_batch`, and
one MLflow run of kind "landscape" with the figures and the raw grids as `.npz`. Under
`torchrun` the grid points (or αs) are split over the ranks, each evaluating its own on the
whole batch; rank 0 gathers them, logs and prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmstab.analysis.fixed_batch import metric_name
from dmstab.analysis.landscape import (
    LandscapeGrid,
    interpolation_curve,
    random_direction,
    save_landscape,
    surface,
)
from dmstab.analysis.landscape_metrics import (
    LandscapeConfig,
    check_landscape,
    curve_metrics,
    surface_metrics,
)
from dmstab.commands.study import (
    AnalysisRun,
    analysis_losses,
    counted_progress,
    interpolation_losses,
    join_ranks,
    open_ranked_analysis,
    trained_weights,
)
from dmstab.commands.subjects import Subject, subjects_from_arguments
from dmstab.config import ANALYSES
from dmstab.console import console
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError
from dmstab.plots import interpolation_figure, surface_figure
from dmstab.tracking import browse_hint, save_figure

SURFACE_FILE = "surface.npz"
INTERPOLATION_FILE = "interpolation.npz"


@dataclass(frozen=True)
class LandscapeResult:
    run_id: str
    grid: LandscapeGrid
    path: Path


def loss_surface(
    subject: Subject, device: torch.device, context: DistributedContext = SINGLE_PROCESS
) -> LandscapeResult | None:
    """The 2D surface of every fixed-batch loss around `subject`, along filter- or
    layer-normalised random directions (`landscape.norm`); under `context` the grid points
    are split over the ranks and rank 0 logs and returns the result (the others None)."""
    config = subject.recipe.analysis(LandscapeConfig)
    axis = np.linspace(-config.span, config.span, config.points)
    with open_ranked_analysis(subject, "landscape", context) as run:
        model, losses = analysis_losses(subject, device, config)
        generator = torch.Generator().manual_seed(config.seed)
        directions = (
            random_direction(model, generator, norm=config.norm),
            random_direction(model, generator, norm=config.norm),
        )
        values = {
            name: surface(
                model,
                loss,
                directions,
                axis,
                axis,
                counted_progress(f"landscape {name} points", run),
                context,
            )
            for name, loss in losses.items()
        }
        if run is None:
            return None
        metadata = {
            "checkpoint": str(subject.checkpoint),
            "step": subject.step,
            "ignore": "biasbn",
            "norm": config.norm,
        }
        grid = LandscapeGrid(axis, axis, values, {**metadata, "seed": config.seed})
        run.tracker.log_metrics(surface_metrics(grid), subject.step)
        for name, array in values.items():
            title = f"{subject.label}, {name} (step {subject.step})"
            figure = surface_figure(axis, axis, array, title)
            save_figure(run.tracker, figure, f"landscape/surface_{metric_name(name)}.png")
        path = _log_grid(run, grid, SURFACE_FILE)
    return LandscapeResult(run.run_id, grid, path)


def interpolation(
    start: Subject,
    end: Subject,
    device: torch.device,
    context: DistributedContext = SINGLE_PROCESS,
) -> LandscapeResult | None:
    """Every fixed-batch loss along θ(α) = α·θa + (1 − α)·θb, θb = `start`, θa = `end`; under
    `context` the αs are split over the ranks and rank 0 logs and returns the result."""
    config = end.recipe.analysis(LandscapeConfig)
    alphas = np.linspace(config.alpha_min, config.alpha_max, config.alphas)
    with open_ranked_analysis([start, end], "landscape", context) as run:
        model, losses = interpolation_losses(end, device, config)
        weights_a, weights_b = trained_weights(end), trained_weights(start)
        progress = counted_progress("interpolation alphas", run)
        curves = interpolation_curve(model, weights_a, weights_b, alphas, losses, progress, context)
        if run is None:
            return None
        metadata = {
            "theta_b": str(start.checkpoint),
            "theta_a": str(end.checkpoint),
            "steps": [start.step, end.step],
            "seed": config.seed,
        }
        grid = LandscapeGrid(alphas, None, curves, metadata)
        run.tracker.log_metrics(curve_metrics(alphas, curves), end.step)
        title = f"{start.label} (α=0) → {end.label} (α=1)"
        save_figure(
            run.tracker, interpolation_figure(alphas, curves, title), "landscape/interpolation.png"
        )
        path = _log_grid(run, grid, INTERPOLATION_FILE)
    return LandscapeResult(run.run_id, grid, path)


def _log_grid(run: AnalysisRun, grid: LandscapeGrid, filename: str) -> Path:
    path = save_landscape(grid, run.directory / filename)
    run.tracker.log_artifact(path, "landscape")
    return path


def main(arguments: Sequence[str]) -> dict[str, Any] | None:
    """A 2D surface around one model, or the 1D loss between two checkpoints (given, or kept by
    the run at `landscape.interpolate`); the summary `--json` prints returned (None on
    torchrun's ranks other than 0)."""
    subjects = subjects_from_arguments(arguments)
    if len(subjects) > 2:
        raise DmstabError(
            f"dmstab landscape reads one model or two checkpoints; got {len(subjects)}"
        )
    last = subjects[-1]
    steps = last.recipe.analysis(LandscapeConfig).interpolate
    if len(subjects) == 1 and steps:
        subjects = [last.kept(steps[0]), last.kept(steps[1])]
    device, context = join_ranks(last.recipe)
    if len(subjects) == 2:
        result = interpolation(subjects[0], subjects[1], device, context)
    else:
        result = loss_surface(last, device, context)
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    kind = "surface" if result.grid.ys is not None else "interpolation"
    console.print(f"[green]done[/] loss {kind} of {last.label}: {', '.join(result.grid.values)}")
    console.print(f"  run     {result.run_id}")
    console.print(f"  arrays  {result.path}")
    console.print(f"  browse  {browse_hint(last.recipe.tracking.uri)}")
    return {
        "run_id": result.run_id,
        "kind": kind,
        "arrays": str(result.path),
        "losses": list(result.grid.values),
    }


ANALYSES.register(LandscapeConfig.section, main, config=LandscapeConfig, check=check_landscape)
