"""`dmstab hessian` and `dmstab landscape` through the CLI on a tiny trained DM."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmstab.analysis.landscape import evaluate, load_landscape, random_direction
from dmstab.analysis.landscape_metrics import LandscapeConfig
from dmstab.analysis.spectrum import HessianConfig, hvp_method
from dmstab.commands.study import analysis_losses
from dmstab.commands.subjects import load_subject
from tests.helpers import RECIPES, TINY, CachedRun, Runner, Training, store

HESSIAN = [
    "hessian.batch_size=4",
    "hessian.timesteps=[5]",
    "hessian.top_k=2",
    "hessian.max_iterations=30",
    "hessian.trace_samples=3",
    "hessian.slq_runs=1",
    "hessian.lanczos_steps=6",
    "train.device=cpu",
]
SMALL_NET = ["model.channels=32", "model.attention_resolutions=[]", "data.resolution=8"]


@pytest.fixture
def trained(trained_runs: Callable[..., list[CachedRun]]) -> CachedRun:
    """The tiny DM at 8x8 with step 4 kept: trained once a session, a private copy per test."""
    (run,) = trained_runs(
        Training.of(RECIPES / "quickstart.yaml", [*TINY, *SMALL_NET, "train.keep_checkpoints=[4]"])
    )
    return run


def _latest_run(client: MlflowClient, kind: str) -> str:
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`dmstab.kind` = '{kind}'",
        order_by=["attributes.start_time DESC"],
    )
    return str(runs[0].info.run_id)


def _hvp(
    model: torch.nn.Module, loss: torch.Tensor, vector: list[torch.Tensor]
) -> list[torch.Tensor]:
    """H·v by double backward, independent of dmstab.analysis.hessian."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    return list(torch.autograd.grad(dot, params))


def test_hessian_dry_run_of_a_checkpoint_counts_its_trainable_parameters(
    trained: CachedRun, dmstab: Runner
) -> None:
    """The estimate of the checkpoint's network: its trainable parameters as the analysis
    builds it, 30 + 2 basis rows in float32, and no analysis run or folder."""
    result = dmstab("hessian", str(trained.checkpoint), *HESSIAN, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    subject = load_subject(str(trained.checkpoint))
    network = subject.network(torch.device("cpu"), use_ema=False)
    parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    assert plan["parameters"] == parameters and plan["basis_rows"] == 30 + 2
    assert plan["device_bytes"] > 32 * parameters * 4
    assert not Path("analyses").exists()


@pytest.mark.slow
def test_hessian_by_checkpoint_logs_a_spectrum_above_every_rayleigh_quotient(
    trained: CachedRun, dmstab: Runner
) -> None:
    result = dmstab("hessian", str(trained.checkpoint), *HESSIAN)
    assert result.returncode == 0, result.stderr
    client = store()
    run_id = _latest_run(client, "hessian")
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained.run_id
    artifacts = {a.path for a in client.list_artifacts(run_id, "hessian")}
    expected = {"spectrum", "eigenvectors", "density"}
    assert {f"hessian/{name}.npz" for name in expected} | {"hessian/density.png"} <= artifacts
    with np.load(Path("analyses/hessian") / run_id / "spectrum.npz") as arrays:
        top = arrays["mean/top"]
        assert float(run.data.metrics["hessian/mean/lambda_1"]) == pytest.approx(top[0])
        assert "t5/top" in arrays.files
        weights = arrays["mean/slq_weights"]
        assert weights.sum() == pytest.approx(1.0)
    subject = load_subject(str(trained.checkpoint), HESSIAN)
    model, losses = analysis_losses(
        subject, torch.device("cpu"), subject.recipe.analysis(HessianConfig)
    )
    generator = torch.Generator().manual_seed(123)
    for _ in range(3):  # vᵀHv ≤ λ1 for every unit v (λ1 the largest eigenvalue)
        vector = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        norm = torch.sqrt(sum((v**2).sum() for v in vector))
        vector = [v / norm for v in vector]
        with sdpa_kernel(SDPBackend.MATH):  # CPU flash attention has no double backward
            hv = _hvp(model, losses["mean"](model), vector)
        quotient = float(sum((h * v).sum() for h, v in zip(hv, vector, strict=True)))
        assert quotient <= top[0] * (1 + 1e-3)


def test_landscape_surface_centre_is_the_models_loss_and_corners_move_by_norm(
    trained: CachedRun, dmstab: Runner
) -> None:
    options = ["landscape.points=3", "landscape.batch_size=4", "landscape.timesteps=[5]"]
    options.append("landscape.norm=layer")
    result = dmstab("landscape", trained.run_id, *options)
    assert result.returncode == 0, result.stderr
    run_id = _latest_run(store(), "landscape")
    grid = load_landscape(Path("analyses/landscape") / run_id / "surface.npz")
    assert set(grid.values) == {"mean", "t=5"} and grid.values["mean"].shape == (3, 3)
    assert grid.metadata["norm"] == "layer"
    subject = load_subject(trained.run_id, options)
    model, losses = analysis_losses(
        subject, torch.device("cpu"), subject.recipe.analysis(LandscapeConfig)
    )
    for name, loss in losses.items():
        assert grid.values[name][1, 1] == pytest.approx(evaluate(loss, model), rel=1e-6)
        assert grid.values[name].max() > grid.values[name][1, 1]  # a trained model: a minimum
    # The corner (x, y) = (−1, −1) is the loss at θ − d1 − d2 for layer-normalised d1, d2 drawn
    # from the seed, each layer of d as long as θ's.
    generator = torch.Generator().manual_seed(0)
    d1, d2 = (random_direction(model, generator, norm="layer") for _ in range(2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.sub_(d1[name] + d2[name])
    assert grid.values["mean"][0, 0] == pytest.approx(evaluate(losses["mean"], model), rel=1e-6)
    artifacts = {a.path for a in store().list_artifacts(run_id, "landscape")}
    assert {"landscape/surface.npz", "landscape/surface_mean.png"} <= artifacts


def test_interpolation_ends_are_each_checkpoints_loss(trained: CachedRun, dmstab: Runner) -> None:
    options = ["landscape.interpolate=[4,12]", "landscape.alphas=3", "landscape.batch_size=4"]
    result = dmstab("landscape", str(trained.checkpoint), *options)
    assert result.returncode == 0, result.stderr
    run_id = _latest_run(store(), "landscape")
    grid = load_landscape(Path("analyses/landscape") / run_id / "interpolation.npz")
    np.testing.assert_allclose(grid.xs, [0.0, 0.5, 1.0])
    for alpha_index, step in ((0, 4), (2, 12)):
        subject = load_subject(str(trained.checkpoint), options).kept(step)
        model, losses = analysis_losses(
            subject, torch.device("cpu"), subject.recipe.analysis(LandscapeConfig)
        )
        expected = evaluate(losses["mean"], model)
        assert grid.values["mean"][alpha_index] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["landscape", "missing.pt"], "checkpoint not found"),
        (["landscape", "CKPT", "landscape.interpolate=[2,12]"], "kept no checkpoint at step 2"),
        (["hessian", "CKPT", "model.channels=64"], "cannot change a trained model"),
        (["hessian", "CKPT", "hessian.top_k=0"], "hessian.top_k must be at least 1"),
        (["hessian", "CKPT", "hessian.density_sigma_squared=0"], "must be positive"),
        (["landscape", "CKPT", "landscape.norm=weight"], "allowed: 'filter' | 'layer'"),
        (["hessian", "CKPT", "CKPT"], "reads one model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    trained: CachedRun, arguments: list[str], message: str, dmstab: Runner
) -> None:
    resolved = [str(trained.checkpoint) if a == "CKPT" else a for a in arguments]
    result = dmstab(*resolved)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _rayleigh_quotient(model: torch.nn.Module, loss: torch.Tensor, vector: np.ndarray) -> float:
    """vᵀHv for a flat vector over the trainable parameters in `named_parameters` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.from_numpy(vector)
    pieces = [
        piece.reshape(p.shape)
        for piece, p in zip(flat.split([p.numel() for p in params]), params, strict=True)
    ]
    hv = _hvp(model, loss, pieces)
    return float(sum((h * v).sum() for h, v in zip(hv, pieces, strict=True)))


def test_gan_hessian_of_the_generator_loss_and_interpolation_of_both_losses(
    dmstab: Runner, tiny_gan: CachedRun
) -> None:
    """On the session's tiny DCGAN: TINY_GAN, 6 steps, checkpoints every 2, step 2 kept."""
    run = tiny_gan
    options = [*HESSIAN[:1], *HESSIAN[2:], "hessian.density_sigma_squared=2e-5"]  # no t for a GAN
    result = dmstab("hessian", run.run_id, *options)
    assert result.returncode == 0, result.stderr
    run_id = _latest_run(store(), "hessian")
    logged = store().get_run(run_id).data
    metrics = logged.metrics
    top = metrics["hessian/generator/lambda_1"]
    subject = load_subject(run.run_id, options)
    model, losses = analysis_losses(
        subject, torch.device("cpu"), subject.recipe.analysis(HessianConfig)
    )
    folder = Path("analyses/hessian") / run_id
    with np.load(folder / "eigenvectors.npz", allow_pickle=False) as arrays:
        names = json.loads(str(arrays["parameter_names"]))
        shapes = json.loads(str(arrays["parameter_shapes"]))
        assert [(n, list(p.shape)) for n, p in model.named_parameters()] == list(
            zip(names, shapes, strict=True)
        )
        values, vectors = arrays["generator/eigenvalues"], arrays["generator/eigenvectors"]
    assert values[0] == pytest.approx(top) and vectors.dtype == np.float32
    assert vectors.shape == (2, sum(p.numel() for p in model.parameters()))
    np.testing.assert_allclose(vectors.astype(np.float64) @ vectors.T, np.eye(2), atol=1e-5)
    for value, vector in zip(values, vectors, strict=True):  # a Ritz value is vᵀHv of its vector
        quotient = _rayleigh_quotient(model, losses["generator"](model), vector)
        assert quotient == pytest.approx(value, rel=1e-3, abs=1e-4 * abs(top))
    with np.load(folder / "density.npz", allow_pickle=False) as arrays:
        assert float(arrays["sigma_squared"]) == 2e-5
        grid, density = arrays["generator/grid"], arrays["generator/density"]
        spread = max(1.0, grid[-1] - grid[0])
        assert float(arrays["generator/kernel_variance"]) == pytest.approx(2e-5 * spread)
        assert density.sum() * (grid[1] - grid[0]) == pytest.approx(1.0)
        with np.load(folder / "spectrum.npz", allow_pickle=False) as raw:
            np.testing.assert_array_equal(arrays["generator/slq_nodes"], raw["generator/slq_nodes"])
    assert float(logged.params["hessian.density_sigma_squared"]) == 2e-5
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):  # |vᵀHv| ≤ |λ1|, λ1 the eigenvalue of largest magnitude
        vector = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        norm = torch.sqrt(sum((v**2).sum() for v in vector))
        vector = [v / norm for v in vector]
        hv = _hvp(model, losses["generator"](model), vector)
        assert abs(float(sum((h * v).sum() for h, v in zip(hv, vector, strict=True)))) <= abs(
            top
        ) * (1 + 1e-3)

    landscape = ["landscape.interpolate=[2,6]", "landscape.alphas=3", "landscape.batch_size=4"]
    assert dmstab("landscape", str(run.checkpoint), *landscape).returncode == 0
    grid = load_landscape(
        Path("analyses/landscape") / _latest_run(store(), "landscape") / "interpolation.npz"
    )
    assert set(grid.values) == {"generator", "discriminator"}
    for alpha_index, step in ((0, 2), (2, 6)):
        for network in ("generator", "discriminator"):
            kept = load_subject(
                str(run.checkpoint), [*landscape, f"landscape.network={network}"]
            ).kept(step)
            model, losses = analysis_losses(
                kept, torch.device("cpu"), kept.recipe.analysis(LandscapeConfig)
            )
            expected = evaluate(losses[network], model)
            assert grid.values[network][alpha_index] == pytest.approx(expected, rel=1e-6)


def test_auto_hvp_method_is_double_backward_on_cpu_and_explicit_methods_pass() -> None:
    model = torch.nn.Linear(2, 1)
    assert hvp_method("auto", model) == "double_backward"
    assert hvp_method("forward_over_reverse", model) == "forward_over_reverse"
    assert hvp_method("double_backward", model) == "double_backward"
