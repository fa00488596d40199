"""A full disk while a checkpoint or snapshot is written: one clear line, exit 2, the previous
file intact, no temporary file left, and the run resumes once there is room again.

The disk is filled with RLIMIT_FSIZE (portable, no root needed): a write past the limit fails
with EFBIG ("File too large"), as a full disk fails with ENOSPC, through the same code path.
Where tmpfs can be mounted (root), a real full filesystem gives ENOSPC as well.
"""

from __future__ import annotations

import resource
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from dmstab.analysis.ema_profiles import list_snapshots, load_snapshot
from dmstab.checkpoint import load_checkpoint
from dmstab.config import load_recipe
from dmstab.errors import DmstabError
from dmstab.train.loop import train
from dmstab.train.power_ema import PowerEMA
from tests.helpers import RECIPES, TINY, cli, failure_line, store

from . import counts
from .conftest import InterruptAt, dmstab, only_run

LIMIT = 4 * 2**20  # bytes: above the MLflow store's size, below a TINY checkpoint's (~12 MB)
RECIPE = [*TINY, "train.steps=12", "train.checkpoint_every=4"]


def _limit_file_size() -> None:
    """In the child: files cannot grow past LIMIT, and crossing it is an error, not a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*.tmp")]


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_keeps_the_previous_one_then_resumes() -> None:
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(RECIPES / "quickstart.yaml", RECIPE), progress=InterruptAt(6))
    [checkpoint] = Path("runs").glob("*/checkpoint.pt")
    before = checkpoint.read_bytes()
    assert len(before) > LIMIT, "the checkpoint must outgrow the limit for the test to bite"

    full = dmstab(
        "train", str(RECIPES / "quickstart.yaml"), *RECIPE, "--resume", "auto",
        preexec_fn=_limit_file_size,
    )  # fmt: skip
    line = failure_line(full, exit_code=2)
    assert f"cannot write {checkpoint.resolve()}: File too large" in line
    assert "the previous checkpoint.pt is intact" in line
    losses = int(checkpoint.read_bytes() != before) + len(_temporaries(Path("runs")))
    counts.record(trials=1, faults=1, losses=losses)
    assert checkpoint.read_bytes() == before, "the previous checkpoint was touched"
    assert not _temporaries(Path("runs")), "a temporary file was left behind"

    # in process: only the full disk above needs a child
    room = cli("train", str(RECIPES / "quickstart.yaml"), *RECIPE, "--resume", "auto")
    assert room.returncode == 0, room.stderr[-2000:]
    run = only_run()
    steps = sorted(m.step for m in store().get_metric_history(run.info.run_id, "train/loss"))
    counts.record(resumes=2, losses=int(steps != list(range(1, 13))))
    assert run.info.status == "FINISHED" and steps == list(range(1, 13))


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE in this process for a moment (the soft limit only, so it can be restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_full_disk_at_a_snapshot_keeps_the_earlier_snapshots(tmp_path: Path) -> None:
    model = nn.Linear(256, 256)
    ema = PowerEMA(model, [0.05, 0.10])
    ema.update(model, 1)
    ema.save_snapshots(tmp_path, torch.float32)
    listed = list_snapshots(tmp_path)
    originals = {info.path: info.path.read_bytes() for info in listed}
    ema.update(model, 2)
    with _file_size_limit(64 * 1024), pytest.raises(DmstabError) as info:
        ema.save_snapshots(tmp_path, torch.float32)  # each snapshot is ~260 kB
    message = str(info.value)
    assert "cannot write" in message and "File too large; nothing was written" in message
    assert "\n" not in message
    unchanged = list_snapshots(tmp_path) == listed and all(
        path.read_bytes() == data for path, data in originals.items()
    )
    counts.record(trials=1, faults=1, losses=int(not unchanged) + len(_temporaries(tmp_path)))
    assert unchanged and not _temporaries(tmp_path)
    for snapshot in listed:
        load_snapshot(snapshot.path)


@contextmanager
def _small_tmpfs(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` MiB at `mount_point` (skips the test where mounting is not allowed)."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()[:120]}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_really_full_filesystem_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """20 MiB holds one ~12 MB checkpoint but not the next one's temporary copy beside it."""
    with _small_tmpfs(tmp_path / "disk", 20) as disk:
        recipe = [*RECIPE, f"train.out_dir={disk / 'runs'}"]
        full = dmstab("train", str(RECIPES / "quickstart.yaml"), *recipe)
        line = failure_line(full, exit_code=2)
        [checkpoint] = (disk / "runs").glob("*/checkpoint.pt")
        assert f"cannot write {checkpoint}: No space left on device" in line
        assert "the previous checkpoint.pt is intact" in line
        kept_step = load_checkpoint(checkpoint)["step"]
        leftovers = _temporaries(disk)
        counts.record(trials=1, faults=1, losses=int(kept_step != 4) + len(leftovers))
        assert kept_step == 4 and not leftovers
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        room = dmstab("train", str(RECIPES / "quickstart.yaml"), *recipe, "--resume", "auto")
        assert room.returncode == 0, room.stderr[-2000:]
        run = only_run()
        steps = sorted(m.step for m in store().get_metric_history(run.info.run_id, "train/loss"))
        counts.record(resumes=1, losses=int(steps != list(range(1, 13))))
        assert run.info.status == "FINISHED" and steps == list(range(1, 13))
