"""kill -9 at random moments (a step, a checkpoint write, a snapshot write, an MLflow write),
then `--resume auto`, many times over one run: nothing on disk is ever unreadable, and the
finished run equals an uninterrupted one bit for bit, every metric step logged exactly once.
(test_soak.py does the same at scale, with sweeps, spooling and setup kills: `nox -s soak`.)"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from dmstab.config import load_recipe
from dmstab.train.loop import train
from tests.helpers import MINI, store

from . import counts
from .conftest import EDM_EVERY_WRITE, only_run
from .killing import (
    StoredRun,
    finish,
    kill_at,
    partial_writes,
    run_problems,
    start,
    unreadable_files,
)

STEPS = 90
KILLS = 12
RECIPE = [*EDM_EVERY_WRITE, f"train.steps={STEPS}"]
MOMENTS = ("step", "checkpoint", "snapshot", "flush")
PARTIAL = ("checkpoint", "phema")  # checkpoint.pt's and the snapshots' temporary files


@pytest.fixture
def reference(one_thread: None) -> Iterator[str]:
    """The same recipe trained without interruption, in this process (one thread, as the CLI)."""
    recipe = load_recipe(MINI, [*RECIPE, "tracking.experiment=reference", "train.out_dir=ref"])
    yield train(recipe).run_id


@pytest.mark.soak  # with test_soak.py in `nox -s soak`: the suite keeps fewer, shorter kills
def test_kill_9_anywhere_then_resume_auto_loses_nothing(reference: str) -> None:
    rng = random.Random(8)
    moments = [MOMENTS[i % len(MOMENTS)] for i in range(KILLS)]
    rng.shuffle(moments)
    interrupted: set[str] = set()  # the writes a kill cut short: each leaves its temp file
    left: set[str] = set()
    for index, moment in enumerate(moments):
        resume = ["--resume", "auto"] if index else []
        kill_at(start("train", str(MINI), *RECIPE, *resume), moment, rng)
        counts.killed_at(moment)
        now = {path.name for path in partial_writes()}
        new = now - left
        interrupted |= {kind for kind in PARTIAL for name in new if name[1:].startswith(kind)}
        left = now
        found = [f"after kill {index} ({moment}): {problem}" for problem in unreadable_files()]
        counts.record(resumes=1 if index else 0, losses=len(found))
        assert not found, found

    finished = finish("train", str(MINI), *RECIPE, "--resume", "auto")
    assert finished.returncode == 0, finished.stderr[-2000:]
    counts.record(resumes=1)
    client = store()
    after = run_problems(StoredRun(client, only_run().info.run_id), StoredRun(client, reference))
    counts.record(losses=len(after))
    assert not after, after
    assert set(PARTIAL) <= interrupted, (
        f"no kill landed inside a write ({interrupted}); the test did not test it"
    )
