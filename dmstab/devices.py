"""Where computations run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's CPU kernels on one thread for the block: float sums in a fixed order (kernels
    split work differently per thread count), and no thread-pool hand-off for thousands of
    microsecond operations, which costs more than they do on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` without waiting for the device: a CPU tensor bound for CUDA goes
    through pinned memory, non-blocking (no stream synchronisation)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
