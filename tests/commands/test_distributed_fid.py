"""`dmstab fid` under `torchrun` (2 gloo processes) when an input only rank 0 reads is wrong.

Rank 0 alone builds the feature network and the reference statistics while every rank samples;
were rank 0 to leave on a missing file, the other rank would wait in the sampling's collectives
for the process group's 30-minute timeout. The inputs are agreed on first
(`DistributedContext.decide_together`), so both ranks print the same line and exit at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CachedRun

CASES = {
    "missing Inception weights": (
        ["--ref", "stats.npz"],  # --features inception; HOME holds no weights
        "FID mode 'clean' needs inception-2015-12-05.pt",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(("options", "message"), CASES.values(), ids=CASES)
def test_a_wrong_input_of_rank_0_stops_both_ranks_at_once(
    options: list[str], message: str, tiny_dm: CachedRun, isolated_workdir: Path
) -> None:
    np.savez("stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, "-m", "dmstab", "fid", str(tiny_dm.checkpoint), *options]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, *command, "--num-images", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(isolated_workdir)},
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1, result.stderr[-3000:]
    assert message in errors[0]
    assert elapsed < 120, f"{elapsed:.0f} s: a rank waited for the one that had left"
