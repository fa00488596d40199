"""`dmstab fid` through the real CLI, with a random-weight stand-in Inception file."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dmstab.analysis.features import WEIGHTS_ENV
from dmstab.analysis.frechet import FeatureStats
from dmstab.data.synthetic import generate_shapes
from tests.helpers import RECIPES, Runner, store

Scoring = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def scoring(dmstab: Runner, monkeypatch: pytest.MonkeyPatch) -> Scoring:
    """`dmstab` in process with `env` set for the call (HOME, the stand-in weights)."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with monkeypatch.context() as patch:
            patch.delenv(WEIGHTS_ENV, raising=False)
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            return dmstab(*args)

    return run


def _write_npz(path: Path, count: int, seed: int) -> Path:
    images, _ = generate_shapes(count, 32, seed=seed)
    np.savez(path, images.permute(0, 2, 3, 1).numpy())
    return path


def test_missing_weights_stop_before_any_work(isolated_workdir: Path, scoring: Scoring) -> None:
    images = _write_npz(isolated_workdir / "a.npz", 4, seed=0)
    result = scoring("fid", str(images), "--ref", str(images), env={"HOME": str(isolated_workdir)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "inception-2015-12-05.pt" in lines[0], result.stderr
    assert "never downloads" in lines[0]
    assert not Path("mlflow.db").exists()


@pytest.mark.slow
def test_fid_against_images_and_a_cached_recipe_reference(
    isolated_workdir: Path, torchscript_folder: Path, scoring: Scoring
) -> None:
    env = {"HOME": str(isolated_workdir), "DMSTAB_INCEPTION_WEIGHTS": str(torchscript_folder)}
    a = _write_npz(isolated_workdir / "a.npz", 24, seed=0)
    b = _write_npz(isolated_workdir / "b.npz", 24, seed=1)

    same = scoring("fid", str(a), "--ref", str(a), "--kid", env=env)
    assert same.returncode == 0, same.stderr
    other = scoring("fid", str(a), "--ref", str(b), env=env)
    assert other.returncode == 0, other.stderr
    fid_same = float(same.stdout.split()[1])
    fid_other = float(other.stdout.split()[1])
    assert abs(fid_same) < 1e-6 < fid_other

    recipe = isolated_workdir / "ref.yaml"
    recipe.write_text(f"base: {RECIPES / 'quickstart.yaml'}\ndata: {{synthetic_size: 24}}\n")
    first = scoring("fid", str(a), "--ref", str(recipe), env=env)
    assert first.returncode == 0, first.stderr
    assert "cached at" in first.stderr
    cached = list((isolated_workdir / ".cache" / "dmstab" / "stats").glob("*.npz"))
    assert len(cached) == 1
    # The recipe's dataset is the synthetic set with seed 0 and 24 images: the same as `a`.
    assert abs(float(first.stdout.split()[1])) < 1e-6
    written = cached[0].stat().st_mtime_ns
    again = scoring("fid", str(a), "--ref", str(recipe), env=env)
    assert again.returncode == 0 and again.stdout.split()[1] == first.stdout.split()[1]
    assert cached[0].stat().st_mtime_ns == written, "the cached statistics must be reused"

    runs = store().search_runs([store().get_experiment_by_name("fid").experiment_id])
    assert len(runs) == 4 and all("fid" in r.data.metrics for r in runs)


FID_ORDER = {  # where the score goes, the images, the reference, the weights: the first wrong
    "images before the reference": (["missing.npz", "--ref", "nothere.npz"], "images to score"),
    "the reference before the weights": (["a.npz", "--ref", "nothere.npz"], "FID reference not"),
    "images before a recipe's statistics are computed": (
        ["missing.npz", "--ref", str(RECIPES / "quickstart.yaml"), "--features", "random_conv"],
        "images to score not found: missing.npz",
    ),
    "a run before the weights": (
        ["0123456789abcdef0123456789abcdef", "--ref", "a.npz", "--is"],
        "no MLflow run '0123456789abcdef0123456789abcdef': there is no store",
    ),
}


@pytest.mark.parametrize(("args", "message"), FID_ORDER.values(), ids=FID_ORDER)
def test_fid_reports_the_first_wrong_input_before_any_work(
    args: list[str], message: str, isolated_workdir: Path, scoring: Scoring
) -> None:
    """Without the Inception weights (HOME has none) and before the reference's statistics are
    computed: the images, then the reference; nothing is written, not even the cache."""
    _write_npz(isolated_workdir / "a.npz", 4, seed=0)
    result = scoring("fid", *args, env={"HOME": str(isolated_workdir)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(p.name for p in isolated_workdir.iterdir()) == ["a.npz"]


def test_fid_sweep_looks_for_its_checkpoints_before_the_reference_and_weights(
    isolated_workdir: Path, scoring: Scoring
) -> None:
    result = scoring("fid-sweep", "nowhere", "--ref", "nothere.npz", env={"HOME": "."})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "reconstructed checkpoint or folder not found: nowhere" in lines[0]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ("generated/missing", "images to score not found: generated/missing"),
        ("missing.npz", "images to score not found: missing.npz"),
        ("missing.pt", "checkpoint not found: missing.pt"),
    ],
)
def test_images_that_are_no_files_and_no_run_are_one_line_errors(
    images: str, message: str, isolated_workdir: Path, torchscript_folder: Path, scoring: Scoring
) -> None:
    FeatureStats(np.zeros(2048), np.eye(2048)).save(isolated_workdir / "stats.npz")
    env = {"HOME": str(isolated_workdir), "DMSTAB_INCEPTION_WEIGHTS": str(torchscript_folder)}
    result = scoring("fid", images, "--ref", "stats.npz", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
