"""Outputs that cannot be written: one line, exit 2, before any run, file or computation, and
none of MLflow's minutes of SQLAlchemy retries.

Root passes every permission check, so a read-only directory (chmod 555) does not stop a test
run as root, as CI runs; and another user cannot start this interpreter (it lives under
/root). So the tests put a regular file where a directory must be, which stops root as well
(ENOTDIR), and check the mode-bit branch with `os.access` answering as it does for another
user of a chmod 555 directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dmstab.atomic import require_writable_directory
from dmstab.errors import DmstabError
from dmstab.tracking import check_store_writable
from tests.helpers import QUICKSTART, TINY, CachedRun, cli, one_line_error

from . import counts

BLOCKER = Path("blocker")  # a regular file: nothing can be created under it
STORE_UNDER_BLOCKER = f"sqlite:///{BLOCKER}/mlflow.db"
WRITTEN = ("mlflow.db", "mlruns", "runs", "samples", "analyses")


@pytest.fixture(autouse=True)
def blocker(isolated_workdir: Path) -> Path:
    BLOCKER.write_text("")
    return BLOCKER


def _read_only_for(directory: Path) -> Callable[[str | os.PathLike[str], int], bool]:
    """`os.access` as another user of a chmod 555 `directory` sees it."""
    real = os.access

    def access(path: str | os.PathLike[str], mode: int) -> bool:
        if Path(path).absolute() == directory.absolute() and mode & os.W_OK:
            return False
        return real(path, mode)

    return access


def test_a_directory_under_a_file_or_read_only_is_refused_and_a_new_one_is_not_made() -> None:
    with pytest.raises(DmstabError, match=r"cannot write train.out_dir blocker/runs: .*/blocker "):
        require_writable_directory(BLOCKER / "runs", "train.out_dir")
    require_writable_directory(Path("new/nested"), "x")  # judged at ./, created by nobody
    assert sorted(os.listdir()) == ["blocker"]  # the probe file is gone too


def test_a_read_only_directory_is_refused_by_its_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    Path("outputs").mkdir()
    monkeypatch.setattr(os, "access", _read_only_for(Path("outputs")))
    with pytest.raises(DmstabError, match=r"samples folder outputs/x: .*outputs is a read-only"):
        require_writable_directory(Path("outputs/x"), "the samples folder")


def test_the_store_is_judged_by_its_directory_its_file_and_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(DmstabError, match=r"the MLflow store's directory .*blocker: it is not"):
        check_store_writable(STORE_UNDER_BLOCKER)
    check_store_writable("http://127.0.0.1:9")  # a server is the spool's business
    Path("mlflow.db").write_bytes(b"")
    monkeypatch.setattr(os, "access", _read_only_for(Path("mlflow.db")))
    with pytest.raises(DmstabError, match=r"MLflow store .*mlflow.db: it is read-only"):
        check_store_writable(None)
    monkeypatch.setattr(os, "access", _read_only_for(Path.cwd()))
    with pytest.raises(DmstabError, match=r"the working directory \(MLflow's ./mlruns\)"):
        check_store_writable("sqlite:////tmp/elsewhere.db")


SWEEP = f"base: {QUICKSTART}\nsweep:\n  grid:\n    train.seed: [0, 1]\n"
TRAIN = ["train", str(QUICKSTART), *TINY]
REFUSED_AT_ONCE = {
    "train out_dir": ([*TRAIN, "train.out_dir=blocker/runs"], "cannot write train.out_dir"),
    "train store": ([*TRAIN, f"tracking.uri={STORE_UNDER_BLOCKER}"], "MLflow store's directory"),
    "sweep child out_dir": (
        ["train", "sweep.yaml", "train.out_dir=blocker/runs"],
        "cannot write train.out_dir blocker/runs",
    ),
    "analysis of a recipe, before training it": (
        ["hessian", str(QUICKSTART), *TINY, "tracking.uri=" + STORE_UNDER_BLOCKER],
        "MLflow store's directory",
    ),
    "fid store": (["fid", "images.npz", "--ref", "stats.npz"], "MLflow store's directory"),
    "fid-sweep store": (["fid-sweep", "--ref", "stats.npz"], "MLflow store's directory"),
    "fid statistics cache": (
        ["fid", "images.npz", "--ref", str(QUICKSTART), "--features", "random_conv"],
        "cannot write the statistics cache",
    ),
}


@pytest.mark.parametrize(("args", "expected"), REFUSED_AT_ONCE.values(), ids=REFUSED_AT_ONCE)
def test_unwritable_outputs_are_refused_before_anything_runs(
    args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("sweep.yaml").write_text(SWEEP)
    if "store" in expected and args[0].startswith("fid"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", STORE_UNDER_BLOCKER)
    monkeypatch.setenv("HOME", str(BLOCKER / "home"))  # the statistics cache under a file
    _refused(args, expected)


def test_a_trained_models_commands_refuse_their_unwritable_folders(tiny_dm: CachedRun) -> None:
    """sample's samples/, the analyses' analyses/ as files: refused before the network runs."""
    checkpoint = str(tiny_dm.checkpoint)
    Path("samples").write_text("")
    _refused(["sample", checkpoint], "cannot write the samples folder samples: it is not a")
    for command in (["hessian", checkpoint], ["landscape", checkpoint]):
        Path("analyses").write_text("")
        _refused(command, "cannot write the analyses folder analyses: it is not a directory")
    _refused(["consistency", checkpoint, checkpoint], "the analyses folder analyses")


def test_ema_reconstruct_refuses_an_unwritable_out_before_reconstructing(
    tiny_edm: CachedRun,
) -> None:
    snapshots = tiny_edm.run_dir / "snapshots"
    args = ["ema-reconstruct", "--sigma-rel", "0.1", "--snapshots", str(snapshots)]
    _refused([*args, "--out", "blocker/out"], "cannot write the reconstruction folder")


def _refused(args: list[str], expected: str) -> None:
    before = set(Path().rglob("*"))
    np.savez("images.npz", np.zeros((2, 8, 8, 3), np.uint8))
    np.savez("stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    made = {Path("images.npz"), Path("stats.npz")}
    started = time.monotonic()
    line = one_line_error(cli(*args))
    elapsed = time.monotonic() - started
    written = sorted(str(p) for p in set(Path().rglob("*")) - before - made)
    counts.record(trials=1, faults=1, losses=len(written))
    assert expected in line, line
    assert not written, f"a refused command wrote {written}"
    assert elapsed < 30, f"{elapsed:.0f} s to refuse: MLflow retried the store?"
