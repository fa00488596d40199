"""The fixed-batch losses the landscape and Hessian analyses read (AAAI Figs. 2–4).

Each loss is a deterministic function of the weights: one seeded batch of the run's training
data, seeded noise and seeded timesteps (or σ), all resident on the analysis device. A DM gets
the loss averaged over timesteps ("mean": one uniform t per sample, or the objective's own σ
draws for EDM) and, for DDPM, one loss per chosen timestep ("t=<t>", the paper's per-t panels).

Under `torchrun` the Hessian analysis shards the batch: every rank draws the whole batch, noise
and timesteps from the same seeds and keeps its contiguous rows (`FixedBatch.rows`); its loss
is its rows' mean times their share of the batch (`ShareOfMean`), so the ranks' losses, and
their gradients and Hessian-vector products, add up to the whole batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dmstab.analysis.hessian import Loss
from dmstab.analysis.landscape import FixedBatchLoss, per_timestep_losses
from dmstab.config import Recipe
from dmstab.data import build_dataset
from dmstab.diffusion.objectives import DDPMObjective, Draws, build_objective
from dmstab.errors import DmstabError

MEAN_LOSS = "mean"
GanNetwork = Literal["generator", "discriminator"]  # whose weights move, for a GAN


def check_fixed_batch_keys(
    recipe: Recipe, section: str, batch_size: int, timesteps: Sequence[int]
) -> None:
    """An analysis section's fixed batch: at least one row, timesteps inside [0, T)."""
    if batch_size < 1:
        raise DmstabError(f"{section}.batch_size must be at least 1")
    T = recipe.diffusion.steps
    if not all(0 <= t < T for t in timesteps):
        raise DmstabError(
            f"{section}.timesteps {list(timesteps)} must lie in [0, diffusion.steps={T})"
        )


@dataclass(frozen=True, eq=False)
class FixedBatch:
    """Training images (and labels) drawn once by seed, and Gaussian noise of their shape."""

    x0: Tensor
    labels: Tensor | None
    noise: Tensor

    def __len__(self) -> int:
        return self.x0.shape[0]

    def rows(self, share: range) -> FixedBatch:
        """The rows in `share` (one rank's contiguous share of the batch)."""
        pick = slice(share.start, share.stop)
        labels = None if self.labels is None else self.labels[pick]
        return FixedBatch(self.x0[pick], labels, self.noise[pick])


@dataclass(frozen=True)
class ShareOfMean:
    """One rank's part of a loss that is a mean over the fixed batch's rows, computed on its
    `rows` of the `total`: their mean times rows/total (the sum of its rows' terms over the
    whole batch's count), so the ranks' parts add up to the whole batch's mean. One process
    holds every row and its factor is exactly 1."""

    loss: Loss
    rows: int
    total: int

    def __call__(self, model: nn.Module) -> Tensor:
        return self.loss(model) * (self.rows / self.total)


def check_shardable(section: str, batch_size: int, ranks: int) -> None:
    """Every one of `ranks` ranks needs at least one row of the fixed batch."""
    if batch_size < ranks:
        raise DmstabError(
            f"{section}.batch_size={batch_size} cannot be shared by {ranks} ranks; "
            f"use at least {ranks} rows or fewer processes"
        )


def fixed_batch(recipe: Recipe, size: int, seed: int, device: torch.device) -> FixedBatch:
    """`size` distinct training images chosen by `seed` (fewer if the dataset is smaller)."""
    dataset = build_dataset(recipe.data)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:size]
    x0, labels = dataset.get_batch(indices)
    noise = torch.randn(x0.shape, generator=generator)
    return FixedBatch(
        x0.to(device),
        labels.to(device) if recipe.model.class_cond else None,
        noise.to(device),
    )


def diffusion_losses(
    recipe: Recipe,
    num_classes: int,
    batch: FixedBatch,
    timesteps: Sequence[int],
    *,
    seed: int,
    step: int,
    share: range | None = None,
) -> dict[str, Loss]:
    """ "mean" (timesteps drawn once, uniformly, per sample) and one loss per DDPM timestep;
    `step` is the training iteration a step-dependent loss weighting is read at. With `share`,
    the losses of those rows only (the mean over them), drawn as for the whole batch."""
    objective = build_objective(recipe, num_classes)
    generator = torch.Generator().manual_seed(seed + 1)
    rows = len(batch)
    draws: Draws
    if isinstance(objective, DDPMObjective):
        steps = objective.diffusion.num_timesteps
        draws = {"t": torch.randint(0, steps, (rows,), generator=generator)}
    else:
        if timesteps:
            raise DmstabError("per-timestep analyses need a DDPM recipe (EDM draws σ, not t)")
        draws = objective.draw(rows, step, generator)
    if share is not None:
        batch = batch.rows(share)
        draws = {key: value[share.start : share.stop] for key, value in draws.items()}
    losses: dict[str, Loss] = {
        MEAN_LOSS: FixedBatchLoss(objective, batch.x0, batch.labels, batch.noise, (draws,), step)
    }
    if timesteps:
        losses.update(
            per_timestep_losses(
                objective, batch.x0, batch.labels, batch.noise, timesteps, step=step
            )
        )
    return losses


def metric_name(loss_name: str) -> str:
    """A loss name as an MLflow metric key segment ("t=100" -> "t100")."""
    return loss_name.replace("=", "")
