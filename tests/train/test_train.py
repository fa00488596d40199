"""Training end to end on a tiny model: MLflow contents, kill -9 + resume, divergence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dmstab.checkpoint import load_checkpoint
from dmstab.config import flatten, load_recipe, run_params
from dmstab.errors import DmstabError
from dmstab.train.loop import train
from dmstab.train.loss_guard import TrainingDiverged
from tests.helpers import RECIPES, TINY, store


def _recipe(*extra: str):  # type: ignore[no-untyped-def]
    return load_recipe(RECIPES / "quickstart.yaml", [*TINY, *extra])


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dmstab", "train", str(RECIPES / "quickstart.yaml"), *TINY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_training_run_is_fully_tracked() -> None:
    recipe = _recipe()
    result = train(recipe)
    client = store()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == run_params(recipe, "train")
    assert run.data.params.items() <= flatten(recipe).items()
    steps = list(range(1, recipe.train.steps + 1))
    # Unweighted ε-MSE at a constant lr: loss is the MSE (logged once), lr and the loss weight
    # of 1 are tags, not flat series (dmstab.train.metric_names).
    logged = {"train/loss", "train/grad_norm", "train/kimg", "system/images_per_s"}
    assert set(run.data.metrics) == logged | {"timesteps/gamma"}
    for key in logged:
        assert _history(client, result.run_id, key) == steps, key
    assert run.data.tags["dmstab.lr"] == repr(recipe.optim.lr)
    assert run.data.tags["dmstab.loss_weight"] == "1.0"
    kimg = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/kimg")}
    assert kimg[12] == pytest.approx(12 * recipe.train.batch_size / 1000)
    gammas = {m.step: m.value for m in client.get_metric_history(result.run_id, "timesteps/gamma")}
    assert gammas[5] == pytest.approx(0.5) and gammas[12] == 1.0  # target_iteration=10
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert artifacts == {"recipe.yaml", "samples", "images"}  # the checkpoint stays in the run dir
    assert run.data.tags["dmstab.checkpoint"] == str(result.checkpoint)
    samples = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert samples == {"samples/step_00000012.npz"}
    # Stepped images (MLflow's `log_image`): KEY+step+STEP+timestamp+…png and its .webp preview
    logged_images = client.list_artifacts(result.run_id, "images")
    images = [a.path.removeprefix("images/") for a in logged_images]
    stepped = sorted((p.split("+")[0], int(p.split("+")[2])) for p in images if p.endswith(".png"))
    assert stepped == [("samples", 12), ("timesteps~histogram", 5), ("timesteps~histogram", 10)]
    assert sum(p.endswith(".webp") for p in images) == 3
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == recipe.train.steps and state["run_id"] == result.run_id


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {**state["model"], **{"ema." + k: v for k, v in state["ema"]["shadow"].items()}}


@pytest.mark.slow
def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(isolated_workdir: Path) -> None:
    long = ["train.steps=60", "train.checkpoint_every=5", "tracking.flush_every=3"]
    reference = train(_recipe(*long, "tracking.experiment=reference", "train.out_dir=reference"))

    victim = _cli(*long)
    checkpoints = list(isolated_workdir.glob("runs/*/checkpoint.pt"))
    deadline = time.monotonic() + 120
    while not checkpoints or load_checkpoint(checkpoints[0])["step"] < 10:
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "training never wrote a checkpoint"
        time.sleep(0.05)
        checkpoints = [p for p in isolated_workdir.glob("runs/*/checkpoint.pt")]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = load_checkpoint(checkpoints[0])["step"]
    assert killed_at < 60, "the run finished before it was killed; make it longer"

    resumed = _cli(*long, "--resume", "auto")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    client = store()
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "resume must continue the same MLflow run"
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED"
    steps = _history(client, run_id, "train/loss")
    assert steps == list(range(1, 61)), f"killed at {killed_at}; resume said {out} {err}"
    resumed_weights = _final_weights(isolated_workdir / "runs" / run_id / "checkpoint.pt")
    reference_weights = _final_weights(reference.checkpoint)
    assert resumed_weights.keys() == reference_weights.keys()
    for key, value in reference_weights.items():
        assert torch.equal(resumed_weights[key], value), key


def test_divergence_stops_and_keeps_the_last_good_checkpoint() -> None:
    recipe = _recipe("optim.lr=1e30", "train.checkpoint_every=1", "train.steps=20")
    with pytest.raises(TrainingDiverged, match="not finite at step") as info:
        train(recipe)
    assert "last good checkpoint" in str(info.value)
    client = store()
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FAILED"
    checkpoint = next(Path("runs").glob("*/checkpoint.pt"))
    state = load_checkpoint(checkpoint)
    assert state["step"] < 20
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_with_a_different_recipe_is_refused() -> None:
    first = train(_recipe("train.steps=2"))
    with pytest.raises(DmstabError, match="already FINISHED"):
        train(_recipe("train.steps=2"), resume=first.run_id)
    with pytest.raises(DmstabError, match="no MLflow run"):
        train(_recipe(), resume="0123456789abcdef")


def test_resuming_another_recipes_run_names_the_change_even_from_an_older_dump(
    isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs started before the dump wrote one length key kept train.steps beside train.kimg in
    their recipe.yaml; the refusal still reads it to say what changed."""
    import yaml

    from dmstab.config import to_dict
    from dmstab.tracking import TAG_FINGERPRINT, TAG_RUN_DIR
    from dmstab.train import loop

    recipe = load_recipe(RECIPES / "edm2_mini.yaml")
    older = to_dict(load_recipe(RECIPES / "edm2_mini.yaml", ["optim.lr=0.5"]))
    assert older["train"]["kimg"] > 0 and "steps" in older["train"]
    (isolated_workdir / "recipe.yaml").write_text(yaml.safe_dump(older))
    tags = {TAG_FINGERPRINT: "another", TAG_RUN_DIR: str(isolated_workdir)}
    monkeypatch.setattr(loop, "run_info", lambda run_id, uri: (tags, "RUNNING"))
    with pytest.raises(DmstabError, match=r"started with: optim.lr: 0.5 -> "):
        train(recipe, resume="0123456789abcdef")
