"""The NaN/spike policy (dmstab.train.loss_guard), its recipe keys, and the batch split."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dmstab.config import TrainConfig, fingerprint, load_recipe
from dmstab.distributed import DistributedContext, split_batch
from dmstab.errors import DmstabError
from dmstab.train.loss_guard import LossGuard, TrainingDiverged
from dmstab.train.trainer import Trainer
from tests.helpers import RECIPES, TINY


def _guard(**settings: object) -> LossGuard:
    return LossGuard(TrainConfig(**settings))  # type: ignore[arg-type]


def _accept(guard: LossGuard, step: int, loss: float) -> bool:
    """The verdict on the device, then a host point (as the loop reads it)."""
    verdict = guard.judge(step, torch.tensor(loss, dtype=torch.float64))
    guard.raise_if_stopped()
    return bool(verdict)


def test_the_default_stops_at_the_first_non_finite_loss() -> None:
    guard = _guard()
    assert _accept(guard, 1, 1.0) and _accept(guard, 2, 1e6)  # spikes are not judged by default
    with pytest.raises(TrainingDiverged, match="not finite at step 3"):
        _accept(guard, 3, math.nan)


def test_skip_leaves_out_non_finite_losses_until_max_skipped_in_a_row() -> None:
    guard = _guard(nonfinite="skip", max_skipped=3)
    assert _accept(guard, 1, 0.5)
    assert not _accept(guard, 2, math.inf) and guard.skipping
    assert not _accept(guard, 3, math.nan)
    assert _accept(guard, 4, 0.4) and not guard.skipping  # an accepted step resets the count
    assert not _accept(guard, 5, math.nan) and not _accept(guard, 6, math.nan)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps skipped"):
        _accept(guard, 7, math.nan)
    assert guard.total_skipped == 5
    assert guard.window() == [0.5, 0.4]  # only accepted losses


def test_a_spike_is_a_loss_above_factor_times_the_mean_of_a_full_window() -> None:
    guard = _guard(spike_factor=2.0, spike_window=3)
    assert _accept(guard, 1, 1.0) and _accept(guard, 2, 100.0)  # window not full: no judgement
    assert _accept(guard, 3, 4.0)
    mean = (1.0 + 100.0 + 4.0) / 3
    assert not _accept(guard, 4, 2.0 * mean * 1.001)  # skipped: the window is unchanged
    assert _accept(guard, 5, 2.0 * mean * 0.999)
    assert guard.window() == [100.0, 4.0, 2.0 * mean * 0.999]  # the oldest dropped


def test_spike_policy_stop_raises_naming_the_step_and_the_threshold() -> None:
    guard = _guard(spike_factor=3.0, spike_window=2, spike_policy="stop")
    _accept(guard, 1, 1.0)
    _accept(guard, 2, 1.0)
    with pytest.raises(TrainingDiverged, match=r"loss spike at step 3: 3\.5 > 3"):
        _accept(guard, 3, 3.5)


def test_a_restored_guard_decides_like_the_uninterrupted_one() -> None:
    settings = {"spike_factor": 1.5, "spike_window": 4, "nonfinite": "skip", "max_skipped": 5}
    losses = [1.0, 0.9, math.nan, 0.8, 0.85, 5.0, 0.7, 6.0, 0.75, 0.6, 3.0, 0.5]
    whole, first = _guard(**settings), _guard(**settings)
    expected = [_accept(whole, step, loss) for step, loss in enumerate(losses, 1)]
    half = [_accept(first, step, loss) for step, loss in enumerate(losses[:6], 1)]
    restored = _guard(**settings)
    restored.load_state_dict(copy.deepcopy(first.state_dict()))
    rest = [_accept(restored, step, loss) for step, loss in enumerate(losses[6:], 7)]
    assert half + rest == expected and expected.count(False) == 4
    assert restored.state_dict() == whole.state_dict()
    with pytest.raises(DmstabError, match="loss-guard state"):
        restored.load_state_dict({"window": [1], "consecutive": 0, "total_skipped": 0})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.nonfinite=ignore", "train.nonfinite"),
        ("train.spike_policy=warn", "train.spike_policy"),
        ("train.spike_factor=0.5", "train.spike_factor is 0.5"),
        ("train.spike_window=0", "train.spike_window is 0"),
        ("train.max_skipped=0", "train.max_skipped is 0"),
        ("train.micro_batch_size=3", "train.micro_batch_size is 3"),
        ("train.micro_batch_size=-1", "train.micro_batch_size is -1"),
    ],
)
def test_bad_policy_and_micro_batch_values_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(DmstabError, match=message) as info:
        load_recipe(RECIPES / "quickstart.yaml", [*TINY, override])
    assert "\n" not in str(info.value)


def test_device_and_micro_batch_do_not_change_the_fingerprint() -> None:
    base = load_recipe(RECIPES / "quickstart.yaml", TINY)
    executed = load_recipe(
        RECIPES / "quickstart.yaml", [*TINY, "train.micro_batch_size=2", "train.device=cpu"]
    )
    guarded = load_recipe(RECIPES / "quickstart.yaml", [*TINY, "train.nonfinite=skip"])
    assert fingerprint(executed) == fingerprint(base) != fingerprint(guarded)


def test_the_global_batch_splits_into_contiguous_rank_rows_and_micro_batches() -> None:
    ranks = [split_batch(12, 2, DistributedContext(rank, 3, rank)) for rank in range(3)]
    assert [s.rows for s in ranks] == [range(0, 4), range(4, 8), range(8, 12)]
    assert ranks[1].accumulation == 2 and ranks[1].micro_batches() == [range(0, 2), range(2, 4)]
    assert split_batch(8, 0, DistributedContext()).micro_batches() == [range(0, 8)]
    with pytest.raises(DmstabError, match="batch_size=7 does not split evenly over 2"):
        split_batch(7, 0, DistributedContext(0, 2, 0))
    with pytest.raises(DmstabError, match=r"4 rows each, not a multiple of .*micro_batch_size=3"):
        split_batch(8, 3, DistributedContext(0, 2, 0))


def test_a_skipped_step_changes_no_weights_optimizer_state_or_ema(one_thread: None) -> None:
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [*TINY, "optim.lr=1e30", "train.nonfinite=skip", "train.max_skipped=2"],
    )
    trainer = Trainer(recipe, torch.device("cpu"))
    trainer.train_step()  # a finite loss; lr 1e30 ruins the weights for the next step
    assert not trainer.guard.skipping
    before = copy.deepcopy(trainer.state_dict("run"))
    trainer.train_step()
    assert trainer.guard.skipping and trainer.step == 2
    trainer.guard.raise_if_stopped()
    after = trainer.state_dict("run")
    for part in ("model", "optimizer", "ema", "objective"):
        torch.testing.assert_close(after[part], before[part], rtol=0, atol=0, equal_nan=True)
    assert after["loss_guard"] == {"window": before["loss_guard"]["window"], **_skipped(1)}
    trainer.train_step()  # the verdict waits on the device for the loop's next host point
    stopped = r"not finite at step 3.*2 consecutive steps skipped"
    with pytest.raises(TrainingDiverged, match=stopped):
        trainer.guard.raise_if_stopped()


def _skipped(count: int) -> dict[str, int]:
    return {"consecutive": count, "total_skipped": count}
