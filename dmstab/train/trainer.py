"""The diffusion trainer: one optimiser step of a recipe's objective, under DDP when launched
by torchrun, with EMA, power EMAs and the loss guard. Every draw of step k is seeded by
(train.seed, k) for the whole global batch (dmstab.train.loop explains why).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dmstab.config import (
    Recipe,
)
from dmstab.data import ImageDataset, build_dataset, resident
from dmstab.devices import upload
from dmstab.diffusion.objectives import (
    DDPMObjective,
    Draws,
    EDMObjective,
    build_objective,
    take_rows,
)
from dmstab.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    split_batch,
)
from dmstab.errors import DmstabError
from dmstab.models import build_model, count_parameters
from dmstab.train.common import (
    EpochOrder,
    autocast,
    checkpoint_part,
    common_state,
    ema_copy,
    load_common_state,
    step_seed,
    switched_on,
)
from dmstab.train.ema import EMA
from dmstab.train.loss_guard import LossGuard
from dmstab.train.optim import build_optimizer, gradient_norm, learning_rate, masked_step
from dmstab.train.power_ema import PowerEMA


@dataclass(frozen=True)
class _RankBatch:
    """This rank's rows of a step's global batch, with the draws of the whole batch."""

    x0: Tensor
    labels: Tensor | None
    noise: Tensor
    draws: Draws  # this rank's rows
    global_draws: Draws


class _RowLosses(nn.Module):
    """The objective's per-sample terms as one forward, so DDP sees every parameter it uses."""

    def __init__(self, model: nn.Module, objective: DDPMObjective | EDMObjective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(
        self, x0: Tensor, labels: Tensor | None, noise: Tensor, draws: Draws, step: int
    ) -> dict[str, Tensor]:
        return self.objective.terms(self.model, x0, labels, noise, draws, step)


class Trainer:
    """The objects a recipe builds, and one training step over them (on this rank's rows)."""

    def __init__(
        self, recipe: Recipe, device: torch.device, context: DistributedContext = SINGLE_PROCESS
    ) -> None:
        self.recipe = recipe
        self.device = device
        self.context = context
        self.split = split_batch(recipe.train.batch_size, recipe.train.micro_batch_size, context)
        self.dataset: ImageDataset = resident(build_dataset(recipe.data), device)
        if recipe.model.class_cond and self.dataset.num_classes < 1:
            raise DmstabError("model.class_cond is true but the dataset has no labels")
        torch.manual_seed(recipe.train.seed)
        self.model: nn.Module = build_model(recipe, self.dataset.num_classes).to(device)
        if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            self.model.to(memory_format=torch.channels_last)
        self.objective = build_objective(recipe, self.dataset.num_classes)
        self.row_losses: nn.Module = _RowLosses(self.model, self.objective)
        if switched_on(recipe.train.compile, device):  # the training forward; `model` stays eager
            self.row_losses.compile()
        if context.active:  # gradients averaged over ranks in backward
            ids = [device.index] if device.type == "cuda" else None
            self.row_losses = DistributedDataParallel(self.row_losses, device_ids=ids)
        self.guard = LossGuard(recipe.train)
        self.optimizer = build_optimizer(
            self.model, recipe.optim, switched_on(recipe.train.fused, device)
        )
        self.ema = EMA(self.model, recipe.ema.rate, recipe.ema.warmup)
        sigma_rels = recipe.ema.power_sigma_rels
        self.power_ema = PowerEMA(self.model, sigma_rels) if sigma_rels else None
        self.order = EpochOrder(len(self.dataset), recipe.train.seed)
        self.step = 0

    def state_dict(self, run_id: str) -> dict[str, object]:
        return {
            **common_state(self, run_id),
            "power_ema": self.power_ema.state_dict() if self.power_ema else None,
            "objective": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        load_common_state(self, state)
        if self.power_ema is not None:
            self.power_ema.load_state_dict(checkpoint_part(state, "power_ema"))
        try:
            self.objective.load_state_dict(checkpoint_part(state, "objective"))
        except ValueError as exc:
            raise DmstabError(f"checkpoint's objective state does not fit: {exc}") from None

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step, or a skipped one (`self.guard.last_accept`, see LossGuard);
        returns the global batch's mean terms and gradient norm, detached, on the device.

        Nothing here waits for the device: the guard's verdict is a tensor that masks the
        optimiser, EMA and sampler updates (docs/performance.md)."""
        self.step += 1
        recipe = self.recipe
        seed = step_seed(recipe.train.seed, self.step)
        torch.manual_seed(seed)  # dropout: differs with the world size (docs/distributed.md)
        batch = self._rank_batch(seed)
        lr = learning_rate(recipe.optim, self.step, recipe.train.batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._accumulate_gradients(batch)
        out = {key: value.mean() for key, value in terms.items()}
        accept = self.guard.judge(self.step, out["loss"])  # same verdict on every rank
        self.objective.learn(batch.global_draws, terms, accept)
        out["grad_norm"] = gradient_norm(self.model, recipe.optim.grad_clip)
        masked_step(self.optimizer, accept)
        self.ema.update(self.model, accept)
        if self.power_ema is not None:  # its profile (EDM2 Eq. 2) counts every step, skipped too
            self.power_ema.update(self.model, self.step)
        return out

    def _rank_batch(self, seed: int) -> _RankBatch:
        """Step `self.step`'s draws for the whole global batch, and this rank's rows of it."""
        recipe, device, rows = self.recipe, self.device, self.split.rows
        generator = torch.Generator().manual_seed(seed)
        indices = self.order.batch(self.step, recipe.train.batch_size)
        x0, labels = self.dataset.get_batch(indices[rows.start : rows.stop])
        x0, labels = upload(x0, device), upload(labels, device)
        if recipe.data.hflip:
            flip = (torch.rand(len(indices), generator=generator) < 0.5)[rows.start : rows.stop]
            flip = upload(flip, device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise_generator = torch.Generator(device=device).manual_seed(seed)
        shape = (len(indices), *x0.shape[1:])
        noise = torch.randn(shape, generator=noise_generator, device=device)
        drawn = self.objective.draw(len(indices), self.step, generator)
        global_draws = {key: upload(value, device) for key, value in drawn.items()}
        return _RankBatch(
            x0=x0,
            labels=labels if recipe.model.class_cond else None,
            noise=noise[rows.start : rows.stop],
            draws=take_rows(global_draws, rows),
            global_draws=global_draws,
        )

    def _accumulate_gradients(self, batch: _RankBatch) -> dict[str, Tensor]:
        """Gradients of the global batch's mean loss, and its per-sample terms in batch order.

        Each micro-batch adds the gradient of (sum of its losses) / (rows of this rank); DDP
        averages over ranks in the last micro-batch's backward, giving the global mean.
        """
        parts: list[dict[str, Tensor]] = []
        micro_batches = self.split.micro_batches()
        for index, rows in enumerate(micro_batches):
            with self._gradient_sync(index == len(micro_batches) - 1):
                with autocast(self.device, self.recipe.train.precision):
                    terms = self.row_losses(
                        batch.x0[rows.start : rows.stop],
                        None if batch.labels is None else batch.labels[rows.start : rows.stop],
                        batch.noise[rows.start : rows.stop],
                        take_rows(batch.draws, rows),
                        self.step,
                    )
                (terms["loss"].sum() / len(self.split.rows)).backward()
            parts.append({key: value.detach() for key, value in terms.items()})
        rank_terms = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        return {key: self.context.all_gather_cat(value) for key, value in rank_terms.items()}

    def _gradient_sync(self, last_micro_batch: bool) -> AbstractContextManager[object]:
        """DDP's all-reduce only in the last micro-batch's backward (`no_sync` before it)."""
        if isinstance(self.row_losses, DistributedDataParallel) and not last_micro_batch:
            return self.row_losses.no_sync()
        return nullcontext()

    def ema_model(self) -> nn.Module:
        return ema_copy(self.model, self.ema, self.device)

    def parameter_counts(self) -> dict[str, int]:
        return {"parameters": count_parameters(self.model)}

    def objective_metrics(self, step: int) -> dict[str, float]:
        return self.objective.metrics(step)

    def ddpm_objective(self) -> DDPMObjective | None:
        """The objective when it draws DDPM timesteps (for their histogram)."""
        return self.objective if isinstance(self.objective, DDPMObjective) else None
