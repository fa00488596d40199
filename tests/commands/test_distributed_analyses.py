"""`dmstab hessian`, `landscape` and `consistency` under `torchrun` (2 gloo processes) give the
numbers of one process.

The Hessian's fixed batch is sharded (3 rows: 2 and 1) and its products summed over the ranks,
so its spectrum equals one process's up to float summation order; the landscape's grid points
(9: 5 and 4) and αs, and consistency's seeds (3: 2 and 1), are split over the ranks, so theirs
are the very numbers one process computes. One `torchrun` runs the four analyses in a row (one
launch, one process group), rank 0 alone logging one MLflow run each. A GAN's shares are
checked in one process: the ranks' losses and gradients add up to the whole batch's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dmstab.analysis.spectrum import HessianConfig
from dmstab.checkpoint import kept_checkpoint
from dmstab.commands.study import analysis_losses
from dmstab.commands.subjects import load_subject
from dmstab.distributed import DistributedContext
from dmstab.tracking import TAG_KIND
from tests.helpers import RECIPES, TINY, CachedRun, Runner, Training, store

# The tiny DM of test_hessian_landscape_cli (trained once a session for both modules).
SMALL_NET = ["model.channels=32", "model.attention_resolutions=[]", "data.resolution=8"]
TRAINING = Training.of(
    RECIPES / "quickstart.yaml", [*TINY, *SMALL_NET, "train.keep_checkpoints=[4]"]
)
HESSIAN = [  # 8 products: Lanczos cut short (not converged), the same steps in both
    "hessian.batch_size=3",
    "hessian.top_k=1",
    "hessian.max_iterations=4",
    "hessian.trace_samples=2",
    "hessian.lanczos_steps=2",
    "hessian.slq_runs=1",
    "train.device=cpu",
]
SURFACE = ["landscape.points=3", "landscape.batch_size=4"]
INTERPOLATION = ["landscape.interpolate=[4,12]", "landscape.alphas=3", "landscape.batch_size=4"]
CONSISTENCY = ["consistency.num_images=3", "sample.steps=4", "sample.batch_size=2"]

# Each rank runs the analyses in turn through their commands' `main` and writes what each
# returned (rank 0 its summary, the others None), or the DmstabError it raised, to rank<r>.json.
SCRIPT = """
import json, sys
from pathlib import Path

from dmstab.commands.analyse import main
from dmstab.distributed import init_distributed, shutdown_distributed
from dmstab.errors import DmstabError


def outcome(name, arguments):
    try:
        return main(name, arguments)
    except DmstabError as error:  # the CLI: this line, exit 2
        return f"error: {error}"


summaries = [outcome(name, arguments) for name, arguments in json.loads(sys.argv[1])]
rank = init_distributed("cpu").rank
Path(f"rank{rank}.json").write_text(json.dumps(summaries, default=str))
shutdown_distributed()
"""


def _analyses(trained: CachedRun) -> list[tuple[str, list[str]]]:
    checkpoint, early = str(trained.checkpoint), str(kept_checkpoint(trained.run_dir, 4))
    return [
        ("hessian", [checkpoint, *HESSIAN]),
        ("landscape", [checkpoint, *SURFACE]),
        ("landscape", [checkpoint, *INTERPOLATION]),
        ("consistency", [checkpoint, early, *CONSISTENCY]),
    ]


def _runs(kind: str) -> list[str]:
    """The runs of `kind`, oldest first."""
    experiment = store().get_experiment_by_name("tests")
    found = store().search_runs(
        [experiment.experiment_id],
        f"tags.`{TAG_KIND}` = '{kind}'",
        order_by=["attributes.start_time ASC"],
    )
    return [str(run.info.run_id) for run in found]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # as each rank: the same kernels, the same roundings
def test_two_ranks_analyse_to_the_single_process_numbers(
    trained_runs: Callable[..., list[CachedRun]], dmstab: Runner, isolated_workdir: Path
) -> None:
    (trained,) = trained_runs(TRAINING)
    analyses = _analyses(trained)
    for name, arguments in analyses:  # one process, through the command line
        result = dmstab(name, *arguments)
        assert result.returncode == 0, result.stderr
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = isolated_workdir / "analyses.py"
    script.write_text(SCRIPT)
    unshareable = ("hessian", [analyses[0][1][0], *HESSIAN, "hessian.batch_size=1"])
    ranks = subprocess.run(
        [sys.executable, *launcher, str(script), json.dumps([*analyses, unshareable])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(isolated_workdir)},
    )
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    *summaries, refused = json.loads(Path("rank0.json").read_text())
    assert json.loads(Path("rank1.json").read_text()) == [None] * 4 + [refused], "rank 0 reports"
    assert refused == (  # on both ranks, before any run is opened
        "error: hessian.batch_size=1 cannot be shared by 2 ranks; use at least 2 rows or fewer "
        "processes"
    )
    hessians, landscapes, consistencies = (
        _runs(k) for k in ("hessian", "landscape", "consistency")
    )
    assert (len(hessians), len(landscapes), len(consistencies)) == (2, 4, 2), "none per rank"
    assert [s["run_id"] for s in summaries] == [hessians[1], *landscapes[2:], consistencies[1]]

    one, two = (_arrays(Path("analyses/hessian") / run / "spectrum.npz") for run in hessians)
    assert set(one) == set(two) and {"mean/top", "mean/trace", "mean/slq_nodes"} <= set(one)
    for key, value in one.items():
        if value.dtype.kind == "f":  # summed in another order: ~1e-7 apart (float32 rounding)
            np.testing.assert_allclose(two[key], value, rtol=1e-5, atol=1e-12, err_msg=key)
        else:
            np.testing.assert_array_equal(two[key], value, err_msg=key)

    surface, curve = (_arrays(Path(s["arrays"])) for s in summaries[1:3])
    for run, distributed in zip(landscapes[:2], (surface, curve), strict=True):
        (single,) = (_arrays(path) for path in Path("analyses/landscape", run).glob("*.npz"))
        assert single["values"].shape == distributed["values"].shape
        np.testing.assert_array_equal(distributed["values"], single["values"])

    directories = [Path("analyses/consistency") / run / "ddim4" for run in consistencies]
    images = [_arrays(directory / "images.npz")["images"] for directory in directories]
    assert images[0].shape == (2, 3, 3, 8, 8)
    np.testing.assert_array_equal(images[1], images[0])
    scores = [json.loads((directory / "scores.json").read_text()) for directory in directories]
    assert scores[1] == scores[0]


def _loss_and_gradient(
    model: torch.nn.Module, loss: Callable[[torch.nn.Module], torch.Tensor]
) -> tuple[float, torch.Tensor]:
    value = loss(model)
    gradient = torch.autograd.grad(value, [p for p in model.parameters() if p.requires_grad])
    return float(value), torch.cat([g.reshape(-1) for g in gradient])


@pytest.mark.parametrize("network", ["generator", "discriminator"])
def test_two_ranks_shares_of_a_gan_loss_add_up_to_the_whole_batch(
    tiny_gan: CachedRun, network: str
) -> None:
    """5 real images and z split 3 and 2: each rank's loss is its rows' mean times their share
    of the batch, so the two add up to the whole batch's loss, gradient for gradient."""
    subject = load_subject(tiny_gan.run_id, ["hessian.batch_size=5", f"hessian.network={network}"])
    settings = subject.recipe.analysis(HessianConfig)
    cpu = torch.device("cpu")
    model, losses = analysis_losses(subject, cpu, settings)
    whole, whole_gradient = _loss_and_gradient(model, losses[network])
    shares = []
    for rank in range(2):  # the shares alone need no process group
        model, losses = analysis_losses(subject, cpu, settings, DistributedContext(rank, 2, rank))
        shares.append(_loss_and_gradient(model, losses[network]))
    (first, first_gradient), (second, second_gradient) = shares
    assert first != pytest.approx(second), "each rank its own rows"
    assert first + second == pytest.approx(whole, rel=1e-6)
    torch.testing.assert_close(first_gradient + second_gradient, whole_gradient)
