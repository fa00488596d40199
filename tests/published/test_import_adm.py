"""`dmstab import` of improved-/guided-diffusion `.pt` files, through the CLI in process.

The published files are the reference fixtures' state dicts (tests/models/fixtures: a tiny
reference `UNetModel` with random weights, its inputs and outputs) saved bare, as the released
checkpoints are: the imported checkpoint must give the reference's outputs, and every command
that reads a trained model must read it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dmstab.checkpoint import load_checkpoint
from dmstab.commands.import_model import KIND
from dmstab.tracking import TAG_KIND, TAG_RUN_DIR
from dmstab.train.restore import network_from_state, stored_recipe
from tests.helpers import Payload, Runner, one_line_error, store

FIXTURES = Path(__file__).parents[1] / "models" / "fixtures"
# What the files cannot tell, as the fixtures' README says the reference models were built.
COMMON = [
    "data.resolution=16",
    "model.dropout=0.0",
    "diffusion.schedule=linear",
    "diffusion.steps=100",
    "sample.steps=10",
    "tracking.experiment=tests",
]
GIVEN = {
    "improved_diffusion_unet": ["model.num_heads=4", *COMMON],
    "guided_diffusion_unet": ["model.num_head_channels=16", *COMMON],
}


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    return data


def published(name: str) -> Path:
    """The fixture's reference state dict alone, as improved-/guided-diffusion release one."""
    path = Path(f"{name}.pt")
    torch.save(fixture(name)["state_dict"], path)
    return path


def imported(dmstab: Runner, name: str, *overrides: str) -> str:
    """Import the fixture's file at toy scale; the import run's id."""
    order = "model.attention_order=legacy"
    result = dmstab("import", str(published(name)), order, *GIVEN[name], *overrides)
    assert result.returncode == 0, result.stderr
    runs = store().search_runs(
        [store().get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.`{TAG_KIND}` = '{KIND}'",
        order_by=["attributes.start_time DESC"],
    )
    return str(runs[0].info.run_id)


MATCHES = [
    ("improved_diffusion_unet", "legacy"),  # improved-diffusion's QKVAttention
    ("guided_diffusion_unet", "legacy"),  # QKVAttentionLegacy
    ("guided_diffusion_unet", "qkv_first"),  # QKVAttention (use_new_attention_order)
]


def test_imported_checkpoints_give_the_reference_outputs(dmstab: Runner) -> None:
    # One store for the three imports: a new MLflow store costs seconds.
    for name, order in MATCHES:
        run_id = imported(dmstab, name, f"model.attention_order={order}")
        run = store().get_run(run_id)
        checkpoint = Path(run.data.tags[TAG_RUN_DIR]) / "checkpoint.pt"
        state = load_checkpoint(checkpoint)
        recipe = stored_recipe(state, checkpoint)
        model = network_from_state(state, recipe, use_ema=True, source=checkpoint)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the file: float16
        data = fixture(name)
        with torch.no_grad():
            out = model(data["x"], data["t"], data["y"])
        # float32 summation order (fused attention against the reference's einsums): < 1e-5
        torch.testing.assert_close(out, data["outputs"][order], atol=1e-5, rtol=1e-5)
        assert recipe.model.attention_order == order
        check_settings(run_id, name, state)


def check_settings(run_id: str, name: str, state: dict[str, Any]) -> None:
    """The settings read from the tensors are the reference model's; the run logs them."""
    config = fixture(name)["config"]
    model = state["recipe"]["model"]
    size = config["image_size"]
    assert model["channels"] == config["model_channels"]
    assert list(model["channel_mult"]) == list(config["channel_mult"])
    assert model["num_res_blocks"] == config["num_res_blocks"]
    assert sorted(model["attention_resolutions"]) == sorted(
        size // rate for rate in config["attention_resolutions"]
    )
    assert model["use_scale_shift_norm"] == config["use_scale_shift_norm"]
    assert model["resblock_updown"] == config.get("resblock_updown", False)
    assert model["learn_sigma"] == (config["out_channels"] == 2 * config["in_channels"])
    assert model["class_cond"] and state["num_classes"] == config["num_classes"]
    # The run: the source file's SHA-256, the format, the inferred settings, the recipe.
    run = store().get_run(run_id)
    digest = hashlib.sha256(Path(f"{name}.pt").read_bytes()).hexdigest()
    assert run.data.tags["dmstab.import.sha256"] == digest
    assert run.data.tags["dmstab.import.format"] == "adm"
    assert run.data.params["model.channels"] == str(config["model_channels"])
    assert "recipe.yaml" in {a.path for a in store().list_artifacts(run_id)}
    assert {a.path for a in store().list_artifacts(run_id, "import")} == {"import/inferred.json"}


def _nothing_written() -> None:
    assert not Path("runs").exists() and not Path("mlflow.db").exists()


def test_a_pickle_with_code_is_refused_and_never_runs(dmstab: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"input_blocks.0.0.weight": Payload(marker)}, "evil.pt")
    line = one_line_error(dmstab("import", "evil.pt", *GIVEN["improved_diffusion_unet"]))
    assert "refused" in line and "posix.system" in line
    assert not marker.exists()
    _nothing_written()


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        ("model.attention_order=legacy", [], "cannot tell model.attention_order"),
        ("data.resolution=16", [], "cannot tell data.resolution"),
        ("model.num_heads=4", [], "model.num_heads=N or model.num_head_channels=C"),
        (None, ["model.channels=64"], "time_embed.0.weight is (128, 32) in the file"),
        (None, ["model.class_cond=false"], "the file has label_embed.weight"),
        (None, ["--format", "nope"], "unknown --format 'nope'"),
        (None, ["diffusion.steps=0"], "diffusion.steps"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    dmstab: Runner, drop: str | None, extra: list[str], message: str
) -> None:
    name = "improved_diffusion_unet"
    given = [s for s in ["model.attention_order=legacy", *GIVEN[name]] if s != drop]
    line = one_line_error(dmstab("import", str(published(name)), *given, *extra))
    assert message in line, line
    _nothing_written()


def test_a_missing_file_or_unknown_suffix_is_one_line(dmstab: Runner) -> None:
    assert "not found: missing.pt" in one_line_error(dmstab("import", "missing.pt"))
    Path("weights.bin").write_bytes(b"x")
    assert "pass --format" in one_line_error(dmstab("import", "weights.bin"))
    _nothing_written()


@pytest.mark.slow
def test_every_command_reading_a_trained_model_reads_an_imported_one(dmstab: Runner) -> None:
    # The fixtures' networks are class-conditional over 10 classes, as the synthetic shapes.
    improved = imported(dmstab, "improved_diffusion_unet", "data.synthetic_size=64")
    guided = imported(dmstab, "guided_diffusion_unet", "data.synthetic_size=64", "--out", "gd.pt")
    copy, original = (
        load_checkpoint(Path("gd.pt")),
        load_checkpoint(Path("runs", guided, "checkpoint.pt")),
    )
    assert copy["run_id"] == original["run_id"] == guided
    assert all(torch.equal(copy["model"][k], v) for k, v in original["model"].items())
    sampling = ["sample.steps=3", "sample.sampler=ddim", "train.device=cpu"]
    sample = dmstab("sample", improved, *sampling, "sample.num_images=2", "sample.batch_size=2")
    assert sample.returncode == 0, sample.stderr
    (npz,) = Path("samples").glob("*/*.npz")
    with np.load(npz) as arrays:
        assert arrays["arr_0"].shape == (2, 16, 16, 3)
    rng = np.random.default_rng(0)
    np.savez("ref.npz", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    fid = dmstab(
        "fid", guided, "--ref", "ref.npz", "--features", "random_conv",
        "--num-images", "4", "--batch-size", "4",
    )  # fmt: skip
    assert fid.returncode == 0, fid.stderr
    consistency = dmstab(
        "consistency", improved, guided, *sampling, "consistency.num_images=2",
        "sample.batch_size=2",
    )  # fmt: skip
    assert consistency.returncode == 0, consistency.stderr
    hessian = dmstab(
        "hessian", improved, "hessian.batch_size=2", "hessian.top_k=1",
        "hessian.max_iterations=3", "hessian.trace_samples=2", "hessian.slq_runs=1",
        "hessian.lanczos_steps=3", "train.device=cpu",
    )  # fmt: skip
    assert hessian.returncode == 0, hessian.stderr
    landscape = dmstab(
        "landscape", guided, "landscape.points=3", "landscape.batch_size=2",
        "landscape.timesteps=[5]", "train.device=cpu",
    )  # fmt: skip
    assert landscape.returncode == 0, landscape.stderr
    experiments = [e.experiment_id for e in store().search_experiments()]
    kinds = {run.data.tags[TAG_KIND]: run for run in store().search_runs(experiments)}
    assert {"sample", "fid", "consistency", "hessian", "landscape"} <= kinds.keys()
    assert kinds["fid"].data.tags["mlflow.parentRunId"] == guided
    assert kinds["hessian"].data.tags["mlflow.parentRunId"] == improved
    assert kinds["landscape"].data.tags["mlflow.parentRunId"] == guided
