"""What dmstab's MLflow logging costs a training step, against the step itself.

The logging side is `MlflowTracker.log_metrics` as the training loop calls it: the metric set
of a logged window of the recipe (renamed by `MetricNames`, CLTS's own metrics included), once
per step for `train.log_every: 1`, buffered and sent with `log_batch` every
`tracking.flush_every` steps into a real MLflow SQLite store in a temporary folder. One timed
call is one flush window (`flush_every` steps, one flush), reported per step, so the flush is
paid in full, not hidden by a median. The other side is one step of the bare training loop of
the same recipe (benchmarks.train_step), interleaved with it.

Target (issue 17): logging at most 1% of the step.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import Comparison, SideTimer, Size, describe_device, tracked_overrides
from benchmarks.train_step import RECIPES, BareLoop
from dmstab.config import Recipe, load_recipe
from dmstab.diffusion.objectives import build_objective
from dmstab.tracking import MlflowTracker, tracked_run
from dmstab.train.metric_names import MetricNames


@dataclass(frozen=True)
class Setup:
    recipe: str
    overrides: tuple[str, ...]
    warmup: int
    repeats: int  # timed flush windows (and as many timed training steps)


SIZES: dict[Size, Setup] = {
    "toy": Setup(
        "quickstart.yaml",
        (
            "data.synthetic_size=64",
            "data.resolution=8",
            "model.channel_mult=[1]",
            "train.batch_size=4",
            "tracking.flush_every=5",
        ),
        1,
        3,
    ),
    "cpu": Setup("quickstart.yaml", ("data.synthetic_size=512",), 2, 12),
    "full": Setup("cifar10_clts.yaml", ("data.name=synthetic", "model.learn_sigma=false"), 2, 12),
}


def window_metrics(recipe: Recipe, step: int) -> tuple[dict[str, float], dict[str, str]]:
    """What the loop logs for one window ending at `step`: the trainer's terms, throughput,
    lr, kimg and the objective's metrics, under their MLflow names (and the constants' tags)."""
    window = {"loss": 0.1, "mse": 0.1, "loss_weight": 1.0, "grad_norm": 1.5}
    window["images_per_s"] = 200.0
    window["lr"] = recipe.optim.lr
    window["kimg"] = step * recipe.train.batch_size / 1000
    window.update(build_objective(recipe, 10).metrics(step))
    return MetricNames(recipe).tracked(window)


def run(size: Size, device: torch.device) -> list[Comparison]:
    setup = SIZES[size]
    with tempfile.TemporaryDirectory() as folder:
        overrides = [*setup.overrides, *tracked_overrides(Path(folder), device)]
        recipe = load_recipe(RECIPES / setup.recipe, overrides)
        every = recipe.tracking.flush_every
        metrics, tags = window_metrics(recipe, 1)
        bare = BareLoop(recipe, device)
        logging = SideTimer("dmstab MLflow logging", device)
        training = SideTimer("training step (bare loop)", device)
        tracker = MlflowTracker.start(recipe, kind="train")
        step = 0
        with tracked_run(tracker):
            tracker.set_tags(tags)
            for round_ in range(setup.warmup + setup.repeats):
                record = round_ >= setup.warmup
                logging.begin()
                for _ in range(every):
                    step += 1
                    metrics["train/kimg"] = step * recipe.train.batch_size / 1000
                    tracker.log_metrics(metrics, step)
                logging.end(calls=every, record=record)
                training.begin()
                bare.step()
                training.end(record=record)
    comparison = Comparison(
        benchmark="mlflow",
        title=f"MLflow logging per step, {recipe.name}",
        config={
            "recipe": setup.recipe,
            "overrides": list(setup.overrides),
            "metrics_per_step": len(metrics),
            "flush_every": every,
            "store": "sqlite",
            "unit": "seconds per training step",
        },
        device=describe_device(device),
        sides=[logging.result(), training.result()],
        subject=logging.name,
        baseline=training.name,
        target="≤ 1% of a step",
        checks={"metric_names": sorted(metrics)},
    )
    comparison.met = comparison.ratio <= 0.01
    return [comparison]
