"""kill -9 between a run's creation in MLflow and the end of its setup (params, recipe artifact,
run directory and its tag), of a training run and of a sweep's parent: `--resume auto` finds
the run by the tags it was created with, completes the missing setup and finishes the run as
if it had never been killed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmstab.commands.sweep import SWEEP_ARTIFACT, load_sweep, run_sweep
from dmstab.config import load_recipe
from dmstab.tracking import TAG_KIND, TAG_PARENT
from dmstab.train.loop import train
from tests.helpers import MINI, TINY_EDM, store

from . import counts
from .conftest import only_run
from .killing import StoredRun, finish, kill_at, run_problems, setup_problems, start

GRID = "sweep:\n  grid:\n    train.seed: [0, 1]\n"


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["created"])  # test_soak.py also kills at "params", "recipe"
def test_a_run_killed_in_its_setup_gets_it_on_resume(one_thread: None, moment: str) -> None:
    reference = train(load_recipe(MINI, [*TINY_EDM, "tracking.experiment=reference"])).run_id
    kill_at(start("train", str(MINI), *TINY_EDM, setup_moment=moment), moment, None)
    counts.killed_at(moment)
    killed = only_run()
    assert killed.info.status == "RUNNING"  # a kill -9, not an error, ended it

    finished = finish("train", str(MINI), *TINY_EDM, "--resume", "auto")
    assert finished.returncode == 0, finished.stderr[-2000:]
    counts.record(resumes=1)
    assert only_run().info.run_id == killed.info.run_id
    client = store()
    problems = run_problems(StoredRun(client, killed.info.run_id), StoredRun(client, reference))
    counts.record(losses=len(problems))
    assert not problems, problems


def _runs(kind: str, experiment: str) -> list[str]:
    client = store()
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id], f"tags.`{TAG_KIND}` = '{kind}'")
    return [run.info.run_id for run in runs]


@pytest.mark.slow
def test_a_sweep_parent_killed_in_its_setup_gets_it_on_resume(one_thread: None) -> None:
    Path("sweep.yaml").write_text(f"base: {MINI}\n{GRID}")
    sweep = load_sweep("sweep.yaml", [*TINY_EDM, "tracking.experiment=reference"])
    assert sweep is not None
    reference = run_sweep(sweep)
    kill_at(start("train", "sweep.yaml", *TINY_EDM, setup_moment="created"), "created", None)
    counts.killed_at("created")
    [parent] = _runs("sweep", "tests")
    assert store().get_run(parent).data.params == {}  # the kill came before the params

    finished = finish("train", "sweep.yaml", *TINY_EDM, "--resume", "auto")
    assert finished.returncode == 0, finished.stderr[-2000:]
    counts.record(resumes=1)
    client = store()
    assert _runs("sweep", "tests") == [parent]
    problems = setup_problems(
        StoredRun(client, parent), StoredRun(client, reference.run_id), SWEEP_ARTIFACT
    )
    problems += [] if client.get_run(parent).info.status == "FINISHED" else ["parent unfinished"]
    children = {
        client.get_run(run).data.tags["mlflow.runName"]: run for run in _runs("train", "tests")
    }
    for child in reference.children:
        run_id = children.get(f"sweep/{child.label}")
        assert run_id is not None, f"no child {child.label}: {sorted(children)}"
        assert client.get_run(run_id).data.tags[TAG_PARENT] == parent
        problems += run_problems(StoredRun(client, run_id), StoredRun(client, child.run_id))
    counts.record(losses=len(problems))
    assert not problems, problems
