"""The training step reads nothing back from the device between the loop's host points
(docs/performance.md, "The training step without host syncs").

On the CPU every tensor is a host tensor, so "device data" is tracked by provenance: a
TorchFunctionMode marks the model's parameters, buffers, EMA and optimiser state and every tensor
computed from a marked one, and counts each host read of a marked tensor (`item`, `float`,
`bool`, `tolist`, `.cpu()`, …; not `.to(device)`, which on the CPU cannot tell a move to the
host from one to the same device: CUDA's check below catches those). Host-side bookkeeping
(batch indices, CPU draws) stays unmarked, as it stays on the host on a GPU. On CUDA,
`torch.cuda.set_sync_debug_mode("error")` checks the same directly.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from dmstab.config import load_recipe
from dmstab.tracking import NullTracker
from dmstab.train.loop import _run_steps
from dmstab.train.metric_window import MetricWindow
from dmstab.train.trainer import Trainer
from tests.helpers import RECIPES, TINY

_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}
_READS |= {"__format__", "__repr__", "__str__", "__array__"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors derived from the marked ones (the device data)."""

    def __init__(self) -> None:
        super().__init__()
        self._marked: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.reads: list[str] = []
        self.active = True

    def mark(self, tensors: Any) -> None:
        for tensor in tree_flatten(tensors)[0]:
            if isinstance(tensor, torch.Tensor):
                self._marked[id(tensor)] = tensor

    def _is_marked(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and self._marked.get(id(value)) is value

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        inputs = tree_flatten((args, kwargs))[0]
        derived = any(self._is_marked(value) for value in inputs)
        name = getattr(func, "__name__", "")
        if derived and name in _READS and self._is_marked(inputs[0]):
            self.reads.append(name)
        out = func(*args, **kwargs)
        if derived:
            self.mark(out)
            if name.endswith("_") and not name.startswith("__") and args:
                self.mark(args[0])  # an in-place op (also a foreach list) now holds device data
        return out


def _mark_trainer(reads: HostReads, trainer: Trainer) -> None:
    reads.mark(list(trainer.model.parameters()) + list(trainer.model.buffers()))
    reads.mark(list(trainer.ema.shadow.values()))
    reads.mark([v for state in trainer.optimizer.state.values() for v in state.values()])


def _recipe(*extra: str):  # type: ignore[no-untyped-def]
    # fused: the optimiser path CUDA takes (the unfused CPU one reads Adam's host step count)
    return load_recipe(
        RECIPES / "quickstart.yaml",
        [*TINY, "train.fused=true", "timesteps.histogram_every=0", *extra],
    )


def test_the_counter_sees_a_deliberate_host_read(one_thread: None) -> None:
    """The counter can fail: a `float(loss)` as the old loss guard made it is one read."""
    trainer = Trainer(_recipe(), torch.device("cpu"))
    with HostReads() as reads:
        _mark_trainer(reads, trainer)
        out = trainer.train_step()
        assert reads.reads == []
        float(out["loss"])
        assert reads.reads == ["__float__"]
        trainer.guard.raise_if_stopped()  # a host point reads the guard
        assert len(reads.reads) == 2
        torch.zeros(3).tolist()  # host data is no device read
        assert len(reads.reads) == 2


@pytest.mark.parametrize(
    "timesteps",
    [["timesteps.sampler=clts"], ["timesteps.sampler=importance", "timesteps.history=1"]],
    ids=["clts", "importance"],
)
def test_training_steps_read_nothing_back_between_host_points(
    timesteps: list[str], one_thread: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through the loop's steps (`_run_steps`, MLflow aside): no read inside a step, and none
    after a step that is not a host point (steps 1, 2, 4, 5 of 7 with log_every 3; the last
    step is one), with the spike guard skipping (a tight factor over the loss's own ups and
    downs), with the CLTS curriculum and with the importance sampler, whose probabilities
    follow the losses on the device."""
    policy = ["train.nonfinite=skip", "train.spike_factor=1.2", "train.spike_window=2"]
    policy += [*timesteps, "optim.grad_clip=1.0", "ema.warmup=true"]
    recipe = _recipe("train.steps=7", "train.log_every=3", "train.checkpoint_every=100", *policy)
    counts: list[tuple[int, int, int]] = []  # (step, reads at its start, reads at its end)
    step_once = Trainer.train_step
    with HostReads() as reads:

        def counted(trainer: Trainer) -> dict[str, torch.Tensor]:
            if trainer.step == 0:
                _mark_trainer(reads, trainer)
            start = len(reads.reads)
            out = step_once(trainer)
            counts.append((trainer.step, start, len(reads.reads)))
            reads.active = trainer.step < recipe.train.total_steps  # the end: sampling, unmarked
            return out

        monkeypatch.setattr(Trainer, "train_step", counted)
        trainer = Trainer(recipe, torch.device("cpu"))
        checkpoint = tmp_path / "run" / "checkpoint.pt"
        _run_steps(trainer, NullTracker(), "run", checkpoint, None, None, None)
    assert [step for step, _, _ in counts] == list(range(1, 8))
    assert all(start == end for _, start, end in counts), f"reads inside a step: {counts}"
    after = {step: counts[step][1] - end for step, _, end in counts[:-1]}
    assert after[3] > 0 and after[6] > 0, "the host points read the guard and the window"
    assert [after[step] for step in (1, 2, 4, 5)] == [0, 0, 0, 0], f"reads after steps: {after}"


@contextmanager
def _sync_debug(mode: str) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "skip",
    [
        [],
        ["train.nonfinite=skip", "train.spike_factor=1.5"],
        ["timesteps.sampler=importance", "timesteps.history=1"],
    ],
    ids=["stop", "skip", "importance"],
)
def test_cuda_steps_never_synchronise(skip: list[str]) -> None:
    """CUDA's own check: any synchronising call in a step raises under sync debug mode."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    recipe = load_recipe(
        RECIPES / "quickstart.yaml", [*TINY, "train.compile=false", "train.device=cuda", *skip]
    )
    trainer = Trainer(recipe, torch.device("cuda"))
    window = MetricWindow()
    window.add(trainer.train_step(), trainer.guard.last_accept)  # lazy state and kernels
    torch.cuda.synchronize()
    with _sync_debug("error"):
        for _ in range(4):
            window.add(trainer.train_step(), trainer.guard.last_accept)
    steps, metrics = window.read()
    trainer.guard.raise_if_stopped()
    assert steps >= 1 and metrics["loss"] > 0
