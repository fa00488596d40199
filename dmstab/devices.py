"""Where computations run."""

from __future__ import annotations

import torch

from dmstab.errors import DmstabError


def pick_device(name: str) -> torch.device:
    """The recipe's device; on CPU, denormal floats are flushed to zero for this process.

    EDM2's magnitude-preserving layers produce denormal intermediates that x86 CPUs handle in
    microcode: flushing them makes a CPU training step about 5x faster (docs/performance.md),
    and changes no value above ~1e-38.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise DmstabError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        torch.set_flush_denormal(True)
    return torch.device(name)
