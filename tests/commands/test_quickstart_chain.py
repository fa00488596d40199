"""The quickstart's chain with no arguments: train -> ema-reconstruct -> sample -> fid.

The quickstart tracks two power EMAs by default, so `ema-reconstruct --sigma-rel 0.13` needs no
overrides; `sample` and `fid` then take the checkpoint of the latest run that wrote one (here
the reconstruction) and say which run that was; `fid` scores it as the recipe's `eval:` block
says. At toy size (TINY), with a cheap feature network and few images set at training time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dmstab.checkpoint import load_checkpoint
from tests.helpers import QUICKSTART, TINY, Runner, one_line_error, store

CHAIN = [*TINY, "ema.snapshot_every=32", "eval.features=random_conv", "eval.num_images=6"]


def _run_of_kind(kind: str) -> object:
    [run] = store().search_runs(
        [e.experiment_id for e in store().search_experiments()], f"tags.`dmstab.kind` = '{kind}'"
    )
    return run


def test_quickstart_train_reconstruct_sample_fid_with_no_arguments(
    dmstab: Runner, isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(isolated_workdir))  # the reference statistics' cache
    trained = dmstab("train", str(QUICKSTART), *CHAIN)
    assert trained.returncode == 0, trained.stderr
    [run_dir] = Path("runs").iterdir()
    snapshots = sorted(p.name for p in (run_dir / "snapshots").glob("*.pt"))
    assert len(snapshots) == 2 * 3, snapshots  # σrel 0.05 and 0.10 at 32, 64 and 96 images

    made = dmstab("ema-reconstruct", "--sigma-rel", "0.13")
    assert made.returncode == 0, made.stderr
    [checkpoint] = (run_dir / "reconstructed").glob("*.pt")
    assert load_checkpoint(checkpoint)["sigma_rel"] == 0.13
    rebuilt = _run_of_kind("ema-reconstruct").info.run_id  # type: ignore[attr-defined]

    sampled = dmstab("sample")
    assert sampled.returncode == 0, sampled.stderr
    said = " ".join(sampled.stderr.split())  # rich wraps long lines
    assert f"sampled the latest run {rebuilt} (ema-reconstruct, σrel 0.13)" in said
    sample_run = _run_of_kind("sample")
    assert sample_run.data.tags["dmstab.checkpoint"] == str(checkpoint.resolve())  # type: ignore[attr-defined]

    scored = dmstab("fid")
    assert scored.returncode == 0, scored.stderr
    assert f"scored the latest run {rebuilt}" in " ".join(scored.stderr.split())
    assert scored.stdout.startswith("FID ") and "(6 images," in scored.stdout
    fid_run = _run_of_kind("fid")
    params = fid_run.data.params  # type: ignore[attr-defined]
    assert params["checkpoint"] == str(checkpoint.resolve())
    assert params["features"] == "random_conv"
    assert params["reference"] == "synthetic training set (16px)"

    # After a sweep, the latest run wrote several checkpoints: the user must name one.
    assert dmstab("ema-reconstruct", "--sweep", "0.10:0.12:0.02").returncode == 0
    refused = dmstab("sample")
    assert "wrote 2 checkpoints in" in one_line_error(refused)
    assert "name one of them, or a training run id" in refused.stderr
