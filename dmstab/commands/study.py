"""What the analysis commands share: their MLflow run and local folder, and the trained
network with its fixed-batch losses."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from dmstab.analysis.fixed_batch import FixedBatch, diffusion_losses, fixed_batch
from dmstab.analysis.hessian import Loss
from dmstab.commands.subjects import ANALYSES_DIR, Subject, check_analysis_writable
from dmstab.config import Recipe
from dmstab.errors import DmstabError
from dmstab.models.gan import (
    GanLosses,
    GanPair,
    discriminator_from_state,
    gan_config,
    gan_losses,
    is_gan,
    seeded_latents,
)
from dmstab.tracking import TAG_PARENT, MlflowTracker, Tracker, tracked_run


class FixedBatchSettings(Protocol):
    """The keys `landscape:` and `hessian:` share."""

    @property
    def batch_size(self) -> int: ...
    @property
    def timesteps(self) -> tuple[int, ...]: ...
    @property
    def seed(self) -> int: ...
    @property
    def network(self) -> str: ...


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
    check_analysis_writable(group[0].recipe)
    tracker = MlflowTracker.start(group[0].recipe, kind=kind, extra_tags=tags)
    with tracked_run(tracker):
        assert tracker.run_id is not None
        directory = ANALYSES_DIR / kind / tracker.run_id
        directory.mkdir(parents=True, exist_ok=True)
        yield AnalysisRun(tracker, tracker.run_id, directory)


def analysis_losses(
    subject: Subject, device: torch.device, settings: FixedBatchSettings
) -> tuple[nn.Module, dict[str, Loss]]:
    """The network whose weights the analysis moves, on `device`, and its fixed-batch losses:
    a DM's trained (raw, not EMA) network with the t-averaged and per-t losses, or a GAN's
    `settings.network` with its own loss, the other network fixed."""
    recipe = subject.recipe
    batch = fixed_batch(recipe, settings.batch_size, settings.seed, device)
    if not is_gan(recipe):
        model = subject.network(device, use_ema=False)
        losses = diffusion_losses(
            recipe,
            subject.num_classes,
            batch,
            settings.timesteps,
            seed=settings.seed,
            step=subject.step,
        )
        return model, losses
    if settings.timesteps:
        raise DmstabError("timesteps are for diffusion models; a GAN's loss has none")
    pair = _gan_pair(subject, device)
    both = _gan_loss_function(subject.recipe, batch, settings.seed)
    if settings.network == "generator":
        return pair.generator, {"generator": lambda g: both(g, pair.discriminator).generator}
    return pair.discriminator, {"discriminator": lambda d: both(pair.generator, d).discriminator}


def interpolation_losses(
    subject: Subject, device: torch.device, settings: FixedBatchSettings
) -> tuple[nn.Module, dict[str, Loss]]:
    """What moves along θ(α): a DM's network with its losses, or a GAN's two networks
    together (`GanPair`) with the generator's and the discriminator's loss."""
    if not is_gan(subject.recipe):
        return analysis_losses(subject, device, settings)
    batch = fixed_batch(subject.recipe, settings.batch_size, settings.seed, device)
    both = _gan_loss_function(subject.recipe, batch, settings.seed)

    def of_pair(module: nn.Module) -> GanLosses:
        assert isinstance(module, GanPair)
        return both(module.generator, module.discriminator)

    return _gan_pair(subject, device), {
        "generator": lambda module: of_pair(module).generator,
        "discriminator": lambda module: of_pair(module).discriminator,
    }


def trained_weights(subject: Subject) -> dict[str, Tensor]:
    """The raw trained weights in the layout `interpolation_losses` moves."""
    weights = subject.state.get("model")
    if not isinstance(weights, dict):
        raise DmstabError(f"checkpoint {subject.checkpoint} has no model weights")
    if not is_gan(subject.recipe):
        return weights
    discriminator = discriminator_from_state(subject.state, subject.recipe, subject.checkpoint)
    return {
        **{f"generator.{k}": v for k, v in weights.items()},
        **{f"discriminator.{k}": v for k, v in discriminator.state_dict().items()},
    }


def _gan_pair(subject: Subject, device: torch.device) -> GanPair:
    """The checkpoint's raw generator and its discriminator, in eval mode (batch-norm running
    statistics, no spectral-norm power iteration: the losses are functions of the weights)."""
    generator = subject.network(device, use_ema=False)
    discriminator = discriminator_from_state(subject.state, subject.recipe, subject.checkpoint)
    return GanPair(generator, discriminator.to(device)).eval()


def _gan_loss_function(
    recipe: Recipe, batch: FixedBatch, seed: int
) -> Callable[[nn.Module, nn.Module], GanLosses]:
    """(generator, discriminator) → both GAN losses on the fixed real batch and the fixed z of
    images 0…B−1 for `seed` (fakes get the real batch's labels)."""
    z = seeded_latents(recipe, 0, batch.x0.shape[0], seed).to(batch.x0.device)

    def losses(generator: nn.Module, discriminator: nn.Module) -> GanLosses:
        return gan_losses(
            generator, discriminator, batch.x0, batch.labels, z, gan_config(recipe).loss
        )

    return losses
