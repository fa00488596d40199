"""Evaluation during training (`eval:`) and `dmstab fid` on a training run.

The feature network is the seeded random-conv stand-in or a random-weight Inception file
(torchvision's architecture); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmstab.analysis.features import WEIGHTS_ENV
from dmstab.analysis.fid import fid_from_stats
from dmstab.analysis.frechet import FeatureStats
from dmstab.analysis.scoring import stats_cache
from dmstab.config import Recipe, load_recipe
from dmstab.data.synthetic import CLASS_NAMES, generate_shapes
from dmstab.errors import DmstabError
from dmstab.tracking import TAG_PARENT
from dmstab.train.evaluate import Evaluator, build_evaluator
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, Runner, store

CPU = torch.device("cpu")
RANDOM_CONV = ["eval.features=random_conv", "eval.num_images=16", "eval.batch_size=8"]


@pytest.fixture(autouse=True)
def private_home(isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Statistics caches and default weights live under the test's own HOME."""
    monkeypatch.setenv("HOME", str(isolated_workdir))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    return isolated_workdir


def _recipe(*extra: str) -> Recipe:
    return load_recipe(RECIPES / "quickstart.yaml", [*TINY, *extra])


def _history(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in store().get_metric_history(run_id, key)}


@pytest.mark.slow
def test_training_logs_eval_fid_at_exactly_the_requested_steps(dmstab: Runner) -> None:
    recipe = _recipe(
        "train.steps=4",
        "eval.at=[2,4]",
        "eval.metrics=[fid,kid]",
        "data.synthetic_size=32",
        *RANDOM_CONV,
    )
    result = train(recipe)
    for key in ("eval/fid", "eval/kid"):
        values = _history(result.run_id, key)
        assert sorted(values) == [2, 4], key
        assert all(np.isfinite(value) for value in values.values()), key
    assert all(value > 0 for value in _history(result.run_id, "eval/fid").values())
    assert len(list(stats_cache().glob("synthetic-16-random_conv-clean-*.npz"))) == 1

    # `dmstab report` reads the same numbers back and prints them per step
    shown = dmstab("report", result.run_id)
    assert shown.returncode == 0, shown.stderr
    assert "eval/fid" in shown.stdout
    for step, value in _history(result.run_id, "eval/fid").items():
        rows = [line for line in shown.stdout.splitlines() if f" {value:.2f} " in line]
        assert any(f" {step} " in row for row in rows), (step, value, shown.stdout)


def test_due_steps_are_the_listed_ones_every_n_and_the_last() -> None:
    recipe = _recipe(
        "train.steps=10", "eval.at=[2]", "eval.every=3", "data.synthetic_size=16", *RANDOM_CONV
    )
    evaluator = Evaluator(recipe, num_classes=len(CLASS_NAMES), device=CPU)
    assert [step for step in range(1, 11) if evaluator.due(step)] == [2, 3, 6, 9, 10]
    assert build_evaluator(_recipe(*RANDOM_CONV), num_classes=len(CLASS_NAMES), device=CPU) is None


def test_the_training_set_scored_against_its_cached_statistics_is_zero() -> None:
    recipe = _recipe("eval.at=[1]", "data.synthetic_size=32", "data.resolution=32", *RANDOM_CONV)
    evaluator = Evaluator(recipe, num_classes=len(CLASS_NAMES), device=CPU)
    (cache,) = stats_cache().glob("*.npz")
    written = cache.stat().st_mtime_ns
    images, _ = generate_shapes(32, 32, seed=0)  # the synthetic dataset of seed 0, independently
    own = FeatureStats.from_features(evaluator.pipeline.features(images))
    assert abs(fid_from_stats(own, evaluator.reference.stats)) < 1e-6
    blurred = images.float().reshape(32, 3, 16, 2, 16, 2).mean(dim=(3, 5))
    blurred = blurred.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).round().byte()
    other = FeatureStats.from_features(evaluator.pipeline.features(blurred))
    assert fid_from_stats(other, evaluator.reference.stats) > 1e-3
    Evaluator(recipe, num_classes=len(CLASS_NAMES), device=CPU)
    assert cache.stat().st_mtime_ns == written, "the cached statistics must be reused"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.metrics=[is]"], "'is' needs eval.features: inception"),
        (["eval.reference=nowhere.npz"], "FID reference not found: nowhere.npz"),
        (["eval.metrics=[kid]", "eval.reference=stats.npz"], "KID needs reference images"),
    ],
)
def test_unusable_eval_settings_are_one_line_errors(overrides: list[str], message: str) -> None:
    FeatureStats(np.zeros(2), np.eye(2)).save(Path("stats.npz"))
    recipe = _recipe("eval.at=[1]", "data.synthetic_size=16", *RANDOM_CONV, *overrides)
    with pytest.raises(DmstabError, match=message):
        Evaluator(recipe, num_classes=len(CLASS_NAMES), device=CPU)


def test_missing_inception_weights_stop_training_before_a_run_exists(
    isolated_workdir: Path, dmstab: Runner
) -> None:
    result = dmstab(
        "train", str(RECIPES / "quickstart.yaml"), *TINY, "eval.at=[2]", "train.steps=2"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "inception-2015-12-05.pt" in lines[0], result.stderr
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


@pytest.mark.slow
def test_fid_of_a_run_equals_its_eval_fid_through_the_score_path(
    torchscript_folder: Path, monkeypatch: pytest.MonkeyPatch, dmstab: Runner
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(torchscript_folder))
    count = 10  # the fewest the Inception Score's ten splits allow
    recipe = _recipe(
        "train.steps=2",
        "eval.at=[2]",
        f"eval.num_images={count}",
        "eval.batch_size=3",  # sampling splits differ from `dmstab fid`'s (sample.batch_size=4)
        "eval.metrics=[fid,is]",
        f"data.synthetic_size={count}",
    )
    trained = train(recipe)
    evaluated = {key: _history(trained.run_id, f"eval/{key}")[2] for key in ("fid", "is")}

    (reference,) = stats_cache().glob("*.npz")  # the training set's statistics eval cached
    scored = dmstab(
        "fid", trained.run_id, "--num-images", str(count), "--ref", str(reference), "--is"
    )
    assert scored.returncode == 0, scored.stderr
    (run,) = store().search_runs([store().get_experiment_by_name("fid").experiment_id])
    assert run.data.tags[TAG_PARENT] == trained.run_id
    assert run.data.metrics["num_images"] == count
    for key, value in evaluated.items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-6), key
