"""Tracking against a real SQLite MLflow store in the test's working directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from dmstab import __version__
from dmstab.config import flatten, load_recipe, run_params
from dmstab.errors import DmstabError
from dmstab.tracking import (
    DEFAULT_TRACKING_URI,
    MlflowTracker,
    find_resumable_run,
    resolve_uri,
    tracked_run,
)
from tests.helpers import RECIPES, TINY, Runner, one_line_error, store


def _recipe(*extra: str):  # type: ignore[no-untyped-def]
    return load_recipe(RECIPES / "quickstart.yaml", [*TINY, *extra])


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_default_store_is_sqlite_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, isolated_workdir: Path
) -> None:
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_uri(None) == f"sqlite:///{isolated_workdir.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri(None) == "http://127.0.0.1:5000"
    assert resolve_uri("sqlite:////abs/recipe.db") == "sqlite:////abs/recipe.db"


def test_params_tags_and_recipe_artifact(isolated_workdir: Path) -> None:
    recipe = _recipe()
    tracker = MlflowTracker.start(recipe, kind="train")
    tracker.finish("FINISHED")
    assert (isolated_workdir / "mlflow.db").is_file()
    client = store()
    run = client.get_run(tracker.run_id)
    logged = run.data.params  # the recipe's keys the run uses (test_run_layout.py), as flattened
    assert logged == run_params(recipe, "train")
    assert logged.items() <= flatten(recipe).items() and "model.channels" in logged
    assert run.data.tags["dmstab.version"] == __version__
    assert run.data.tags["dmstab.command"].startswith("dmstab")
    assert run.data.tags["dmstab.hostname"]
    assert run.info.status == "FINISHED"
    artifacts = [a.path for a in client.list_artifacts(tracker.run_id)]
    assert "recipe.yaml" in artifacts


def test_metrics_are_buffered_until_flush_every_steps() -> None:
    tracker = MlflowTracker.start(_recipe("tracking.flush_every=10"), kind="train")
    client = store()
    for step in range(1, 10):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert _steps(client, tracker.run_id, "loss") == []
    tracker.log_metrics({"loss": 10.0}, step=10)
    assert _steps(client, tracker.run_id, "loss") == list(range(1, 11))
    tracker.log_metrics({"loss": 11.0}, step=11)
    assert _steps(client, tracker.run_id, "loss") == list(range(1, 11))
    tracker.finish("FINISHED")
    assert _steps(client, tracker.run_id, "loss") == list(range(1, 12))


def test_crash_marks_failed_and_keeps_metrics() -> None:
    tracker = MlflowTracker.start(_recipe(), kind="train")
    with pytest.raises(ZeroDivisionError), tracked_run(tracker):
        tracker.log_metrics({"loss": 0.5}, step=1)
        _ = 1 / 0
    run = store().get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["loss"] == 0.5


def test_an_error_raised_while_handling_ctrl_c_marks_killed() -> None:
    """Ctrl-C in the middle of a SQLite write surfaces as the cleanup's OperationalError."""
    tracker = MlflowTracker.start(_recipe(), kind="train")
    with pytest.raises(KeyboardInterrupt), tracked_run(tracker):
        tracker.log_metrics({"loss": 0.5}, step=1)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise sqlite3.OperationalError("database is locked")  # noqa: B904  # as SQLAlchemy
    run = store().get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics["loss"] == 0.5


def test_resumed_run_skips_steps_it_already_has() -> None:
    recipe = _recipe("tracking.flush_every=1")
    first = MlflowTracker.start(recipe, kind="train")
    for step in range(1, 6):
        first.log_metrics({"loss": float(step), "lr": 1.0}, step=step)
    first.flush()  # then the process dies: the run stays RUNNING
    assert find_resumable_run(recipe) == first.run_id
    assert find_resumable_run(_recipe("optim.lr=0.5")) is None
    second = MlflowTracker.start(recipe, kind="train", resume_run_id=first.run_id)
    for step in range(1, 9):
        second.log_metrics({"loss": float(step), "lr": 1.0}, step=step)
    second.finish("FINISHED")
    client = store()
    assert _steps(client, first.run_id, "loss") == list(range(1, 9))
    assert _steps(client, first.run_id, "lr") == list(range(1, 9))
    assert find_resumable_run(recipe) is None


def test_stepped_images_keep_their_step_and_a_resumed_run_logs_each_once(
    tmp_path: Path,
) -> None:
    png = tmp_path / "grid.png"
    Image.new("RGB", (8, 4), (255, 0, 0)).save(png)
    recipe = _recipe()
    first = MlflowTracker.start(recipe, kind="train")
    first.log_image(png, "timesteps/histogram", 5)
    first.log_image(png, "samples", 5)  # then the process dies before its checkpoint
    second = MlflowTracker.start(recipe, kind="train", resume_run_id=first.run_id)
    for step in (5, 10):
        second.log_image(png, "samples", step)
    second.finish("FINISHED")
    client = store()
    assert first.run_id is not None
    names = [a.path for a in client.list_artifacts(first.run_id, "images")]
    pngs = sorted(n.split("/")[1].split("+")[:3] for n in names if n.endswith(".png"))
    assert pngs == [
        ["samples", "step", "10"],
        ["samples", "step", "5"],
        ["timesteps~histogram", "step", "5"],
    ]
    assert len(names) == 6  # each with MLflow's compressed .webp preview
    (shown,) = [n for n in names if n.startswith("images/samples+step+10+") and n.endswith("png")]
    with Image.open(client.download_artifacts(first.run_id, shown)) as image:
        assert image.size == (8, 4) and image.getpixel((0, 0)) == (255, 0, 0)


def test_unreachable_store_is_a_one_line_error(isolated_workdir: Path) -> None:
    (isolated_workdir / "a_file").write_text("not a directory")
    uri = f"sqlite:///{isolated_workdir}/a_file/x.db"
    expected = r"cannot write the MLflow store's directory .*a_file: it is not a directory"
    with pytest.raises(DmstabError, match=expected) as info:  # said before MLflow retries it
        MlflowTracker.start(_recipe(f"tracking.uri={uri}"), kind="train")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "args",
    [
        ["sample", "0123456789abcdef0123456789abcdef"],
        ["train", str(RECIPES / "quickstart.yaml"), "--resume", "0123456789abcdef"],
        ["ema-reconstruct", "--sigma-rel", "0.1"],
        ["report", str(RECIPES / "quickstart.yaml")],
    ],
    ids=lambda args: args[0],
)
def test_a_lookup_in_an_empty_directory_creates_no_store(
    args: list[str], dmstab: Runner, isolated_workdir: Path
) -> None:
    one_line_error(dmstab(*args))
    assert list(isolated_workdir.iterdir()) == [], "a failed lookup leaves nothing behind"
