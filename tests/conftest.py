"""Shared fixtures: every test gets its own working directory and MLflow store; the in-process
CLI runner; tiny runs trained once a session and copied into the tests that read them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import dmstab.commands

from .helpers import (
    DCGAN,
    MINI,
    QUICKSTART,
    RECIPES,
    TINY,
    TINY_EDM,
    TINY_GAN,
    CachedRun,
    Runner,
    Training,
    cli,
    copy_store,
    relocate,
    store,
    train_into,
)
from .inception_standin import write_torchscript_inception
from .reliability import counts as fault_injection

REPORT_ENV = "DMSTAB_RELIABILITY_REPORT"  # where to write the fault-injection totals as JSON

__all__ = ["RECIPES", "TINY", "TINY_GAN", "store"]  # older imports from this module keep working

# The session's shared runs (a test that reads one gets a private copy of its store):
TINY_DM_RUN = (Training.of(QUICKSTART, TINY),)
# TINY_EDM trains 12 steps of 8 images: power-EMA snapshots every 16 images, 2 σrel profiles
TINY_EDM_RUN = (Training.of(MINI, TINY_EDM),)
TINY_GAN_RUN = (
    Training.of(
        DCGAN,
        [
            *TINY_GAN,
            "train.steps=6",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=[2]",
        ],
    ),
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker uses one thread: tiny networks run fastest so, and two
    workers then share the two cores without oversubscribing them."""
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first. Under `--dist worksteal` the first worker's share begins with all of
    them while the second runs fast tests and then steals from the end of the first's queue, so
    the slow tests (most spawn processes of their own) run beside one-thread fast ones. Dealing
    the slow tests over both workers instead ran them side by side and took longer (9:53 against
    8:03 for the suite on 2 cores)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its fault-injection totals to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_injection"] = dict(fault_injection.TOTALS)
        workeroutput["fault_injection_moments"] = dict(fault_injection.MOMENTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """The pytest-xdist controller adds up its workers' fault-injection totals."""
    output = getattr(node, "workeroutput", {})
    fault_injection.merge(
        output.get("fault_injection", {}), output.get("fault_injection_moments", {})
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault-injection suite's line and its kills by moment, and its totals as JSON at
    $DMSTAB_RELIABILITY_REPORT."""
    if not fault_injection.TOTALS["tests"]:
        return
    terminalreporter.write_line(fault_injection.summary())
    moments = fault_injection.moments_line()
    if moments is not None:
        terminalreporter.write_line(moments)
    target = os.environ.get(REPORT_ENV)
    if target:
        Path(target).write_text(json.dumps(fault_injection.TOTALS, indent=1) + "\n")


@pytest.fixture(autouse=True)
def isolated_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield tmp_path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For tiny networks: one thread is faster, and immune to a busy machine's other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dmstab() -> Runner:
    """`dmstab(*args)` runs the command line in this process (typer's CliRunner) and returns a
    CompletedProcess: returncode, stdout and stderr apart. Subprocesses are kept for what needs a
    real process: kill -9, torchrun, a live server."""
    return cli


@pytest.fixture(scope="session")
def torchscript_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a random-weight stand-in for inception-2015-12-05.pt (made once)."""
    return write_torchscript_inception(tmp_path_factory.mktemp("inception"))


class RunCache:
    """Trainings done once a session, each group in its own folder with its own ./mlflow.db."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._made: dict[tuple[Training, ...], tuple[Path, list[CachedRun]]] = {}

    def get(self, trainings: tuple[Training, ...]) -> tuple[Path, list[CachedRun]]:
        if trainings not in self._made:
            folder = self._factory.mktemp("shared-runs")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the same weights whichever test asks first
            try:
                self._made[trainings] = folder, train_into(folder, trainings)
            finally:
                torch.set_num_threads(threads)
        return self._made[trainings]


@pytest.fixture(scope="session")
def run_cache(tmp_path_factory: pytest.TempPathFactory) -> RunCache:
    return RunCache(tmp_path_factory)


@pytest.fixture
def trained_runs(run_cache: RunCache, isolated_workdir: Path) -> Callable[..., list[CachedRun]]:
    """`trained_runs(Training, ...)`: those runs, trained once a session in one store, copied
    (./runs, ./mlflow.db, artifacts) into this test's working directory; the copy's absolute
    paths point into the copy, so the test may read and write it like runs it trained itself."""

    def copy(*trainings: Training) -> list[CachedRun]:
        folder, runs = run_cache.get(tuple(trainings))
        copy_store(folder, isolated_workdir)
        return [relocate(run, isolated_workdir) for run in runs]

    return copy


@pytest.fixture
def tiny_dm(trained_runs: Callable[..., list[CachedRun]]) -> CachedRun:
    """quickstart with TINY: 12 steps, checkpoints every 4, in ./mlflow.db (experiment `tests`)."""
    (run,) = trained_runs(*TINY_DM_RUN)
    return run


@pytest.fixture
def tiny_edm(trained_runs: Callable[..., list[CachedRun]]) -> CachedRun:
    """edm2_mini with TINY_EDM: 12 steps, power-EMA snapshots every 16 images."""
    (run,) = trained_runs(*TINY_EDM_RUN)
    return run


@pytest.fixture
def tiny_gan(trained_runs: Callable[..., list[CachedRun]]) -> CachedRun:
    """mini_dcgan with TINY_GAN: 6 steps, checkpoints every 2, the one of step 2 kept."""
    (run,) = trained_runs(*TINY_GAN_RUN)
    return run
