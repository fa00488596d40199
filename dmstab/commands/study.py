"""What the analysis commands share: their MLflow run and local folder, and the trained
network with its fixed-batch losses.

Under `torchrun` every rank runs the analysis and rank 0 alone owns the MLflow run and writes
the files (`open_ranked_analysis`); the Hessian's fixed batch is sharded over the ranks
(`analysis_losses` with a context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from dmstab.analysis.fixed_batch import FixedBatch, ShareOfMean, diffusion_losses, fixed_batch
from dmstab.analysis.hessian import Loss
from dmstab.commands.subjects import ANALYSES_DIR, Subject, check_analysis_writable
from dmstab.config import Recipe
from dmstab.console import CountedProgress
from dmstab.devices import pick_device
from dmstab.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    ctrl_c_ends_on_rank_zero,
    init_distributed,
    rank_device,
)
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


@contextmanager
def open_ranked_analysis(
    subjects: Subject | Sequence[Subject],
    kind: str,
    context: DistributedContext,
    check: Callable[[], None] = lambda: None,
) -> Iterator[AnalysisRun | None]:
    """`open_analysis` on rank 0 of `context`, None on the other ranks (they own no MLflow run
    and write no file). First every rank runs `check` (the analysis's own inputs) and rank 0
    checks its outputs, and the ranks agree on the outcome (`decide_together`): a wrong input
    is the same one line on every rank. A run that cannot be opened stops every rank
    (`from_main`); Ctrl-C ends it as it ends training (`ctrl_c_ends_on_rank_zero`)."""
    first = subjects if isinstance(subjects, Subject) else subjects[0]

    def inputs() -> None:
        check()
        if context.is_main:
            check_analysis_writable(first.recipe)

    context.decide_together(inputs)
    with ExitStack() as stack:
        run = context.from_main(lambda: stack.enter_context(open_analysis(subjects, kind)))
        with ctrl_c_ends_on_rank_zero(context):
            yield run


def counted_progress(label: str, run: AnalysisRun | None) -> CountedProgress | None:
    """A progress line for `label` on the rank that owns the run (None on the others)."""
    return None if run is None else CountedProgress(label)


def join_ranks(recipe: Recipe) -> tuple[torch.device, DistributedContext]:
    """The device this process analyses on and its place among `torchrun`'s ranks (one process
    without torchrun): NCCL and GPU LOCAL_RANK on CUDA, gloo on the CPU."""
    device = pick_device(recipe.train.device)
    context = init_distributed(device.type)
    return rank_device(device, context), context


def analysis_losses(
    subject: Subject,
    device: torch.device,
    settings: FixedBatchSettings,
    context: DistributedContext = SINGLE_PROCESS,
) -> tuple[nn.Module, dict[str, Loss]]:
    """The network whose weights the analysis moves, on `device`, and its fixed-batch losses:
    a DM's trained (raw, not EMA) network with the t-averaged and per-t losses, or a GAN's
    `settings.network` with its own loss, the other network fixed. Under `context` each
    rank's losses are its share of the whole batch's (`ShareOfMean` over `context.shard`)."""
    recipe = subject.recipe
    batch = fixed_batch(recipe, settings.batch_size, settings.seed, device)
    if len(batch) < context.world_size:  # a dataset smaller than the batch: fewer rows
        raise DmstabError(
            f"the fixed batch has {len(batch)} rows, fewer than the {context.world_size} ranks"
        )
    share = context.shard(len(batch))
    model, losses = _mean_losses_over(subject, device, settings, batch, share)
    return model, {name: ShareOfMean(loss, len(share), len(batch)) for name, loss in losses.items()}


def _mean_losses_over(
    subject: Subject,
    device: torch.device,
    settings: FixedBatchSettings,
    batch: FixedBatch,
    share: range,
) -> tuple[nn.Module, dict[str, Loss]]:
    """`analysis_losses` as means over the rows `share` of `batch`."""
    recipe = subject.recipe
    if not is_gan(recipe):
        model = subject.network(device, use_ema=False)
        losses = diffusion_losses(
            recipe,
            subject.num_classes,
            batch,
            settings.timesteps,
            seed=settings.seed,
            step=subject.step,
            share=share,
        )
        return model, losses
    if settings.timesteps:
        raise DmstabError("timesteps are for diffusion models; a GAN's loss has none")
    pair = _gan_pair(subject, device)
    both = _gan_loss_function(subject.recipe, batch.rows(share), settings.seed, share.start)
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
    recipe: Recipe, batch: FixedBatch, seed: int, first: int = 0
) -> Callable[[nn.Module, nn.Module], GanLosses]:
    """(generator, discriminator) → both GAN losses on the fixed real batch and the fixed z of
    images first…first+B−1 for `seed` (fakes get the real batch's labels)."""
    z = seeded_latents(recipe, first, len(batch), seed).to(batch.x0.device)

    def losses(generator: nn.Module, discriminator: nn.Module) -> GanLosses:
        return gan_losses(
            generator, discriminator, batch.x0, batch.labels, z, gan_config(recipe).loss
        )

    return losses
