"""The MLflow names of a training run's metrics (dmstab.train.metric_names): prefixes, `mse`
only where it differs from `loss`, constants as tags once."""

from __future__ import annotations

import pytest

from dmstab.config import load_recipe
from dmstab.train.metric_names import MetricNames, tracked_name
from tests.helpers import RECIPES, TINY

LR = 2e-4


def _window(**extra: float) -> dict[str, float]:
    """One logged window of an ε-prediction run, as the loop hands it over."""
    plain = {"loss": 0.25, "mse": 0.25, "loss_weight": 1.0, "grad_norm": 3.0, "lr": LR}
    return {**plain, "kimg": 0.008, "images_per_s": 90.0, "timesteps/gamma": 0.5, **extra}


def _names(*overrides: str) -> MetricNames:
    return MetricNames(load_recipe(RECIPES / "quickstart.yaml", [*TINY, *overrides]))


def test_prefixes_group_the_metrics() -> None:
    assert tracked_name("loss") == "train/loss" and tracked_name("loss_d") == "train/loss_d"
    assert tracked_name("images_per_s") == "system/images_per_s"
    assert tracked_name("eval/fid") == "eval/fid" and tracked_name("timesteps/mean") == (
        "timesteps/mean"
    )


def test_an_unweighted_constant_lr_run_logs_loss_once_and_its_constants_as_tags() -> None:
    names = _names(f"optim.lr={LR}")
    metrics, tags = names.tracked(_window())
    assert metrics == {
        "train/loss": 0.25,
        "train/grad_norm": 3.0,
        "train/kimg": 0.008,
        "system/images_per_s": 90.0,
        "timesteps/gamma": 0.5,
    }
    assert tags == {"dmstab.lr": repr(LR), "dmstab.loss_weight": "1.0"}
    assert names.tracked(_window()) == (metrics, {})  # tags once


@pytest.mark.parametrize(
    ("overrides", "extra"),
    [
        ((), {"vb": 0.1, "loss": 0.35}),  # learned Σ: loss = mse + vb
        ((), {"loss_before_importance": 0.25, "loss": 0.3}),  # importance-sampled timesteps
    ],
)
def test_mse_is_logged_when_the_loss_is_not_the_mse(
    overrides: tuple[str, ...], extra: dict[str, float]
) -> None:
    metrics, _ = _names(*overrides).tracked(_window(**extra))
    assert metrics["train/mse"] == 0.25 and metrics["train/loss"] == extra["loss"]


def test_a_loss_weighting_charts_its_weight_and_the_mse() -> None:
    metrics, tags = _names("diffusion.weighting=min_snr").tracked(_window(loss_weight=0.7))
    assert metrics["train/loss_weight"] == 0.7 and metrics["train/mse"] == 0.25
    assert "dmstab.loss_weight" not in tags


@pytest.mark.parametrize("overrides", [("optim.warmup_steps=5",), ("optim.schedule=inverse_sqrt",)])
def test_a_changing_learning_rate_is_a_series(overrides: tuple[str, ...]) -> None:
    metrics, tags = _names(*overrides).tracked(_window())
    assert metrics["train/lr"] == LR and "dmstab.lr" not in tags
