"""`dmstab fid-sweep`: FID against EMA length over `ema-reconstruct --sweep` outputs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch

from dmstab.analysis.ema_profiles import sigma_rel_to_gamma
from dmstab.analysis.scoring import image_metrics, load_reference
from dmstab.config import EvalConfig
from dmstab.train.evaluate import feature_pipeline
from tests.helpers import MINI, TINY_EDM, Runner, store

NUM_IMAGES = 12


@pytest.fixture
def sweep_dir(dmstab: Runner) -> Path:
    trained = dmstab("train", str(MINI), *TINY_EDM, "diffusion.label_dropout=0.2")
    assert trained.returncode == 0, trained.stderr
    made = dmstab("ema-reconstruct", "--sweep", "0.05:0.15:0.05")
    assert made.returncode == 0, made.stderr
    return next(Path("runs").glob("*/reconstructed"))


@pytest.mark.slow
def test_sweep_scores_each_checkpoint_and_marks_the_optimum(
    sweep_dir: Path, dmstab: Runner
) -> None:
    swept = dmstab(
        "fid-sweep",
        "--ref",
        str(next(Path("runs").glob("*/recipe.yaml"))),
        "--features",
        "random_conv",
        "--num-images",
        str(NUM_IMAGES),
        "--batch-size",
        "6",
        "--guidance",
        "1",
        "--guidance",
        "2",
        "--guide",
        "self",
    )
    assert swept.returncode == 0, swept.stderr
    rows = list(csv.DictReader(io.StringIO((sweep_dir / "fid_vs_sigma_rel.csv").read_text())))
    assert [(float(r["sigma_rel"]), float(r["guidance"])) for r in rows] == [
        (s, w) for w in (1.0, 2.0) for s in (0.05, 0.10, 0.15)
    ]
    assert (sweep_dir / "fid_vs_sigma_rel.png").read_bytes()[:4] == b"\x89PNG"

    # point σrel 0.10, no guidance: the FID of that checkpoint's own samples, scored directly
    checkpoint = Path(rows[1]["checkpoint"])
    assert f"{0.1:.4f}" in checkpoint.name
    sampled = dmstab("sample", str(checkpoint), f"sample.num_images={NUM_IMAGES}")
    assert sampled.returncode == 0, sampled.stderr
    import numpy as np

    with np.load(next(Path("samples").glob("*/heun4_seed0.npz"))) as archive:
        images = torch.from_numpy(archive["arr_0"]).permute(0, 3, 1, 2)
    pipeline = feature_pipeline(
        EvalConfig(features="random_conv", batch_size=6), torch.device("cpu")
    )
    reference = load_reference(next(Path("runs").glob("*/recipe.yaml")), pipeline)
    direct = image_metrics(pipeline.features(images), reference, pipeline, ["fid"])["fid"]
    assert float(rows[1]["fid"]) == pytest.approx(direct, rel=1e-6)

    # guidance changes the samples, hence the FIDs; the run logs both curves and the optima
    assert [r["fid"] for r in rows[:3]] != [r["fid"] for r in rows[3:]]
    client = store()
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`dmstab.kind` = 'fid-sweep'"
    )
    history = client.get_metric_history(run.info.run_id, "fid/guidance_2")
    assert [round(m.value, 6) for m in sorted(history, key=lambda m: m.step)] == [
        round(float(r["fid"]), 6) for r in rows[3:]
    ]
    best = min(rows[:3], key=lambda r: float(r["fid"]))
    assert run.data.metrics["best_sigma_rel/guidance_1"] == pytest.approx(float(best["sigma_rel"]))
    assert sigma_rel_to_gamma(float(best["sigma_rel"])) > 0


def test_sweep_refuses_what_is_not_a_sweep(sweep_dir: Path, dmstab: Runner) -> None:
    one = dmstab(
        "fid-sweep",
        str(next(sweep_dir.glob("*.pt"))),
        "--ref",
        "nowhere.npz",
        "--features",
        "random_conv",
    )
    assert one.returncode == 2 and "at least 2" in one.stderr
    plain = dmstab(
        "fid-sweep",
        str(next(Path("runs").glob("*/checkpoint.pt"))),
        str(sweep_dir),
        "--ref",
        "nowhere.npz",
        "--features",
        "random_conv",
    )
    assert plain.returncode == 2 and "carries no σrel" in plain.stderr
    no_ref = dmstab(
        "fid-sweep", str(sweep_dir), "--ref", "nowhere.npz", "--features", "random_conv"
    )
    assert no_ref.returncode == 2 and "not found" in no_ref.stderr
    for result in (one, plain, no_ref):
        assert len(result.stderr.strip().splitlines()) == 1
