"""The terminal contract (docs/cli.md): stdout carries a command's result (a run id, a path, or
with `--json` exactly one JSON object), stderr the human lines; off a terminal (here: typer's
runner, as a pipe or a log file) a plain progress line every `--progress-every` seconds."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import QUICKSTART, TINY, CachedRun, Runner, progress_counts, store

HESSIAN = [
    "hessian.batch_size=4",
    "hessian.timesteps=[5]",
    "hessian.top_k=2",
    "hessian.max_iterations=10",
    "hessian.trace_samples=2",
    "hessian.slq_runs=1",
    "hessian.lanczos_steps=4",
]
PROGRESS_LINE = re.compile(
    r"^train (\d+)/12 \(\d+%\)  loss (\d+\.\d{4})  \d+ img/s  elapsed \S+  eta \S+$"
)


def one_json_object(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """stdout of a `--json` call: one line, one JSON object."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    parsed = json.loads(lines[0])
    assert isinstance(parsed, dict)
    return parsed


@pytest.mark.slow
def test_train_off_a_terminal_and_json_then_sample_fid_and_quiet(dmstab: Runner) -> None:
    trained = dmstab("train", str(QUICKSTART), *TINY, "--json", "--progress-every", "0")
    summary = one_json_object(trained)
    run_id = summary["run_id"]
    run = store().get_run(run_id)
    assert run.data.tags["dmstab.kind"] == "train" and summary["step"] == 12
    assert summary["run_name"] == run.info.run_name
    assert summary["experiment_id"] == run.info.experiment_id
    assert Path(summary["checkpoint"]).is_file() and Path(summary["run_dir"]).is_dir()
    assert summary["wall_time_s"] > 0
    losses = store().get_metric_history(run_id, "train/loss")
    final = max(losses, key=lambda metric: metric.step).value
    assert summary["final_loss"] == final

    lines = trained.stderr.splitlines()  # the human lines: the run as soon as it exists, …
    assert lines[0].startswith("run ") and run_id in lines[0] and "mlflow.db" in lines[0]
    assert lines[1].split() == ["run", "dir", str(Path("runs", run_id).resolve())]
    progress = [match for line in lines if (match := PROGRESS_LINE.match(line))]
    assert [int(match[1]) for match in progress] == list(range(1, 13)), trained.stderr
    assert float(progress[-1][2]) == pytest.approx(final, abs=5e-5)
    assert f"{run_id}: step 12, loss {final:.4f}, " in trained.stderr  # … and the summary
    page = (  # the run in the UI's model-training view, not its GenAI view
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        "?workflowType=machine_learning"
    )
    assert summary["run_page"] == page
    assert f"run page    {page}   (after: mlflow ui)" in trained.stderr

    with pytest.MonkeyPatch.context() as patch:  # an hour apart: the first line only
        patch.setenv("DMSTAB_PROGRESS_EVERY", "3600")
        sampled = dmstab("sample", run_id, "sample.num_images=8", "sample.steps=50", "--json")
    made = one_json_object(sampled)
    assert store().get_run(made["run_id"]).data.tags["dmstab.kind"] == "sample"
    assert made["count"] == 8 and Path(made["images"]).is_file()
    assert [line for line in sampled.stderr.splitlines() if "step " in line] == [
        "sample: batch 1, step 1/50"
    ]

    quiet = dmstab("sample", run_id, "sample.num_images=2", "--out", "q", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == f"{next(Path('q').glob('*.npz'))}\n"

    images = made["images"]
    scored = dmstab("fid", images, "--ref", images, "--features", "random_conv", "--json")
    score = one_json_object(scored)
    assert store().get_run(score["run_id"]).data.metrics["fid"] == score["fid"]
    assert score["num_images"] == 8  # the score line on stderr, after the features' progress
    assert scored.stderr.splitlines()[-1].startswith("FID ")


def test_json_of_ema_reconstruct(tiny_edm: CachedRun, dmstab: Runner) -> None:
    made = one_json_object(dmstab("ema-reconstruct", "--sigma-rel", "0.13", "--json"))
    assert store().get_run(made["run_id"]).data.tags["dmstab.kind"] == "ema-reconstruct"
    (checkpoint,) = made["checkpoints"]
    assert checkpoint["sigma_rel"] == 0.13 and Path(checkpoint["path"]).is_file()


@pytest.mark.slow
def test_json_of_the_analyses(tiny_dm: CachedRun, dmstab: Runner) -> None:
    checkpoint = str(tiny_dm.checkpoint)
    every_item = ("--progress-every", "0")  # a plain line per counted item, the last at the end
    hessian_call = dmstab("hessian", checkpoint, *HESSIAN, "--json", *every_item)
    hessian = one_json_object(hessian_call)
    assert store().get_run(hessian["run_id"]).data.tags["dmstab.kind"] == "hessian"
    assert len(hessian["spectra"]["t=5"]["top"]) == 2
    products = progress_counts(hessian_call.stderr, "hessian t=5 products")
    budget = 2 * 10 + 2 + 1 * 4  # at most: top-k Lanczos, Hutchinson, SLQ
    assert products[0] == (1, budget) and products[-1] == (budget, budget), hessian_call.stderr
    assert all(a[0] < b[0] for a, b in itertools.pairwise(products))
    landscape_call = dmstab(
        "landscape",
        checkpoint,
        "landscape.points=3",
        "landscape.batch_size=4",
        "landscape.timesteps=[5]",
        "--json",
        *every_item,
    )
    landscape = one_json_object(landscape_call)
    for loss in ("t=5", "mean"):  # a surface for each loss, 3 × 3 points
        points = progress_counts(landscape_call.stderr, f"landscape {loss} points")
        assert points == [(n, 9) for n in range(1, 10)], landscape_call.stderr
    assert store().get_run(landscape["run_id"]).data.tags["dmstab.kind"] == "landscape"
    assert Path(landscape["arrays"]).is_file() and landscape["kind"] == "surface"
    sampling = ["consistency.num_images=3", "sample.steps=4", "sample.batch_size=3"]
    consistency = one_json_object(
        dmstab("consistency", checkpoint, tiny_dm.run_id, *sampling, "--json")
    )
    assert store().get_run(consistency["run_id"]).data.tags["dmstab.kind"] == "consistency"
    assert len(consistency["labels"]) == 2


def test_h_is_help_and_the_shell_completion_is_shown(dmstab: Runner) -> None:
    assert dmstab("train", "-h").stdout == dmstab("train", "--help").stdout
    completion = dmstab("--show-completion", "bash")
    assert completion.returncode == 0 and "_DMSTAB_COMPLETE" in completion.stdout.upper()
