"""The fixed-batch losses the landscape and Hessian analyses read (AAAI Figs. 2–4).

Each loss is a deterministic function of the weights: one seeded batch of the run's training
data, seeded noise and seeded timesteps (or σ), all resident on the analysis device. A DM gets
the loss averaged over timesteps ("mean": one uniform t per sample, or the objective's own σ
draws for EDM) and, for DDPM, one loss per chosen timestep ("t=<t>", the paper's per-t panels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

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
) -> dict[str, Loss]:
    """ "mean" (timesteps drawn once, uniformly, per sample) and one loss per DDPM timestep;
    `step` is the training iteration a step-dependent loss weighting is read at."""
    objective = build_objective(recipe, num_classes)
    generator = torch.Generator().manual_seed(seed + 1)
    rows = batch.x0.shape[0]
    draws: Draws
    if isinstance(objective, DDPMObjective):
        steps = objective.diffusion.num_timesteps
        draws = {"t": torch.randint(0, steps, (rows,), generator=generator)}
    else:
        if timesteps:
            raise DmstabError("per-timestep analyses need a DDPM recipe (EDM draws σ, not t)")
        draws = objective.draw(rows, step, generator)
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
