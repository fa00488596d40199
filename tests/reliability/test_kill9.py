"""kill -9 at random moments (a step, a checkpoint write, a snapshot write, an MLflow write),
then `--resume auto`, many times over one run: nothing on disk is ever unreadable, and the
finished run equals an uninterrupted one bit for bit, every metric step logged exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dmstab.analysis.ema_profiles import list_snapshots, load_snapshot
from dmstab.checkpoint import load_checkpoint
from dmstab.config import load_recipe
from dmstab.errors import DmstabError
from dmstab.train.loop import SNAPSHOT_DIR, train
from tests.helpers import MINI, store

from . import counts
from .conftest import EDM_EVERY_WRITE, only_run, start_dmstab

STEPS = 90
KILLS = 12
RECIPE = [*EDM_EVERY_WRITE, f"train.steps={STEPS}"]
EVENTS = ("step", "checkpoint", "snapshot", "mlflow")
JOURNAL = Path("mlflow.db-journal")  # SQLite's rollback journal: present while a write commits
POLL_S = 0.0002
EVENT_TIMEOUT_S = 120.0


def _run_dir() -> Path | None:
    found = [p for p in Path("runs").glob("*") if p.is_dir()] if Path("runs").is_dir() else []
    assert len(found) <= 1, f"a resume started a second run: {found}"
    return found[0] if found else None


def _temporaries(directory: Path | None, prefix: str) -> list[Path]:
    if directory is None or not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(prefix) and p.suffix == ".tmp"]


def _checkpoint_id() -> tuple[int, int] | None:
    """(inode, size) of the checkpoint: it changes whenever a new checkpoint is renamed in."""
    run_dir = _run_dir()
    path = run_dir / "checkpoint.pt" if run_dir else None
    try:
        stat = path.stat() if path else None
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_size) if stat else None


def _wait_for(process: subprocess.Popen[str], happened: Callable[[], bool]) -> None:
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while not happened():
        if process.poll() is not None:
            err = process.communicate()[1]
            pytest.fail(f"dmstab exited ({process.returncode}) before the kill: {err[-1500:]}")
        assert time.monotonic() < deadline, "the awaited write never happened"
        time.sleep(POLL_S)


def _in_training(process: subprocess.Popen[str], before: tuple[int, int] | None) -> None:
    """Wait until this process has written a checkpoint of its own (it is training)."""
    _wait_for(process, lambda: _checkpoint_id() not in (None, before))


def _kill_at(process: subprocess.Popen[str], event: str, rng: random.Random) -> None:
    """SIGKILL `process` at `event`: a step, or while a checkpoint, snapshot or MLflow write."""
    before = _checkpoint_id()
    if event == "checkpoint":
        _wait_for(process, lambda: bool(_temporaries(_run_dir(), ".checkpoint")))
    elif event == "snapshot":
        _wait_for(process, lambda: bool(_temporaries(_snapshot_dir(), ".phema")))
    elif event == "mlflow":
        _in_training(process, before)
        _wait_for(process, JOURNAL.exists)
    else:
        _in_training(process, before)
        time.sleep(rng.uniform(0.0, 0.6))
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()


def _snapshot_dir() -> Path | None:
    run_dir = _run_dir()
    return run_dir / SNAPSHOT_DIR if run_dir else None


def _unreadable_files() -> list[str]:
    """What a kill left unreadable: the checkpoint (weights-only) or a listed snapshot."""
    problems = []
    run_dir = _run_dir()
    if run_dir is None:
        return []
    if (run_dir / "checkpoint.pt").exists():
        try:
            load_checkpoint(run_dir / "checkpoint.pt")
        except DmstabError as exc:
            problems.append(str(exc))
    snapshots = run_dir / SNAPSHOT_DIR
    if snapshots.is_dir():
        try:
            for info in list_snapshots(snapshots):
                load_snapshot(info.path)
        except DmstabError as exc:
            problems.append(str(exc))
    return problems


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    for i, shadow in enumerate(state["power_ema"]["shadows"]):
        flat.update({f"power_ema{i}.{k}": v for k, v in shadow.items()})
    return flat


def _snapshots(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        info.path.name: load_snapshot(info.path)[0]
        for info in list_snapshots(run_dir / SNAPSHOT_DIR)
    }


def _tensor_mismatches(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
) -> list[str]:
    if got.keys() != want.keys():
        return [f"{what}: keys differ ({sorted(got.keys() ^ want.keys())[:3]})"]
    return [f"{what}: {k} differs" for k, v in want.items() if not torch.equal(got[k], v)]


def _metric_problems(client: MlflowClient, run_id: str, reference_id: str) -> list[str]:
    """Every metric step exactly once, as in the uninterrupted run; losses equal bit for bit."""
    keys, logged = (set(client.get_run(r).data.metrics) for r in (reference_id, run_id))
    problems = [f"metric keys differ: {sorted(keys ^ logged)}"] if keys != logged else []
    for key in sorted(keys):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        want = sorted((m.step, m.value) for m in client.get_metric_history(reference_id, key))
        if [s for s, _ in got] != [s for s, _ in want]:
            problems.append(f"{key}: steps {[s for s, _ in got]} != {[s for s, _ in want]}")
        elif key == "loss" and got != want:
            problems.append("loss values differ from the uninterrupted run")
    return problems


@pytest.fixture
def reference(one_thread: None) -> Iterator[tuple[str, Path]]:
    """The same recipe trained without interruption, in this process (one thread, as the CLI)."""
    recipe = load_recipe(MINI, [*RECIPE, "tracking.experiment=reference", "train.out_dir=ref"])
    result = train(recipe)
    yield result.run_id, result.run_dir


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_auto_loses_nothing(reference: tuple[str, Path]) -> None:
    rng = random.Random(8)
    events = [EVENTS[i % len(EVENTS)] for i in range(KILLS)]
    rng.shuffle(events)
    interrupted: set[str] = set()  # the writes a kill cut short: each leaves its temp file
    left: set[Path] = set()
    for index, event in enumerate(events):
        resume = ["--resume", "auto"] if index else []
        _kill_at(start_dmstab("train", str(MINI), *RECIPE, *resume), event, rng)
        now = {*_temporaries(_run_dir(), ".checkpoint"), *_temporaries(_snapshot_dir(), ".phema")}
        interrupted |= {
            "snapshot" if p.name.startswith(".phema") else "checkpoint" for p in now - left
        }
        left = now
        found = [f"after kill {index} ({event}): {p}" for p in _unreadable_files()]
        counts.record(trials=1, faults=1, resumes=1 if index else 0, losses=len(found))
        assert not found, found

    finished = start_dmstab("train", str(MINI), *RECIPE, "--resume", "auto")
    err = finished.communicate(timeout=600)[1]
    assert finished.returncode == 0, err[-2000:]
    counts.record(resumes=1)

    client, run = store(), only_run()
    run_dir = _run_dir()
    assert run_dir is not None and run_dir.name == run.info.run_id
    reference_id, reference_dir = reference
    after = [] if run.info.status == "FINISHED" else [f"run status {run.info.status}"]
    after += _metric_problems(client, run.info.run_id, reference_id)
    after += _tensor_mismatches(
        _weights(run_dir / "checkpoint.pt"), _weights(reference_dir / "checkpoint.pt"), "weights"
    )
    got, want = _snapshots(run_dir), _snapshots(reference_dir)
    after += [] if got.keys() == want.keys() else [f"snapshots {sorted(got)} != {sorted(want)}"]
    for name in got.keys() & want.keys():
        after += _tensor_mismatches(got[name], want[name], name)
    leftovers = _temporaries(run_dir, ".") + _temporaries(run_dir / "snapshots", ".")
    after += [f"partial write left behind: {path.name}" for path in leftovers]
    counts.record(losses=len(after))
    assert not after, after
    assert {"checkpoint", "snapshot"} <= interrupted, (
        f"no kill landed inside a write ({interrupted}); the test did not test it"
    )
