"""What tests share besides fixtures: recipe constants, the MLflow store of the working directory,
the in-process CLI runner, a real `python -m dmstab` child, and the session cache of tiny runs.

Test modules import from here (never from another test module or a conftest).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dmstab.tracking import resolve_uri

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
MINI = RECIPES / "edm2_mini.yaml"
QUICKSTART = RECIPES / "quickstart.yaml"
DCGAN = RECIPES / "mini_dcgan.yaml"
PAPER_TEXT = ROOT.parent / "shared" / "papers" / "dm-training-stability-aaai2024.txt"

# A model of a few thousand parameters on 16x16 synthetic shapes: seconds per run on a CPU.
TINY = [
    "data.synthetic_size=256",
    "data.resolution=16",
    "model.channels=32",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[8]",
    "model.num_heads=2",
    "diffusion.steps=100",
    "timesteps.mu=30",
    "timesteps.sigma=100",
    "timesteps.target_iteration=10",
    "timesteps.histogram_every=5",
    "train.batch_size=8",
    "train.steps=12",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "train.precision=fp32",
    "sample.steps=5",
    "sample.eta=0",  # deterministic DDIM, and `sample.sampler=ddpm` needs no more overrides
    "eval.features=inception",  # the schema's default (the quickstart's is the classifier)
    "sample.num_images=4",
    "sample.batch_size=4",
    "tracking.flush_every=5",
    "tracking.experiment=tests",
]

TINY_GAN = [  # mini_dcgan at 16×16 with 4 channels and z of 8: a few seconds of training
    "data.synthetic_size=64",
    "data.resolution=16",
    "model.g_channels=4",
    "model.d_channels=4",
    "model.z_dim=8",
    "train.batch_size=8",
    "tracking.experiment=tests",
]

# edm2_mini at a few thousand parameters on 16x16 shapes: seconds per run on a CPU.
TINY_EDM = [
    "data.synthetic_size=256",
    "data.resolution=16",
    "model.channels=16",
    "model.channel_mult=[1,2]",
    "model.edm2.channels_per_head=16",
    "model.edm2.logvar_channels=16",
    "train.kimg=0.096",
    "train.batch_size=8",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "train.precision=fp32",
    "optim.ref_kimg=0.032",
    "optim.rampup_kimg=0.016",
    "ema.snapshot_every=16",
    "sample.steps=4",
    "sample.num_images=4",
    "sample.batch_size=4",
    "tracking.flush_every=5",
    "tracking.experiment=tests",
]


Runner = Callable[..., subprocess.CompletedProcess[str]]  # the `dmstab` fixture's type


def store() -> MlflowClient:
    """A client on the default store of the current working directory (./mlflow.db)."""
    return MlflowClient(resolve_uri(None))


class Payload:
    """A malicious pickle: unpickling it runs `touch MARKER` (weights-only loading refuses it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------- the command line


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`dmstab ARGS` in this process through typer's CliRunner: the same path from the argument
    list to the exit code as the installed command, without the interpreter's start-up.

    stdout and stderr stay apart (click >= 8.2); an exception that escaped the command (a bug,
    not a refusal) is appended to stderr with its traceback, as the real command would print it.
    """
    from dmstab.cli import app

    result = CliRunner().invoke(app, list(args))
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["dmstab", *args], result.exit_code, result.stdout, stderr)


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int = 2) -> str:
    """The single `error:` line a refused command prints, after checking its exit code."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def failure_line(result: subprocess.CompletedProcess[str], exit_code: int = 1) -> str:
    """The `error:` line a run that started and then failed ends with (after its run and
    progress lines): the last line of stderr, the only `error:` line, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[-1]


# --------------------------------------------------------------- tiny runs trained once a session


@dataclass(frozen=True)
class Training:
    """One `train` of `recipe` with `overrides`, in-process, as a test would call it."""

    recipe: Path
    overrides: tuple[str, ...]

    @classmethod
    def of(cls, recipe: Path, overrides: Sequence[str]) -> Training:
        return cls(recipe, tuple(overrides))


@dataclass(frozen=True)
class CachedRun:
    """A finished training run as `train` returned it, with paths relative to its store folder."""

    run_id: str
    run_dir: Path
    step: int
    checkpoint: Path
    samples: Path | None


def _relative(path: Path | None, root: Path) -> Path | None:
    return None if path is None else path.resolve().relative_to(root)


def train_into(folder: Path, trainings: Sequence[Training]) -> list[CachedRun]:
    """Train each of `trainings` in turn with `folder` as the working directory (its ./runs and
    ./mlflow.db), in an environment like the one `isolated_workdir` gives a test."""
    from dmstab.config import load_recipe
    from dmstab.train.loop import train

    folder = folder.resolve()
    made = []
    with _working_directory(folder):
        for training in trainings:
            result = train(load_recipe(training.recipe, list(training.overrides)))
            made.append(
                CachedRun(
                    run_id=result.run_id,
                    run_dir=_relative(result.run_dir, folder),  # type: ignore[arg-type]
                    step=result.step,
                    checkpoint=_relative(result.checkpoint, folder),  # type: ignore[arg-type]
                    samples=_relative(result.samples, folder),
                )
            )
    return made


class _working_directory:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> None:
        import pytest

        self._patch = pytest.MonkeyPatch()
        self._patch.chdir(self.folder)
        self._patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        self._patch.setenv("PYTHONHASHSEED", "0")

    def __exit__(self, *exc: object) -> None:
        self._patch.undo()


def copy_store(source: Path, target: Path) -> None:
    """Copy a folder holding ./mlflow.db, ./runs and MLflow's artifacts into `target`, and make
    the copy stand alone: the store records absolute paths (each experiment's artifact location,
    each run's artifact URI, the `dmstab.run_dir` tag), which are rewritten from `source` to
    `target`. Any other file that still names `source` fails the copy loudly."""
    source, target = source.resolve(), target.resolve()
    assert not (target / "mlflow.db").exists(), f"{target} already has a store"
    for entry in source.iterdir():
        destination = target / entry.name
        if entry.is_dir():
            shutil.copytree(entry, destination, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, destination)
    old, new = str(source), str(target)
    with sqlite3.connect(target / "mlflow.db") as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], str(column[2]).upper()
                if "CHAR" in kind or "TEXT" in kind or "CLOB" in kind:
                    db.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                        f'WHERE instr("{name}", ?) > 0',
                        (old, new, old),
                    )
        for table in tables:  # nothing may point back at the shared folder
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                name = column[1]
                (left,) = db.execute(
                    f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{name}" AS TEXT), ?) > 0',
                    (old,),
                ).fetchone()
                assert left == 0, f"{table}.{name} still names {old}"
    needle = old.encode()
    for path in target.rglob("*"):
        if path.is_file() and path.name != "mlflow.db":
            assert needle not in path.read_bytes(), f"{path} names the shared folder {old}"


def relocate(run: CachedRun, target: Path) -> CachedRun:
    """`run` with its paths made absolute under `target` (as `train` would have returned them)."""
    return replace(
        run,
        run_dir=target / run.run_dir,
        checkpoint=target / run.checkpoint,
        samples=None if run.samples is None else target / run.samples,
    )


def progress_counts(stderr: str, label: str) -> list[tuple[int, int]]:
    """(done, total) of each plain progress line of `label`, checking the line's whole form."""
    line = re.compile(
        rf"^{re.escape(label)} (\d+)/(\d+) \((\d+)%\)  elapsed \d+(s|m\d\ds|h\d\dm)  eta \S+$"
    )
    found = []
    for text in stderr.splitlines():
        if match := line.match(text):
            done, total = int(match[1]), int(match[2])
            assert int(match[3]) == round(100 * done / total), text
            found.append((done, total))
    return found
