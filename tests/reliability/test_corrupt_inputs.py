"""Truncated, corrupt, foreign and malicious files are refused: exit 2, one line naming the
file, nothing overwritten, and no pickled code ever runs (weights-only loading everywhere)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dmstab.config import load_recipe
from dmstab.train.loop import SNAPSHOT_DIR, train
from tests.helpers import MINI, RECIPES, TINY, TINY_EDM, cli, one_line_error, store

from . import counts
from .conftest import InterruptAt, Payload, only_run

QUICKSTART = RECIPES / "quickstart.yaml"
RECIPE = [*TINY, "train.steps=8", "train.checkpoint_every=4"]
MARKER = "pwned"  # the file a malicious pickle would create


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _malicious(path: Path) -> None:
    torch.save({"model": {"weight": Payload(Path(MARKER).resolve())}}, path)


def _other_recipe(path: Path) -> None:
    """The checkpoint of a run with another recipe (a different learning rate)."""
    other = train(
        load_recipe(
            QUICKSTART,
            [*RECIPE, "optim.lr=0.002", "train.out_dir=other", "tracking.experiment=other"],
        )
    )
    path.write_bytes(other.checkpoint.read_bytes())


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "is corrupt or truncated"),
    "random bytes": (_random_bytes, "refused by weights-only loading: corrupt or not a torch"),
    "malicious pickle": (_malicious, "refused by weights-only loading: it references"),
    "another recipe": (_other_recipe, "belongs to a different recipe"),
}


def _refused(args: list[str], expected: str, protected: Path) -> int:
    """Run `dmstab ARGS`, check the one-line refusal; returns the losses found (0 or more)."""
    before = protected.read_bytes()
    line = one_line_error(cli(*args))
    counts.record(trials=1, faults=1)
    losses = int(protected.read_bytes() != before) + int(Path(MARKER).exists())
    counts.record(losses=losses)
    assert expected in line, line
    return losses


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The malicious files below would really run code: loading one unsafely makes the marker."""
    _malicious(tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert Path(MARKER).exists()


@pytest.mark.slow
def test_damaged_checkpoint_is_refused_by_resume_and_sample_then_resume_works() -> None:
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(QUICKSTART, RECIPE), progress=InterruptAt(6))
    [checkpoint] = Path("runs").glob("*/checkpoint.pt")
    genuine = checkpoint.read_bytes()
    losses = 0
    for name, (damage, expected) in DAMAGE.items():
        damage(checkpoint)
        resume = ["train", str(QUICKSTART), *RECIPE, "--resume", "auto"]
        losses += _refused(resume, expected, checkpoint)
        if name != "another recipe":  # sampling takes the recipe the checkpoint carries
            losses += _refused(["sample", str(checkpoint)], expected, checkpoint)
        checkpoint.write_bytes(genuine)
    assert losses == 0 and not Path(MARKER).exists()
    finished = cli("train", str(QUICKSTART), *RECIPE, "--resume", "auto")
    assert finished.returncode == 0, finished.stderr[-2000:]
    counts.record(resumes=1)
    run_id = only_run().info.run_id
    steps = sorted(m.step for m in store().get_metric_history(run_id, "loss"))
    assert steps == list(range(1, 9)), "the refused resumes lost or duplicated metric steps"


def test_damaged_snapshot_is_refused_by_ema_reconstruct(one_thread: None) -> None:
    run = train(load_recipe(MINI, TINY_EDM))
    snapshots = run.run_dir / SNAPSHOT_DIR
    target = sorted(snapshots.glob("*.pt"))[0]
    genuine = target.read_bytes()
    losses = 0
    for damage, expected in (
        (_truncate, "is corrupt or truncated"),
        (_malicious, "refused by weights-only loading: it references"),
    ):
        damage(target)
        args = ["ema-reconstruct", "--snapshots", str(snapshots), "--sigma-rel", "0.13"]
        losses += _refused(args, expected, target)
        target.write_bytes(genuine)
    assert losses == 0
    assert not list((run.run_dir / "reconstructed").glob("*.pt")), "a refused run wrote output"


def _images(path: Path) -> Path:
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(path, images)
    return path


def _stats(path: Path, **overrides: object) -> Path:
    arrays: dict[str, object] = {"mu": np.zeros(4), "sigma": np.eye(4), **overrides}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: _truncate(_stats(p)), "is not a readable .npz of statistics or images"),
        (lambda p: p.write_bytes(os.urandom(4096)), "is not a readable .npz of statistics"),
        (lambda p: _stats(p, mu=np.array([Payload(Path(MARKER).resolve())], dtype=object)),
         "is not a readable .npz statistics file"),
        (lambda p: _stats(p, sigma=np.eye(3)), "sigma"),
    ],
    ids=["truncated", "random bytes", "malicious pickle", "mismatched shapes"],
)  # fmt: skip
def test_corrupt_fid_statistics_are_refused(make: Callable[[Path], object], expected: str) -> None:
    reference = Path("ref.npz")
    make(reference)
    args = ["fid", str(_images(Path("images.npz"))), "--ref", str(reference)]
    assert _refused([*args, "--features", "random_conv"], expected, reference) == 0
    assert not Path(MARKER).exists()


def test_malicious_checkpoint_is_refused_by_fid() -> None:
    evil = Path("evil.pt")
    _malicious(evil)
    stats = str(_stats(Path("ref.npz")))
    args = ["fid", str(evil), "--ref", stats, "--features", "random_conv", "--num-images", "4"]
    assert _refused(args, "refused by weights-only loading", evil) == 0
