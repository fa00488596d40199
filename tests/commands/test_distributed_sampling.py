"""`dmstab sample` and evaluation under `torchrun` (2 gloo processes) equal one process's.

Image i depends only on (seed, i), so however the ranks split the indices the gathered images
must be the single-process images, byte for byte, and their scores the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmstab.data.synthetic import generate_shapes
from dmstab.tracking import TAG_KIND
from tests.helpers import RECIPES, TINY, store

TRAIN = [*TINY, "train.device=cpu"]
# 7 images in batches of 3: ranks hold 0-3 and 4-6, batched 0-2|3 and 4-6 (one process: 0-2|3-5|6)
UNEVEN = ["sample.num_images=7", "sample.batch_size=3"]
# 65 images, more than random_conv's 64 features (full-rank covariances), in uneven batches
EVAL = [
    "eval.features=random_conv",
    "eval.metrics=[fid,kid]",
    "eval.num_images=65",
    "eval.batch_size=16",
]
EVAL_SCRIPT = """
import json, sys
from pathlib import Path

import torch

from dmstab.train.evaluate import Evaluator
from dmstab.train.restore import network_from_state
from dmstab.config import load_recipe
from dmstab.checkpoint import load_checkpoint
from dmstab.distributed import init_distributed, shutdown_distributed

checkpoint, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
context = init_distributed("cpu")
state = load_checkpoint(checkpoint)
recipe = load_recipe(Path(sys.argv[4]), overrides)
model = network_from_state(state, recipe, use_ema=True, source=checkpoint)
num_classes = int(state["num_classes"])
evaluator = Evaluator(recipe, num_classes=num_classes, device=torch.device("cpu"), context=context)
metrics = evaluator.evaluate(model)
(out / f"rank{context.rank}.json").write_text(json.dumps(metrics))
shutdown_distributed()
"""


def _python(args: list[str], cwd: Path, ranks: int = 1) -> subprocess.CompletedProcess[str]:
    """`python ARGS`, or under `torch.distributed.run` with `ranks` local processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    result = subprocess.run(
        [sys.executable, *(launcher if ranks > 1 else []), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(cwd)},
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TINY model trained once for the module, in its own directory and MLflow store."""
    directory = tmp_path_factory.mktemp("trained")
    _python(["-m", "dmstab", "train", str(RECIPES / "quickstart.yaml"), *TRAIN], directory)
    (path,) = directory.glob("runs/*/checkpoint.pt")
    return path


@pytest.mark.slow
def test_two_ranks_sample_the_single_process_images(checkpoint: Path, tmp_path: Path) -> None:
    one = _python(["-m", "dmstab", "sample", str(checkpoint), *UNEVEN, "--out", "one"], tmp_path)
    two = _python(
        ["-m", "dmstab", "sample", str(checkpoint), *UNEVEN, "--out", "two"], tmp_path, ranks=2
    )
    arrays = {
        name: np.load(tmp_path / name / "ddim5_seed0.npz")["arr_0"] for name in ("one", "two")
    }
    assert arrays["one"].shape == (7, 16, 16, 3)
    assert np.array_equal(arrays["one"], arrays["two"])
    assert len({image.tobytes() for image in arrays["two"]}) == 7, "every index its own noise"
    for result in (one, two):
        assert (result.stdout + result.stderr).count("done 7 images") == 1, "rank 0 reports"
    assert not (tmp_path / "samples").exists(), "only --out is written"

    experiment = store().get_experiment_by_name("tests")
    runs = store().search_runs([experiment.experiment_id], f"tags.`{TAG_KIND}` = 'sample'")
    assert len(runs) == 2, "one MLflow run per command, not per rank"


@pytest.mark.slow
def test_two_ranks_evaluate_to_the_single_process_metrics(checkpoint: Path, tmp_path: Path) -> None:
    script = tmp_path / "evaluate.py"
    script.write_text(EVAL_SCRIPT)
    recipe = str(RECIPES / "quickstart.yaml")
    scores = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        out.mkdir()
        _python(
            [str(script), str(checkpoint), str(out), json.dumps([*TRAIN, *EVAL]), recipe],
            tmp_path,
            ranks,
        )
        per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
        assert all(metrics == per_rank[0] for metrics in per_rank), "every rank gets rank 0's"
        scores[ranks] = per_rank[0]
    assert set(scores[1]) == {"eval/fid", "eval/kid"}
    assert scores[1]["eval/fid"] > 0
    for key, value in scores[1].items():
        assert scores[2][key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
def test_two_ranks_sample_for_fid_and_rank_0_scores_once(checkpoint: Path, tmp_path: Path) -> None:
    shapes, _ = generate_shapes(16, 16, seed=1)
    np.savez(tmp_path / "ref.npz", shapes.permute(0, 2, 3, 1).numpy())
    options = ["--ref", "ref.npz", "--features", "random_conv", "--kid", "--num-images", "9"]
    command = ["-m", "dmstab", "fid", str(checkpoint), *options, "--batch-size", "4"]
    outputs = [_python(command, tmp_path, ranks) for ranks in (1, 2)]
    assert all((out.stdout + out.stderr).count("FID ") == 1 for out in outputs), "rank 0 reports"

    experiment = store().get_experiment_by_name("fid")
    first, second = store().search_runs([experiment.experiment_id], order_by=["start_time"])
    assert first.data.metrics["num_images"] == second.data.metrics["num_images"] == 9
    for key in ("fid", "kid"):
        assert second.data.metrics[key] == pytest.approx(first.data.metrics[key], rel=1e-6), key
