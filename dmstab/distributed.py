"""The process group a command runs in: one process, or `torchrun`'s ranks (env:// rendezvous).

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them a
command runs as a single process and every collective below is the identity. Ranks talk over
NCCL when they train on CUDA and over gloo on CPU.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from dmstab.errors import DmstabError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the ranks of one command."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, snapshots, files and the MLflow run."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new tensor; `tensor` is left as it was)."""
        out = tensor.clone()
        if self.active:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 in rank order; shapes may differ in
        dim 0 only (each rank's rows are padded to the longest, then trimmed)."""
        if not self.active:
            return tensor
        rows = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = [torch.zeros_like(rows) for _ in range(self.world_size)]
        dist.all_gather(counts, rows)
        longest = int(max(int(c) for c in counts))
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([g[: int(c)] for g, c in zip(gathered, counts, strict=True)])

    def broadcast_object(self, value: object) -> object:
        """Rank 0's `value` on every rank (run ids, paths: small picklable things)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, compute: Callable[[], T]) -> T | None:
        """`compute()` run on rank 0 only (None elsewhere). When it fails there, every rank
        raises: rank 0 its own exception, the others a DmstabError or RuntimeError saying so."""
        if not self.active:
            return compute()
        value: T | None = None
        failure: Exception | None = None
        if self.is_main:
            try:
                value = compute()
            except Exception as exc:  # re-raised below, after the other ranks have been told
                failure = exc
        told = None if failure is None else (isinstance(failure, DmstabError), str(failure))
        shared = self.broadcast_object(told)
        if failure is not None:
            raise failure
        if isinstance(shared, tuple):
            user_error, message = shared
            raise DmstabError(message) if user_error else RuntimeError(f"rank 0: {message}")
        return value

    def decide_together(self, check: Callable[[], None]) -> None:
        """Run `check` (the user's inputs: files, weights, store) on every rank, then agree on
        the outcome before any rank goes on to a collective. When it failed anywhere, every
        rank raises the lowest failing rank's error (a DmstabError when that was one, so each
        exits 2 with the same line) instead of the others waiting for a rank that has left, up
        to the process group's 30-minute timeout. `check` may test some inputs on rank 0 only
        (`is_main`): what only rank 0 writes or reads."""
        failure: Exception | None = None
        try:
            check()
        except Exception as exc:  # re-raised below, after every rank has heard of it
            failure = exc
        if not self.active:
            if failure is not None:
                raise failure
            return
        told = None if failure is None else (isinstance(failure, DmstabError), str(failure))
        outcomes: list[object] = [None] * self.world_size
        dist.all_gather_object(outcomes, told)
        first = next(((rank, o) for rank, o in enumerate(outcomes) if isinstance(o, tuple)), None)
        if first is None:
            return
        rank, (user_error, message) = first
        if rank == self.rank and failure is not None:
            raise failure
        raise DmstabError(message) if user_error else RuntimeError(f"rank {rank}: {message}")

    def shard(self, count: int) -> range:
        """This rank's contiguous share of `count` items; shares differ in size by at most 1."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))


SINGLE_PROCESS = DistributedContext()


def rank_device(device: torch.device, context: DistributedContext) -> torch.device:
    """GPU LOCAL_RANK for each of `torchrun`'s ranks on CUDA; `device` otherwise."""
    if device.type == "cuda" and context.active:
        return torch.device("cuda", context.local_rank)
    return device


@contextmanager
def ctrl_c_ends_on_rank_zero(context: DistributedContext) -> Iterator[None]:
    """Ctrl-C reaches every rank, in no fixed order (the terminal signals the whole process
    group; `torchrun` relays its own SIGINT rank by rank). Rank 0 acts on it: it closes the MLflow
    run KILLED and exits. The other ranks only note it and leave when rank 0's exit breaks their
    next collective, raising KeyboardInterrupt then. Were a peer to leave first, rank 0 would meet
    the broken collective before its own SIGINT and close the run FAILED."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    if context.is_main or not on_main_thread:
        yield
        return
    noted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    except Exception:
        if noted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class BatchSplit:
    """This rank's rows of a global batch, in micro-batches of `micro_batch` rows each.

    Rank r takes the r-th contiguous share, so rank-ordered gathers restore the batch order.
    """

    rows: range
    micro_batch: int

    @property
    def accumulation(self) -> int:
        """Forward/backward passes per optimiser step (gradient accumulation steps)."""
        return len(self.rows) // self.micro_batch

    def micro_batches(self) -> list[range]:
        """Each micro-batch's rows, counted from this rank's first row."""
        size = self.micro_batch
        return [range(i, i + size) for i in range(0, len(self.rows), size)]


def split_batch(batch_size: int, micro_batch_size: int, context: DistributedContext) -> BatchSplit:
    """`train.batch_size` (global) over the ranks; `micro_batch_size` 0 = no accumulation."""
    per_rank, rest = divmod(batch_size, context.world_size)
    if rest or per_rank == 0:
        raise DmstabError(
            f"train.batch_size={batch_size} does not split evenly over "
            f"{context.world_size} processes; use a multiple of {context.world_size}"
        )
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise DmstabError(
            f"train.batch_size={batch_size} over {context.world_size} processes is {per_rank} "
            f"rows each, not a multiple of train.micro_batch_size={micro}"
        )
    return BatchSplit(context.shard(batch_size), micro)


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DmstabError(f"{name}={value!r} is not an integer (set by torchrun)") from None


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by `torchrun`."""
    return "WORLD_SIZE" in os.environ and _env_int("WORLD_SIZE") > 1


def init_distributed(device_type: str) -> DistributedContext:
    """Join `torchrun`'s process group (once per process), or the single-process context.

    `device_type` is "cuda" or "cpu": NCCL for CUDA, gloo for CPU. On CUDA each rank takes GPU
    LOCAL_RANK. Calling it again returns the same context.
    """
    if not all(name in os.environ for name in _ENV) or not launched_by_torchrun():
        return SINGLE_PROCESS
    context = DistributedContext(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK"))
    rendezvous = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if rendezvous and not dist.is_initialized():  # torchrun sets both; a copied shell may not
        raise DmstabError(
            f"WORLD_SIZE={context.world_size} says this is one of several ranks, but "
            f"{' and '.join(rendezvous)} {'is' if len(rendezvous) == 1 else 'are'} not set: "
            "start it with torchrun, or unset WORLD_SIZE, RANK and LOCAL_RANK"
        )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30))
    return context


def shutdown_distributed() -> None:
    """Leave the process group at the end of a command (no-op for a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
