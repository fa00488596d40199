"""Checkpoints: written to a temporary file then renamed; read back weights-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmstab.atomic import write_atomically
from dmstab.errors import DmstabError
from dmstab.reading import read_torch

CHECKPOINT_NAME = "checkpoint.pt"
KEPT_DIR = "checkpoints"  # train.keep_checkpoints: RUN_DIR/checkpoints/step_XXXXXXXX.pt


def kept_checkpoint(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is kept when `train.keep_checkpoints` names it."""
    return run_dir / KEPT_DIR / f"step_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """`torch.save` through `write_atomically`."""
    write_atomically(path, lambda handle: torch.save(state, handle))


def load_weights(model: nn.Module, weights: dict[str, Any], source: Path) -> nn.Module:
    """`weights` loaded into `model`, in eval mode; a mismatch is one line naming `source`."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise DmstabError(f"checkpoint {source} does not fit its recipe: {first_line}") from None
    return model.eval()


def load_checkpoint(path: Path, kind: str = "checkpoint", *, mmap: bool = False) -> dict[str, Any]:
    """A dictionary with a 'model' entry, loaded weights-only (`dmstab.reading`); `mmap` maps
    the tensors instead of reading them."""
    state: dict[str, Any] = read_torch(path, kind, required=("model",), mmap=mmap)
    return state
