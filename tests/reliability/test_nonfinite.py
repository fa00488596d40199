"""Non-finite and spiking losses, injected for real (a learning rate that blows the weights up,
the loss's own fluctuations against a tight spike factor): `train.nonfinite`, `train.spike_*`
and `train.max_skipped` stop or skip exactly as documented, and never lose a good checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dmstab.analysis.ema_profiles import list_snapshots, load_snapshot
from dmstab.checkpoint import load_checkpoint
from dmstab.config import load_recipe
from dmstab.train.loop import SNAPSHOT_DIR, train
from tests.helpers import MINI, RECIPES, TINY, cli, failure_line, store

from . import counts
from .conftest import EDM_EVERY_WRITE, only_run

QUICKSTART = RECIPES / "quickstart.yaml"
BASE = [*TINY, "train.checkpoint_every=1", "train.steps=30"]
BLOW_UP = ["optim.lr=1e30"]  # step 1 throws the weights to ~1e30: the next loss is not finite
SPIKES = ["train.spike_factor=1.2", "train.spike_window=3"]  # the loss's own ups and downs


def _state(path: Path) -> dict[str, torch.Tensor]:
    """Everything a step updates: weights, EMA, optimiser moments (flattened)."""
    state = load_checkpoint(path)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    for index, moments in state["optimizer"]["state"].items():
        flat.update({f"adam.{index}.{k}": torch.as_tensor(v) for k, v in moments.items()})
    return flat


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state_after(steps: int, *overrides: str) -> dict[str, torch.Tensor]:
    """The state an uninterrupted run of the same recipe holds after `steps` steps."""
    out_dir = f"train.out_dir=after{steps}"
    run = train(load_recipe(QUICKSTART, [*BASE, *overrides, f"train.steps={steps}", out_dir]))
    return _state(run.checkpoint)


def _failed_step(line: str) -> int:
    found = re.search(r"at step (\d+)", line)
    assert found, line
    return int(found.group(1))


def test_nonfinite_stop_exits_1_and_keeps_the_last_good_checkpoint(one_thread: None) -> None:
    line = failure_line(cli("train", str(QUICKSTART), *BASE, *BLOW_UP), exit_code=1)
    assert "loss is not finite at step" in line and "last good checkpoint" in line
    step = _failed_step(line)
    [checkpoint] = Path("runs").glob("*/checkpoint.pt")
    kept = _state(checkpoint)
    good = _state_after(step - 1, *BLOW_UP, "tracking.experiment=good")
    losses = int(not _same(kept, good)) + int(load_checkpoint(checkpoint)["step"] != step - 1)
    counts.record(trials=1, faults=1, losses=losses)
    assert losses == 0, "the checkpoint on disk is not the last good step's"


def test_nonfinite_skip_stops_after_max_skipped_consecutive_skips(one_thread: None) -> None:
    skip = [*BLOW_UP, "train.nonfinite=skip", "train.max_skipped=3"]
    line = failure_line(cli("train", str(QUICKSTART), *BASE, *skip), exit_code=1)
    assert "3 consecutive steps skipped (train.max_skipped)" in line
    stopped = _failed_step(line)
    history = store().get_metric_history(only_run().info.run_id, "train/skipped")
    skipped = [m.step for m in history]
    counts.record(trials=1, faults=3)
    assert sorted(skipped) == [stopped - 2, stopped - 1]
    [checkpoint] = Path("runs").glob("*/checkpoint.pt")
    assert load_checkpoint(checkpoint)["step"] == stopped - 1  # skipped steps are checkpointed
    unchanged = _same(_state(checkpoint), _state_after(stopped - 3, *skip))
    counts.record(losses=int(not unchanged))
    assert unchanged, "the skipped steps changed the weights or optimiser"


@pytest.mark.slow
def test_a_skipped_spike_changes_nothing_and_training_goes_on(one_thread: None) -> None:
    result = train(load_recipe(QUICKSTART, [*BASE, *SPIKES]))
    client = store()
    history = client.get_metric_history(result.run_id, "train/skipped")
    assert history, "no loss spike in 30 steps: loosen SPIKES"
    spike = min(m.step for m in history)
    losses = sorted(m.step for m in client.get_metric_history(result.run_id, "train/loss"))
    assert spike not in losses and losses[-1] == 30, "a skipped step is logged as skipped only"
    before, at = (_state_after(steps, *SPIKES, f"tracking.experiment=s{steps}") for steps in
                  (spike - 1, spike))  # fmt: skip
    counts.record(trials=1, faults=len(history), losses=int(not _same(before, at)))
    assert _same(before, at), f"the skipped step {spike} changed the weights or optimiser"


@pytest.mark.slow
def test_spike_policy_stop_exits_1_at_the_same_spike(one_thread: None) -> None:
    skipped = train(load_recipe(QUICKSTART, [*BASE, *SPIKES, "tracking.experiment=skip"]))
    history = store().get_metric_history(skipped.run_id, "train/skipped")
    spike = min(m.step for m in history)
    stop = [*SPIKES, "train.spike_policy=stop"]
    line = failure_line(cli("train", str(QUICKSTART), *BASE, *stop), exit_code=1)
    counts.record(trials=1, faults=1)
    assert f"loss spike at step {spike}" in line and "last good checkpoint" in line


def test_a_skipped_step_keeps_the_power_emas_going(one_thread: None) -> None:
    spikes = ["train.spike_factor=1.1", "train.spike_window=2", "train.steps=30"]
    result = train(load_recipe(MINI, [*EDM_EVERY_WRITE, *spikes]))
    counts.record(trials=1, faults=1)
    assert store().get_metric_history(result.run_id, "train/skipped")
    for info in list_snapshots(result.run_dir / SNAPSHOT_DIR):
        load_snapshot(info.path)
