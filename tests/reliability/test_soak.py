"""The soak (`nox -s soak`, outside the 10-minute suite): $DMSTAB_SOAK_TRIALS kill -9s (100 in the
nox session) at random moments, seeded by $DMSTAB_SOAK_SEED (printed; set it to replay a failure).

The kills fall on chains: one training run, one sweep (a parent run and its children), or one run
that starts with its tracking server down (spooled to disk, then `dmstab sync`, itself killed at
times, uploads it). A chain is killed a few times, each time resumed (`--resume auto` or the run
id), then finished and compared with an uninterrupted run of the same recipe: no file left
unreadable, every metric step exactly once per key, the setup (params, recipe artifact, run
directory) whole, and the final checkpoint's model, EMA, power-EMA and optimizer tensors and
every power-EMA snapshot equal bit for bit (on CPU, one thread)."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Run

from dmstab.commands.sweep import SWEEP_ARTIFACT, SweepResult, load_sweep, run_sweep
from dmstab.config import load_recipe
from dmstab.tracking import TAG_KIND, TAG_PARENT
from dmstab.tracking.spool import find_spools
from dmstab.train.loop import train
from tests.helpers import MINI, store

from . import counts
from .conftest import EDM_EVERY_WRITE
from .killing import (
    SETUP_MOMENTS,
    SPOOL,
    Exited,
    StoredRun,
    finish,
    kill_at,
    metric_problems,
    run_problems,
    setup_problems,
    start,
    unreadable_files,
)

TRIALS_ENV = "DMSTAB_SOAK_TRIALS"
SEED_ENV = "DMSTAB_SOAK_SEED"
DEFAULT_TRIALS = 10  # `nox -s soak` asks for 100
STEPS = 30
SWEEP_STEPS = 15
RECIPE = [*EDM_EVERY_WRITE, f"train.steps={STEPS}"]
SWEEP_RECIPE = [*EDM_EVERY_WRITE, f"train.steps={SWEEP_STEPS}"]
SWEEP = "sweep:\n  grid:\n    train.seed: [0, 1]\n"
SWEEP_CHILDREN = 2
KILLS_PER_CHAIN = (3, 6)
TRAINING_MOMENTS = ("step", "checkpoint", "snapshot", "flush")
CHAINS = ("spool", "sweep", "train")


@dataclass(frozen=True)
class References:
    """The uninterrupted runs: a training run, and a sweep of two children."""

    train: StoredRun
    sweep: SweepResult
    sweep_parent: StoredRun


def _dead_server() -> str:
    """The URI of a tracking server that is down: a free port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _runs(kind: str) -> list[Run]:
    """The runs of `kind` in ./mlflow.db."""
    if not Path("mlflow.db").is_file():
        return []
    client = store()
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids, f"tags.`{TAG_KIND}` = '{kind}'"))


def _unfinished(kind: str) -> list[str]:
    return [run.info.run_id for run in _runs(kind) if run.info.status != "FINISHED"]


class Chain:
    """One run (or sweep) of the soak, killed `kills` times, resumed after each kill."""

    def __init__(self, kind: str, rng: random.Random, say: Callable[[str], None]) -> None:
        self.kind, self.rng, self.say = kind, rng, say
        self.args = (
            ["train", "sweep.yaml", *SWEEP_RECIPE]
            if kind == "sweep"
            else ["train", str(MINI), *RECIPE, *(["tracking.offline=true"] * (kind == "spool"))]
        )
        self.started = False
        self.done = False

    def _moments(self) -> list[str]:
        if self.kind == "spool" and not self.started:
            return ["step", "checkpoint", "snapshot", "spool"]
        setup = [] if self.started else list(SETUP_MOMENTS)
        if self.kind == "sweep":  # the next create_run: the parent's, or a new child's
            created = len(_runs("sweep")) + len(_runs("train"))
            setup = ["created"] if created < 1 + SWEEP_CHILDREN else []
        return [*TRAINING_MOMENTS, *setup]

    def _resume(self) -> list[str]:
        if not self.started:
            return []
        kind = "sweep" if self.kind == "sweep" else "train"
        unfinished = _unfinished(kind)
        if unfinished and self.rng.random() < 0.5:
            return ["--resume", unfinished[0]]
        return ["--resume", "auto"]

    def kill(self, trial: str) -> str | None:
        """Start the chain's command and kill it at a random moment; None if it finished first."""
        moment = self.rng.choice(self._moments())
        offline = self.kind == "spool" and not self.started
        env = {"MLFLOW_TRACKING_URI": _dead_server()} if offline else None
        setup = moment if moment in SETUP_MOMENTS else None
        resume = self._resume()
        counts.record(resumes=1 if resume else 0)
        self.say(f"{trial}: {self.kind}, {' '.join(resume) or 'new run'}, kill at {moment}")
        process = start(*self.args, *resume, setup_moment=setup, env=env)
        try:
            kill_at(process, moment, self.rng)
        except Exited as exited:  # it finished before the moment came: the chain is done
            assert exited.returncode == 0, str(exited)
            self.done = True
        if offline:
            self._sync()
        self.started = True
        return None if self.done else moment

    def _sync(self) -> None:
        """Upload the spool to ./mlflow.db (the server is back), killing `sync` once at random."""
        if not find_spools(SPOOL):
            return  # killed before the spool's first record: there is nothing to upload
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
        if self.rng.random() < 0.5:
            self.say("  dmstab sync, kill at sync")
            try:
                kill_at(start("sync", str(SPOOL), "--uri", uri), "sync", self.rng)
                counts.killed_at("sync")
            except Exited as exited:
                assert exited.returncode == 0, str(exited)
        if find_spools(SPOOL):  # a kill while it deleted the uploaded spool leaves none
            synced = finish("sync", str(SPOOL), "--uri", uri)
            assert synced.returncode == 0, synced.stderr[-2000:]
            assert not SPOOL.exists(), "sync left the spool behind"

    def finish(self) -> None:
        if self.done:
            return
        finished = finish(*self.args, *self._resume())
        assert finished.returncode == 0, finished.stderr[-2000:]
        counts.record(resumes=1)


def _problems(kind: str, references: References) -> list[str]:
    """The finished chain in ./mlflow.db against the uninterrupted runs."""
    client = store()
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = {
        run.info.run_id: run
        for run in client.search_runs(ids)
        if run.data.tags.get(TAG_KIND) in ("train", "sweep")
    }
    if kind != "sweep":
        assert len(runs) == 1, f"a resume started another run: {sorted(runs)}"
        return run_problems(StoredRun(client, next(iter(runs))), references.train)
    parents = [run_id for run_id, run in runs.items() if run.data.tags[TAG_KIND] == "sweep"]
    assert len(parents) == 1, f"a resume started another sweep: {parents}"
    parent = StoredRun(client, parents[0])
    problems = setup_problems(parent, references.sweep_parent, SWEEP_ARTIFACT)
    problems += metric_problems(parent, references.sweep_parent)
    status = parent.get().info.status
    problems += [] if status == "FINISHED" else [f"sweep parent {status}"]
    children = {run.data.tags["mlflow.runName"]: run for run in runs.values()}
    assert len(children) == len(runs), "two runs of one name: a resume started another child"
    for child in references.sweep.children:
        run = children.get(f"sweep/{child.label}")
        if run is None or run.data.tags.get(TAG_PARENT) != parent.run_id:
            problems.append(f"no child {child.label} under the parent")
            continue
        reference = StoredRun(references.sweep_parent.client, child.run_id)
        problems += run_problems(StoredRun(client, run.info.run_id), reference)
    return problems


def _references(folder: Path) -> References:
    """The uninterrupted runs, trained in this process (one thread, as the children)."""
    folder.mkdir()
    os.chdir(folder)
    Path("sweep.yaml").write_text(f"base: {MINI}\n{SWEEP}")
    trained = train(load_recipe(MINI, RECIPE))
    sweep = load_sweep("sweep.yaml", SWEEP_RECIPE)
    assert sweep is not None
    swept = run_sweep(sweep)
    client = store()
    return References(StoredRun(client, trained.run_id), swept, StoredRun(client, swept.run_id))


@pytest.mark.soak
def test_soak(tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    trials = int(os.environ.get(TRIALS_ENV) or DEFAULT_TRIALS)
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**31))
    rng = random.Random(seed)
    replay = f"seed {seed} (replay: {SEED_ENV}={seed} {TRIALS_ENV}={trials})"

    def say(text: str) -> None:
        with capsys.disabled():
            print(text, flush=True)

    say(f"\nsoak: {trials} kill -9 trials, {replay}")
    references = _references(tmp_path / "reference")
    done, chain_index = 0, 0
    while done < trials:
        kind = CHAINS[chain_index % len(CHAINS)]
        folder = tmp_path / f"chain{chain_index:03d}-{kind}"
        folder.mkdir()
        os.chdir(folder)
        Path("sweep.yaml").write_text(f"base: {MINI}\n{SWEEP}")
        chain = Chain(kind, rng, say)
        for _ in range(min(rng.randint(*KILLS_PER_CHAIN), trials - done)):
            moment = chain.kill(f"soak trial {done + 1}/{trials}, chain {chain_index}")
            if moment is None:
                break
            counts.killed_at(moment)
            done += 1
            found = unreadable_files()
            counts.record(losses=len(found))
            assert not found, f"{replay}, chain {chain_index} after {moment}: {found}"
        chain.finish()
        problems = _problems(kind, references)
        counts.record(losses=len(problems))
        assert not problems, f"{replay}, chain {chain_index} ({kind}): {problems}"
        chain_index += 1
