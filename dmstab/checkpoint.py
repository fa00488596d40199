"""Checkpoints: written to a temporary file then renamed; read back weights-only."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmstab.atomic import write_atomically
from dmstab.errors import DmstabError

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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with `weights_only=True`; anything unreadable is a one-line user error."""
    if not path.is_file():
        raise DmstabError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported GLOBAL (\S+)", str(exc), re.IGNORECASE)
        what = f"it references {found.group(1)}" if found else "corrupt or not a torch file"
        raise DmstabError(f"checkpoint {path} refused by weights-only loading: {what}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise DmstabError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise DmstabError(f"{path} is not a dmstab checkpoint (no 'model' entry)")
    return state
