"""The kill -9 engine of the fault-injection suite (test_kill9.py, test_soak.py): start `dmstab` as
a child in the current directory, SIGKILL it at a chosen moment, and check what it leaves behind
against an uninterrupted run of the same recipe.

Moments come in two kinds. Watched ones poll the working directory from outside and kill as soon
as the child is seen writing (a checkpoint's or a snapshot's temporary file, SQLite's journal, a
spool record, a spool's `sent` mark) or after a uniformly random delay into training. Setup ones
are exact: the child (die_after.py) kills itself the moment a given MLflow call returns, e.g.
right after `create_run`, a window of milliseconds that polling would only hit by chance.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from dmstab.analysis.ema_profiles import list_snapshots, load_snapshot
from dmstab.checkpoint import load_checkpoint
from dmstab.errors import DmstabError
from dmstab.tracking import TAG_RUN_DIR
from dmstab.tracking.spool import SPOOL_DIRNAME
from dmstab.train.loop import SNAPSHOT_DIR

from .conftest import start_dmstab

POLL_S = 0.0002
EVENT_TIMEOUT_S = 180.0
JOURNAL = Path("mlflow.db-journal")  # SQLite's rollback journal: present while a write commits
SPOOL = Path("runs") / SPOOL_DIRNAME
DIE_AFTER = Path(__file__).resolve().parent / "die_after.py"
STEP_DELAY_S = 0.6  # "step": killed this long at most after the child's first own checkpoint
SYNC_DELAY_S = 0.3  # "sync": killed this long at most after the first spooled record is sent

# Setup moments: (MlflowClient method, which call) after which the child kills itself.
SETUP_MOMENTS = {
    "created": ("create_run", 1),  # the run exists, nothing else: no params, recipe, run dir
    "params": ("log_batch", 1),  # the first batch of params is logged
    "recipe": ("log_text", 1),  # the recipe artifact is logged, the run dir is not made yet
}
WATCHED_MOMENTS = ("step", "checkpoint", "snapshot", "flush", "spool", "sync")
PARTIAL_WRITES = (".checkpoint", ".phema")  # temporaries of checkpoints and of snapshots


class Exited(Exception):
    """The child ended before the moment came; `returncode` 0 means it finished its work."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.returncode = process.returncode
        self.stderr = process.communicate()[1]
        super().__init__(f"dmstab exited ({self.returncode}) first: {self.stderr[-1500:]}")


def start(
    *args: str, setup_moment: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    """`dmstab ARGS` as a child; with `setup_moment`, one that kills itself at that moment."""
    if setup_moment is None:
        return start_dmstab(*args, env=env)
    method, count = SETUP_MOMENTS[setup_moment]
    return start_dmstab(*args, env=env, launcher=[str(DIE_AFTER), method, str(count)])


def run_dirs() -> list[Path]:
    """The run directories under ./runs (not the spool, nor the links that name a synced
    offline run's directory by its server id)."""
    runs = Path("runs")
    if not runs.is_dir():
        return []
    return sorted(
        p for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "."
    )


def temporaries(directory: Path, prefix: str = ".") -> list[Path]:
    """The temporary files (`.NAME.XXXX.tmp`) of writes under way or cut short in `directory`."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(prefix) and p.suffix == ".tmp"]


def partial_writes() -> set[Path]:
    """Every run's checkpoint and snapshot temporaries."""
    found: set[Path] = set()
    for run_dir in run_dirs():
        found |= {*temporaries(run_dir, PARTIAL_WRITES[0])}
        found |= {*temporaries(run_dir / SNAPSHOT_DIR, PARTIAL_WRITES[1])}
    return found


def _checkpoints() -> frozenset[tuple[str, int, int]]:
    """(path, inode, size) of every run's checkpoint: it changes whenever one is renamed in."""
    found = set()
    for run_dir in run_dirs():
        try:
            stat = (run_dir / "checkpoint.pt").stat()
        except FileNotFoundError:
            continue
        found.add((str(run_dir), stat.st_ino, stat.st_size))
    return frozenset(found)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _spool_files(name: str) -> dict[Path, int]:
    """Size of each run spool's file `name` (records.jsonl, sent)."""
    if not SPOOL.is_dir():
        return {}
    return {p / name: _size(p / name) for p in SPOOL.iterdir()}


def wait_for(process: subprocess.Popen[str], happened: Callable[[], bool]) -> None:
    """Poll until `happened()`; `Exited` if the child ends first."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while not happened():
        if process.poll() is not None:
            raise Exited(process)
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the awaited write never came in {EVENT_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)


def _training(process: subprocess.Popen[str]) -> None:
    """Wait until this child has written a checkpoint of its own (it is training)."""
    before = _checkpoints()
    wait_for(process, lambda: bool(_checkpoints() - before))


def _changed(files: Callable[[], dict[Path, int]]) -> Callable[[], bool]:
    before = files()
    return lambda: any(size != before.get(path, -1) for path, size in files().items())


def await_moment(process: subprocess.Popen[str], moment: str, rng: random.Random | None) -> None:
    """Return at `moment` of the child's life (`Exited` if it ends first)."""
    if moment in SETUP_MOMENTS:
        process.wait(timeout=EVENT_TIMEOUT_S)  # it kills itself
        if process.returncode != -signal.SIGKILL:
            raise Exited(process)
    elif moment in ("checkpoint", "snapshot"):
        prefix = PARTIAL_WRITES[moment == "snapshot"]
        before = partial_writes()  # a kill's leftovers wait for the resume of their run
        wait_for(process, lambda: any(p.name.startswith(prefix) for p in partial_writes() - before))
    elif moment == "flush":
        _training(process)
        wait_for(process, JOURNAL.exists)
    elif moment == "spool":
        _training(process)
        wait_for(process, _changed(lambda: _spool_files("records.jsonl")))
    elif moment == "sync":
        assert rng is not None, "a random moment needs a random generator"
        wait_for(process, _changed(lambda: _spool_files("sent")))  # the first record is sent
        deadline = time.monotonic() + rng.uniform(0.0, SYNC_DELAY_S)
        wait_for(process, lambda: time.monotonic() >= deadline)
    elif moment == "step":
        assert rng is not None, "a random moment needs a random generator"
        _training(process)
        deadline = time.monotonic() + rng.uniform(0.0, STEP_DELAY_S)
        wait_for(process, lambda: time.monotonic() >= deadline)
    else:
        raise ValueError(f"unknown moment {moment!r}")


def kill_at(process: subprocess.Popen[str], moment: str, rng: random.Random | None) -> None:
    """SIGKILL the child at `moment` (a setup moment's child kills itself); `Exited` if it ends
    before the moment comes."""
    await_moment(process, moment, rng)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.communicate()


def finish(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`dmstab ARGS` left to run to its end."""
    process = start(*args, env=env)
    out, err = process.communicate(timeout=1200)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# ---------------------------------------------------------------- what a kill leaves behind


def unreadable_files() -> list[str]:
    """What kills left unreadable: a checkpoint (weights-only) or a listed snapshot."""
    problems = []
    for run_dir in run_dirs():
        if (run_dir / "checkpoint.pt").exists():
            try:
                load_checkpoint(run_dir / "checkpoint.pt")
            except DmstabError as exc:
                problems.append(str(exc))
        if (run_dir / SNAPSHOT_DIR).is_dir():
            try:
                for info in list_snapshots(run_dir / SNAPSHOT_DIR):
                    load_snapshot(info.path)
            except DmstabError as exc:
                problems.append(str(exc))
    return problems


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model, EMA, power-EMA and optimizer tensors, by one flat name each."""
    state = load_checkpoint(path)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    flat.update({f"ema.{k}": v for k, v in state["ema"]["shadow"].items()})
    for i, shadow in enumerate(state["power_ema"]["shadows"]):
        flat.update({f"power_ema{i}.{k}": v for k, v in shadow.items()})
    for index, slots in state["optimizer"]["state"].items():
        flat.update({f"optimizer.{index}.{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    return flat


def _snapshots(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    if not (run_dir / SNAPSHOT_DIR).is_dir():
        return {}
    return {
        info.path.name: load_snapshot(info.path)[0]
        for info in list_snapshots(run_dir / SNAPSHOT_DIR)
    }


def tensor_mismatches(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
) -> list[str]:
    if got.keys() != want.keys():
        return [f"{what}: keys differ ({sorted(got.keys() ^ want.keys())[:3]})"]
    return [f"{what}: {k} differs" for k, v in want.items() if not torch.equal(got[k], v)]


class StoredRun(NamedTuple):
    """A run in an MLflow store (the reference may live in a store of its own)."""

    client: MlflowClient
    run_id: str

    def get(self) -> Run:
        return self.client.get_run(self.run_id)

    def history(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))


def metric_problems(run: StoredRun, reference: StoredRun) -> list[str]:
    """Every metric step exactly once, as in the reference run; losses equal bit for bit."""
    keys, logged = (set(r.get().data.metrics) for r in (reference, run))
    problems = [f"metric keys differ: {sorted(keys ^ logged)}"] if keys != logged else []
    for key in sorted(keys & logged):
        got, want = run.history(key), reference.history(key)
        if [s for s, _ in got] != [s for s, _ in want]:
            problems.append(f"{key}: steps {[s for s, _ in got]} != {[s for s, _ in want]}")
        elif key == "train/loss" and got != want:
            problems.append("loss values differ from the uninterrupted run")
    return problems


def setup_problems(run: StoredRun, reference: StoredRun, artifact: str) -> list[str]:
    """The run's setup is whole: the reference's params (by key) and its recipe `artifact`."""
    got, want = (r.get().data.params.keys() for r in (run, reference))
    problems = [f"params differ: {sorted(got ^ want)[:5]}"] if got != want else []
    if artifact not in {a.path for a in run.client.list_artifacts(run.run_id)}:
        problems.append(f"no {artifact} artifact")
    return problems


def run_problems(run: StoredRun, reference: StoredRun) -> list[str]:
    """A finished training run against the uninterrupted reference: status, setup, every metric
    step once, the final checkpoint's tensors and every snapshot equal, no partial write left."""
    info, reference_info = run.get(), reference.get()
    problems = [] if info.info.status == "FINISHED" else [f"run status {info.info.status}"]
    problems += setup_problems(run, reference, "recipe.yaml")
    problems += metric_problems(run, reference)
    if TAG_RUN_DIR not in info.data.tags:
        return [*problems, f"no {TAG_RUN_DIR} tag"]
    run_dir, reference_dir = (Path(r.data.tags[TAG_RUN_DIR]) for r in (info, reference_info))
    if not (run_dir / "recipe.yaml").is_file():
        problems.append(f"no recipe.yaml in {run_dir}")
    problems += tensor_mismatches(
        weights(run_dir / "checkpoint.pt"), weights(reference_dir / "checkpoint.pt"), "weights"
    )
    got, want = _snapshots(run_dir), _snapshots(reference_dir)
    problems += [] if got.keys() == want.keys() else [f"snapshots {sorted(got)} != {sorted(want)}"]
    for name in got.keys() & want.keys():
        problems += tensor_mismatches(got[name], want[name], name)
    leftovers = temporaries(run_dir) + temporaries(run_dir / SNAPSHOT_DIR)
    return problems + [f"partial write left behind: {path.name}" for path in leftovers]
