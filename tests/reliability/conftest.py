"""The fault-injection suite: the helpers its tests share, and its test count (its summary line
and JSON report are printed by tests/conftest.py, which the pytest-xdist controller loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from mlflow.entities import Run

from tests.helpers import MINI, TINY_EDM, Payload, cli, one_line_error, store

from . import counts

HERE = Path(__file__).resolve().parent

# TINY_EDM with power EMAs snapshotted every 2 steps, a checkpoint every 3 steps and MLflow
# written at every step: every kind of file the training loop writes, all the time.
EDM_EVERY_WRITE = [*TINY_EDM, "train.kimg=0", "train.checkpoint_every=3", "tracking.flush_every=1"]
__all__ = [
    "EDM_EVERY_WRITE",
    "MINI",
    "TINY_EDM",
    "InterruptAt",
    "Payload",
    "cli",
    "dmstab",
    "one_line_error",
    "only_run",
    "start_dmstab",
]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.path.resolve().parent == HERE:
        counts.record(tests=1)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    line = counts.slowest_answer()
    if line is not None:
        terminalreporter.write_line(line)


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """One thread per child: tiny models run fastest so, and in step with an in-process run."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra or {})}


def start_dmstab(
    *args: str,
    preexec_fn: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] = ("-m", "dmstab"),
) -> subprocess.Popen[str]:
    """`dmstab ARGS` as a child process in the current directory, output captured; `env` is
    added to the environment, `launcher` replaces `-m dmstab` (a script that runs dmstab)."""
    return subprocess.Popen(
        [sys.executable, *launcher, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(env),
        preexec_fn=preexec_fn,
    )


def dmstab(
    *args: str, preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    """`dmstab ARGS` run to completion."""
    process = start_dmstab(*args, preexec_fn=preexec_fn)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


class InterruptAt:
    """Training progress that presses Ctrl-C once training reports step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, total: int, completed: int) -> None:
        """Nothing to show."""

    def advance(self, step: int, loss: float, images_per_s: float) -> None:
        if step >= self.step:
            raise KeyboardInterrupt

    def stop(self) -> None:
        """Nothing to close."""


def only_run(experiment: str = "tests") -> Run:
    """The one run of `experiment` in ./mlflow.db (a resume must not start a second one)."""
    client = store()
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    [run] = client.search_runs([found.experiment_id])
    return run
