"""What the analysis commands share: their MLflow run and local folder, and the trained
network with its fixed-batch losses."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from dmstab.analysis.fixed_batch import diffusion_losses, fixed_batch
from dmstab.analysis.hessian import Loss
from dmstab.analysis.subjects import Subject
from dmstab.tracking import TAG_PARENT, MlflowTracker, Tracker, tracked_run

ANALYSES_DIR = Path("analyses")


class FixedBatchSettings(Protocol):
    """The keys `landscape:` and `hessian:` share."""

    @property
    def batch_size(self) -> int: ...
    @property
    def timesteps(self) -> tuple[int, ...]: ...
    @property
    def seed(self) -> int: ...


@dataclass(frozen=True)
class AnalysisRun:
    """An analysis's MLflow run and the folder its raw arrays are written to."""

    tracker: Tracker
    run_id: str
    directory: Path


@contextmanager
def open_analysis(subjects: Subject | Sequence[Subject], kind: str) -> Iterator[AnalysisRun]:
    """A new MLflow run of `kind` with the first subject's recipe as params and every
    subject's checkpoint as a tag (a single subject's training run is the parent), and the
    folder analyses/KIND/RUN_ID; the run ends FINISHED, or FAILED when the body raises."""
    group = [subjects] if isinstance(subjects, Subject) else list(subjects)
    tags = {f"dmstab.checkpoint.{i}": str(s.checkpoint.resolve()) for i, s in enumerate(group)}
    if len(group) == 1 and group[0].run_id:
        tags[TAG_PARENT] = str(group[0].run_id)
    tracker = MlflowTracker.start(group[0].recipe, kind=kind, extra_tags=tags)
    with tracked_run(tracker):
        assert tracker.run_id is not None
        directory = ANALYSES_DIR / kind / tracker.run_id
        directory.mkdir(parents=True, exist_ok=True)
        yield AnalysisRun(tracker, tracker.run_id, directory)


def analysis_losses(
    subject: Subject, device: torch.device, settings: FixedBatchSettings
) -> tuple[nn.Module, dict[str, Loss]]:
    """The subject's trained (raw, not EMA) network on `device` and its fixed-batch losses."""
    model = subject.network(device, use_ema=False)
    recipe = subject.recipe
    batch = fixed_batch(recipe, settings.batch_size, settings.seed, device)
    losses = diffusion_losses(
        recipe,
        subject.num_classes,
        batch,
        settings.timesteps,
        seed=settings.seed,
        step=subject.step,
    )
    return model, losses
