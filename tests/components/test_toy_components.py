"""A network, a prediction target, a sampler and an analysis from outside the package: each is
one module (tests/components/toy_*.py) with one registration, and each goes through the real
commands (train, sample, an analysis) into MLflow like a built-in one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dmstab.commands.subjects import load_subject
from dmstab.diffusion import build_diffusion
from dmstab.diffusion.sampling import NoiseSource
from dmstab.diffusion.targets import StepCoefficients

from ..helpers import QUICKSTART, TINY, CachedRun, Runner, one_line_error, store
from . import toy_analysis, toy_network, toy_sampler, toy_target

pytestmark = pytest.mark.usefixtures("one_thread")

HESSIAN = [
    "hessian.batch_size=4",
    "hessian.timesteps=[5]",
    "hessian.top_k=1",
    "hessian.max_iterations=10",
    "hessian.trace_samples=2",
    "hessian.slq_runs=1",
    "hessian.lanczos_steps=4",
]


def run_of_kind(kind: str) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
    """Params, metrics and tags of the store's one run tagged `dmstab.kind=kind`."""
    (run,) = store().search_runs(
        [e.experiment_id for e in store().search_experiments()],
        filter_string=f"tags.`dmstab.kind` = '{kind}'",
    )
    assert run.info.status == "FINISHED"
    return run.data.params, run.data.metrics, run.data.tags


def latest_samples() -> np.ndarray:
    (npz,) = Path("samples").glob("*/*.npz")
    return np.load(npz)["arr_0"]


def toy_network_recipe(width: int) -> Path:
    """A DDPM recipe on 16×16 shapes whose model section is the toy network's keys only."""
    recipe = {
        "data": {"name": "synthetic", "resolution": 16, "synthetic_size": 64},
        "model": {"name": "toy_convnet", "width": width},
        "diffusion": {"schedule": "cosine", "steps": 100},
        "optim": {"lr": 1e-3},
        "train": {"steps": 6, "batch_size": 8, "precision": "fp32", "device": "cpu"},
        "sample": {"sampler": "ddim", "steps": 5, "num_images": 4, "batch_size": 4},
        "tracking": {"experiment": "tests", "flush_every": 5},
    }
    path = Path("toy_network.yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_network_registered_outside_the_package_trains_samples_and_is_analysed(
    dmstab: Runner,
) -> None:
    refused = one_line_error(dmstab("train", str(toy_network_recipe(0))))
    assert "model.width is 0; must be at least 1" in refused
    assert not Path("runs").exists()  # refused before anything was written

    trained = dmstab("train", str(toy_network_recipe(width=6)))
    assert trained.returncode == 0, trained.stderr
    params, metrics, tags = run_of_kind("train")
    assert {k: v for k, v in params.items() if k.startswith("model.")} == {
        "model.name": "toy_convnet",
        "model.class_cond": "False",
        "model.width": "6",
    }  # only the keys the toy network has
    assert int(tags["dmstab.parameters"]) == toy_network.parameter_count(channels=3, width=6)
    assert np.isfinite(metrics["train/loss"])

    assert dmstab("sample").returncode == 0
    images = latest_samples()
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8

    analysed = dmstab("hessian", *HESSIAN)
    assert analysed.returncode == 0, analysed.stderr
    _, hessian, _ = run_of_kind("hessian")
    assert hessian["hessian/parameters"] == int(tags["dmstab.parameters"])


@pytest.mark.slow
def test_a_prediction_target_registered_outside_the_package_trains_samples_and_is_analysed(
    dmstab: Runner,
) -> None:
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a, s = torch.tensor([[[[0.6]]], [[[0.8]]]]), torch.tensor([[[[0.8]]], [[[0.6]]]])
    unused = torch.full_like(a, float("nan"))  # −ε needs neither the posterior nor SNR
    c = StepCoefficients(a, s, posterior_x0=unused, posterior_xt=unused, snr=unused)
    target = toy_target.NegatedEpsilon()
    x_t = a * x0 + s * noise  # AAAI Eq. 3: a perfect prediction of −ε recovers x0
    recovered = target.predict_x0(x_t, target.training_target(x0, noise, c), c)
    torch.testing.assert_close(recovered, x0)

    toy_target.CALLS.clear()
    trained = dmstab("train", str(QUICKSTART), *TINY, "diffusion.target=toy_negated_eps")
    assert trained.returncode == 0, trained.stderr
    params, _, _ = run_of_kind("train")
    assert params["diffusion.target"] == "toy_negated_eps"
    assert toy_target.CALLS["training_target"] >= 12  # one per training step
    # the run's closing samples: one x̂0 per step of TINY's one batch (sample.steps=5)
    assert toy_target.CALLS["predict_x0"] == 5

    assert dmstab("sample", "sample.sampler=ddim", "sample.steps=3").returncode == 0
    assert toy_target.CALLS["predict_x0"] == 5 + 3

    before = toy_target.CALLS["training_target"]
    assert dmstab("hessian", *HESSIAN).returncode == 0
    assert toy_target.CALLS["training_target"] > before  # the analysed loss is the toy's


def test_a_sampler_registered_outside_the_package_samples_a_trained_model(
    dmstab: Runner, tiny_dm: CachedRun
) -> None:
    refused = one_line_error(dmstab("sample", "sample.sampler=toy_one_jumps"))
    assert "sample.sampler 'toy_one_jumps' is not registered" in refused
    assert "toy_one_jump" in refused  # the registered ones are listed

    sampled = dmstab("sample", "sample.sampler=toy_one_jump", "sample.num_images=4")
    assert sampled.returncode == 0, sampled.stderr
    params, metrics, _ = run_of_kind("sample")
    assert params["sample.sampler"] == "toy_one_jump" and metrics["sample/num_images"] == 4
    images = latest_samples()

    # Independently: x̂0 = (x_T − √(1−ᾱ)·ε̂)/√ᾱ at t = T−1 (AAAI Eq. 3), clipped, as 8-bit.
    subject = load_subject(None)
    model = subject.network(torch.device("cpu"), use_ema=True)
    T = subject.recipe.diffusion.steps
    alpha_bar = build_diffusion(subject.recipe).alphas_cumprod[T - 1].item()
    x_T = NoiseSource(subject.recipe.sample.seed, 0, 4, (3, 16, 16)).next()
    labels = torch.arange(4) % subject.num_classes
    with torch.no_grad():
        eps = model(x_T, torch.full((4,), (T - 1) * 1000.0 / T), labels)
    x0 = ((x_T - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5).clamp(-1, 1)
    expected = ((x0 + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(np.int64) - expected.astype(np.int64)).max() <= 1


def test_an_analysis_registered_outside_the_package_runs_through_dmstab_analyse(
    dmstab: Runner, tiny_dm: CachedRun
) -> None:
    unknown = one_line_error(dmstab("analyse", "weight_norms"))
    assert "analysis 'weight_norms' is not registered" in unknown and "weight_norm" in unknown
    refused = one_line_error(dmstab("analyse", "weight_norm", "weight_norm.p=0.5"))
    assert "weight_norm.p is 0.5; must be at least 1" in refused

    analysed = dmstab("analyse", "weight_norm", "weight_norm.p=1")
    assert analysed.returncode == 0, analysed.stderr
    params, metrics, _ = run_of_kind("weight_norm")
    assert params["weight_norm.p"] == "1.0"

    model = load_subject(None).network(torch.device("cpu"), use_ema=True)
    l1 = sum(float(w.detach().double().abs().sum()) for w in model.parameters())
    assert metrics["weight_norm/total"] == pytest.approx(l1, rel=1e-12)


def test_dmstab_plugins_names_the_modules_to_import(
    dmstab: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmstab.commands.plugins import load_plugins

    assert load_plugins(f"{toy_sampler.__name__}, {toy_analysis.__name__}") == [
        toy_sampler.__name__,
        toy_analysis.__name__,
    ]
    monkeypatch.setenv("DMSTAB_PLUGINS", "tests.components.no_such_module")
    refused = one_line_error(dmstab("sample"))
    assert "DMSTAB_PLUGINS names module 'tests.components.no_such_module'" in refused
