"""Every mistake of the catalogue (tests/reliability/catalogue.py), through the real command line:
exit code 2, exactly one line of output and it starts with `error:`, no traceback, nothing
written in the working directory (its digest unchanged), no MLflow store created, and an
answer in seconds (the slowest is reported in the summary, not asserted)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import typer

from dmstab.cli import app
from tests.helpers import MINI, QUICKSTART, RECIPES, TINY, TINY_EDM, Training, cli, copy_store

from . import counts
from .catalogue import CATALOGUE, Mistake
from .conftest import dmstab

TRAINED = {
    "dm": Training.of(QUICKSTART, TINY),
    "dm-no-power": Training.of(QUICKSTART, [*TINY, "ema.power_sigma_rels=[]"]),
    "edm": Training.of(MINI, TINY_EDM),
}
# what the environment may hold that a mistake sets: each case starts without them
VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "DMSTAB_PLUGINS",
    "DMSTAB_INCEPTION_WEIGHTS",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
)
# A hang guard, not a timing check: a mistake that is not refused may go on to train or sample,
# and the case then fails after this long instead of running its whole command.
HANG_S = 60


def _hung(signum: int, frame: object) -> None:
    raise TimeoutError(f"no answer within {HANG_S} s: the mistake was not refused")


def _access_by_mode_bits(path: str | os.PathLike[str], mode: int) -> bool:
    """`os.access` as a non-root owner gets it: write needs the owner's write bit. Root passes
    every mode check, and the tests run as root (CI does), so a chmod 555 folder would not
    stop them; dmstab's writability checks ask `os.access` before they probe."""
    if not os.path.exists(path):
        return False
    owner_bits = {os.R_OK: stat.S_IRUSR, os.W_OK: stat.S_IWUSR, os.X_OK: stat.S_IXUSR}
    wanted = [bit for flag, bit in owner_bits.items() if mode & flag]
    return all(os.stat(path).st_mode & bit for bit in wanted)


def digest(root: Path) -> dict[str, str]:
    """Every file and folder under `root`: its path, and its bytes' SHA-256 (folders: "dir")."""
    entries = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        entries[name] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def _fill(argument: str, places: dict[str, str]) -> str:
    return argument.format(**places)


def _prepare(mistake: Mistake, workdir: Path, run_cache: Any) -> dict[str, str]:
    """The working directory the mistake is made in: its tiny run, its files; the placeholders."""
    places = {"recipes": str(RECIPES)}
    if mistake.trained is not None:
        folder, [run] = run_cache.get((TRAINED[mistake.trained],))
        copy_store(folder, workdir)
        places |= {
            "run": run.run_id,
            "checkpoint": str(run.checkpoint),
            "run_dir": str(run.run_dir),
        }
    for name, write in mistake.files.items():
        write(workdir / _fill(name, places))
    return places


@pytest.mark.parametrize(
    "mistake", [pytest.param(mistake, id=mistake.what) for mistake in CATALOGUE]
)
def test_mistake_is_refused_in_one_line_and_nothing_is_written(
    mistake: Mistake,
    isolated_workdir: Path,
    run_cache: Any,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    places = _prepare(mistake, isolated_workdir, run_cache)
    args = [_fill(argument, places) for argument in mistake.args]
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in mistake.env.items():
        monkeypatch.setenv(variable, value)
    had_store = Path("mlflow.db").exists()
    before = digest(isolated_workdir)
    for name in mistake.read_only:
        os.chmod(name, 0o555)
    if mistake.read_only and os.geteuid() == 0:  # root writes through 0o555: judge as its owner
        monkeypatch.setattr(os, "access", _access_by_mode_bits)
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(HANG_S)
    try:
        result = dmstab(*args) if mistake.process else cli(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        counts.ANSWER_SECONDS[mistake.what] = time.perf_counter() - start
        for name in mistake.read_only:
            os.chmod(name, 0o755)
    after = digest(isolated_workdir)
    counts.record(trials=1, faults=1)

    output = result.stdout + result.stderr
    lines = output.strip().splitlines()
    assert result.returncode == 2, (result.returncode, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    assert mistake.shows in lines[0], lines[0]
    assert after == before, {k: v for k, v in after.items() if before.get(k) != v}
    assert had_store or not Path("mlflow.db").exists(), "a refusal created ./mlflow.db"


def test_catalogue_has_sixty_mistakes_over_every_command() -> None:
    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    used = {mistake.args[0] for mistake in CATALOGUE}
    assert len(CATALOGUE) >= 60
    assert commands <= used, sorted(commands - used)
    assert len({mistake.what for mistake in CATALOGUE}) == len(CATALOGUE), "ids must be unique"
