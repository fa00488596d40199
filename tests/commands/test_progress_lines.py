"""Counted progress off a terminal (docs/cli.md): every long loop of the analyses prints
`LABEL done/total (pct)  elapsed  eta` lines, here one per item (`--progress-every 0`), the last
at done = total. The counts are the loops' own: images, grid points, Hessian-vector products,
snapshots (grid points and Hessian-vector products: tests/commands/test_terminal.py, the
sweep's children: tests/commands/test_sweep.py)."""

from __future__ import annotations

import numpy as np
import torch

from dmstab.analysis.spectrum import CountedProducts, HessianConfig
from tests.helpers import CachedRun, Runner, progress_counts

EVERY_ITEM = ("--progress-every", "0")


def test_fid_counts_reference_and_generated_images(dmstab: Runner) -> None:
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8).numpy()
    np.savez("images.npz", images)
    scored = dmstab(
        "fid", "images.npz", "--ref", "images.npz", "--features", "random_conv",
        "--batch-size", "4", *EVERY_ITEM,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert progress_counts(scored.stderr, "reference features") == [(4, 6), (6, 6)]
    assert progress_counts(scored.stderr, "features") == [(4, 6), (6, 6)]
    assert scored.stdout.startswith("FID 0.0000")  # the same images on both sides

    hourly = dmstab(  # an hour apart: the first line and the last
        "fid", "images.npz", "--ref", "images.npz", "--features", "random_conv",
        "--batch-size", "2", "--progress-every", "3600",
    )  # fmt: skip
    assert hourly.returncode == 0, hourly.stderr
    assert progress_counts(hourly.stderr, "features") == [(2, 6), (6, 6)]


def test_an_estimate_that_stops_early_jumps_to_its_end() -> None:
    seen: list[tuple[int, int]] = []
    diagonal = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    config = HessianConfig(top_k=2, max_iterations=5, trace_samples=2, slq_runs=1, lanczos_steps=4)
    counted = CountedProducts(
        lambda vector: diagonal * vector, 3, config, lambda done, total: seen.append((done, total))
    )
    product = counted(torch.ones(3, dtype=torch.float64))
    assert torch.equal(product, diagonal)  # the products themselves pass through untouched
    counted.finished(0)  # top-k stopped after one product of its 2·3
    counted.finished(1)
    counted(torch.ones(3, dtype=torch.float64))
    counted.finished(2)  # SLQ: at most its 3 (the size) Lanczos steps, one taken
    assert seen == [(0, 11), (1, 11), (6, 11), (8, 11), (9, 11), (11, 11)]


def test_ema_reconstruct_counts_snapshots(tiny_edm: CachedRun, dmstab: Runner) -> None:
    made = dmstab("ema-reconstruct", "--sigma-rel", "0.13", *EVERY_ITEM)
    assert made.returncode == 0, made.stderr
    seen = progress_counts(made.stderr, "ema-reconstruct snapshots")
    total = seen[-1][1]
    assert total >= 2 and seen == [(n, total) for n in range(1, total + 1)], made.stderr
