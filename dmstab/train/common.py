"""What every trainer shares: the `LoopTrainer` protocol the loop drives, step seeds, the
epoch order of batches, autocast, EMA copies and the common checkpoint entries.

The diffusion `Trainer` (dmstab.train.trainer) and the `GanTrainer` (dmstab.train.gan_trainer)
both build on these; the loop (dmstab.train.loop) takes either.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dmstab import __version__
from dmstab.config import (
    Recipe,
    to_dict,
)
from dmstab.data import ImageDataset
from dmstab.diffusion.objectives import (
    DDPMObjective,
)
from dmstab.distributed import (
    DistributedContext,
)
from dmstab.errors import DmstabError
from dmstab.train.ema import EMA
from dmstab.train.loss_guard import LossGuard
from dmstab.train.power_ema import PowerEMA


class LoopTrainer(Protocol):
    """What the loop needs of a trainer: a diffusion `Trainer` or a `GanTrainer`."""

    recipe: Recipe
    device: torch.device
    context: DistributedContext
    dataset: ImageDataset
    model: nn.Module  # the network that samples (a GAN's generator)
    ema: EMA
    optimizer: torch.optim.Optimizer  # its learning rate is logged
    guard: LossGuard
    power_ema: PowerEMA | None
    step: int

    def train_step(self) -> dict[str, Tensor]: ...
    def ema_model(self) -> nn.Module: ...
    def state_dict(self, run_id: str) -> dict[str, object]: ...
    def load_state_dict(self, state: dict[str, object]) -> None: ...
    def parameter_counts(self) -> dict[str, int]: ...
    def objective_metrics(self, step: int) -> dict[str, float]: ...
    def ddpm_objective(self) -> DDPMObjective | None: ...


def checkpoint_part(state: dict[str, object], key: str) -> dict[str, Any]:
    """The state dict a checkpoint holds under `key`; every dmstab checkpoint has each part."""
    value = state.get(key)
    if not isinstance(value, dict):
        raise DmstabError(f"checkpoint has no '{key}' state")
    return value


def load_common_state(trainer: LoopTrainer, state: dict[str, object]) -> None:
    """Restore what `common_state` saved; each trainer then restores its own entries."""
    step = state.get("step")
    if not isinstance(step, int):
        raise DmstabError("checkpoint has no integer 'step'")
    try:
        trainer.model.load_state_dict(checkpoint_part(state, "model"))
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise DmstabError(f"checkpoint does not fit this recipe's model: {first_line}") from None
    trainer.optimizer.load_state_dict(checkpoint_part(state, "optimizer"))
    trainer.ema.load_state_dict(checkpoint_part(state, "ema"))
    trainer.guard.load_state_dict(checkpoint_part(state, "loss_guard"))
    trainer.step = step


def common_state(trainer: LoopTrainer, run_id: str) -> dict[str, object]:
    """The checkpoint entries of every trainer; each adds its own (objective, discriminator)."""
    return {
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "loss_guard": trainer.guard.state_dict(),
        "step": trainer.step,
        "recipe": to_dict(trainer.recipe),
        "num_classes": trainer.dataset.num_classes,
        "run_id": run_id,
        "dmstab_version": __version__,
    }


def step_seed(seed: int, step: int) -> int:
    """Seed of every random draw made in training step `step` (1-based)."""
    return (seed * 1_000_003 + step) % (2**63)


class EpochOrder:
    """Shuffled passes over the dataset; the batch of step k depends only on (seed, k)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(step_seed(self.seed, -1 - epoch))
            self._perm = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        positions = torch.arange((step - 1) * batch_size, step * batch_size)
        epochs = positions // self.size
        out = torch.empty(batch_size, dtype=torch.long)
        for epoch in torch.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % self.size]
        return out


def switched_on(setting: bool | str, device: torch.device) -> bool:
    """A `train.compile` / `train.fused` value: `auto` means on CUDA."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def ema_copy(model: nn.Module, ema: EMA, device: torch.device) -> nn.Module:
    """A copy of `model` carrying the EMA weights."""
    copied = copy.deepcopy(model)
    copied.load_state_dict({k: v.to(device) for k, v in ema.shadow.items()})
    return copied
