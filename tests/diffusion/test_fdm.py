"""FDM (Wu et al. 2023) in the DDPM setting: kernel scale, warm-up, training and sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.integrate import solve_ivp

from dmstab.config import Recipe, load_recipe
from dmstab.diffusion import build_diffusion
from dmstab.diffusion.ddpm_sampling import DiscreteSchedule, ddim
from dmstab.diffusion.fdm import (
    VP_SIGMA_MAX,
    VP_SIGMA_MIN,
    critically_damped_scale,
    fdm_scale,
    warmup_weight_cap,
)
from dmstab.diffusion.gaussian import GaussianDiffusion
from dmstab.diffusion.sampling import NoiseSource, with_labels
from dmstab.diffusion.schedules import linear_betas
from dmstab.diffusion.weighting import mse_weights
from dmstab.errors import DmstabError
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, store

M, BETA_MIN, BETA_D = 2.0, 0.1, 19.9  # official CIFAR-10 VP-FDM


def _recipe(*extra: str) -> Recipe:
    return load_recipe(RECIPES / "quickstart.yaml", [*TINY, *extra])


def _vp_sigma(t: float) -> float:
    return float(np.sqrt(np.exp(0.5 * BETA_D * t**2 + BETA_MIN * t) - 1.0))


def _reference_scale(sigma: np.ndarray) -> np.ndarray:
    """The official FDM_VPPrecond input scale at σ, written out from its definition."""
    lo, hi = _vp_sigma(1e-5), _vp_sigma(1.0)
    u = (sigma - lo) / (hi - lo)
    b = M * (BETA_MIN * u + 0.5 * BETA_D * u**2)
    return np.exp(-b) * (1.0 + b)


def test_critically_damped_scale_solves_the_oscillator() -> None:
    # x'' + 2x' + x = 0 (damping 2√k with k = 1: critical), x(0) = 1, x'(0) = 0.
    taus = [0.0, 0.3, 1.0, 2.5, 7.0, 15.0]
    ode = solve_ivp(
        lambda _, y: [y[1], -2.0 * y[1] - y[0]],
        (0.0, 15.0),
        [1.0, 0.0],
        t_eval=taus,
        rtol=1e-11,
        atol=1e-13,
    )
    expected = critically_damped_scale(torch.tensor(taus, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ode.y[0], expected, rtol=1e-7, atol=1e-12)


def test_fdm_scale_follows_the_momentum_ode_in_fdm_time() -> None:
    # With τ = m·B(u), β(u) = β_min + β_d·u, the oscillator in u reads
    # x'' + (2mβ − β'/β)·x' + (mβ)²·x = 0, x(0) = 1, x'(0) = 0.
    def rhs(u: float, y: list[float]) -> list[float]:
        beta = BETA_MIN + BETA_D * u
        return [y[1], -(2 * M * beta - BETA_D / beta) * y[1] - (M * beta) ** 2 * y[0]]

    us = [0.0, 0.05, 0.2, 0.5, 0.8, 1.0]
    ode = solve_ivp(rhs, (0.0, 1.0), [1.0, 0.0], t_eval=us, rtol=1e-11, atol=1e-14)
    sigma = VP_SIGMA_MIN + torch.tensor(us, dtype=torch.float64) * (VP_SIGMA_MAX - VP_SIGMA_MIN)
    scale = fdm_scale(sigma, multiplier=M, beta_min=BETA_MIN, beta_d=BETA_D).numpy()
    np.testing.assert_allclose(ode.y[0], scale, rtol=1e-6, atol=1e-12)


def test_vp_sigma_range_is_the_vp_sde_one() -> None:
    assert math.isclose(VP_SIGMA_MIN, math.sqrt(math.exp(0.5 * 19.9e-10 + 1e-6) - 1), rel_tol=1e-9)
    assert math.isclose(VP_SIGMA_MAX, math.sqrt(math.exp(10.05) - 1), rel_tol=1e-12)


def _fdm_diffusion(*extra: str) -> tuple[GaussianDiffusion, Recipe]:
    recipe = _recipe("diffusion.schedule=linear", "diffusion.weighting=fdm", *extra)
    return build_diffusion(recipe), recipe


def test_model_sees_fdm_scale_times_x0_plus_sigma_eps() -> None:
    diffusion, recipe = _fdm_diffusion()
    T = recipe.diffusion.steps
    alpha_bar = np.cumprod(1.0 - linear_betas(T).numpy())
    t = torch.tensor([0, 7, 30, 60, 90, T - 1])
    x0 = torch.rand(len(t), 3, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn(len(t), 3, 4, 4, dtype=torch.float64)
    sigma = np.sqrt((1.0 - alpha_bar) / alpha_bar)[t.numpy()]
    scale = torch.from_numpy(_reference_scale(sigma)).reshape(-1, 1, 1, 1)
    expected = scale * (x0 + torch.from_numpy(sigma).reshape(-1, 1, 1, 1) * eps)
    seen = diffusion.model_input(diffusion.q_sample(x0, t, eps), t)
    torch.testing.assert_close(seen.double(), expected, rtol=1e-5, atol=1e-9)
    # Below σ ≈ 1 the FDM scale is ~1 where VP's √ᾱ is ~0.7: a real change of input.
    assert float(diffusion.input_scale[T // 4]) > 1.2
    vp = build_diffusion(_recipe("diffusion.schedule=linear"))
    assert torch.equal(vp.input_scale, torch.ones(T, dtype=torch.float64))


def test_respaced_diffusion_keeps_each_steps_input_scale() -> None:
    diffusion, _ = _fdm_diffusion()
    kept = [0, 10, 45, 80, 99]
    spaced = diffusion.respaced(kept)
    torch.testing.assert_close(spaced.input_scale, diffusion.input_scale[kept])


def test_warmup_cap_grows_from_5_to_500_then_lifts() -> None:
    W = 400
    assert warmup_weight_cap(1, W) == 5.0
    assert warmup_weight_cap(W // 2 + 1, W) == pytest.approx(50.0, rel=1e-12)
    assert warmup_weight_cap(W, W) == pytest.approx(5.0 * 100 ** ((W - 1) / W), rel=1e-12)
    assert warmup_weight_cap(W + 1, W) is None
    assert warmup_weight_cap(1, 0) is None
    with pytest.raises(ValueError, match="1-based"):
        warmup_weight_cap(0, W)


def test_warmup_cap_matches_the_official_multiplicative_loop() -> None:
    W, cap, step_factor = 400, 5.0, math.exp(math.log(100) / 400)
    for step in range(1, W + 1):  # official VPLoss: clamp while cap < 500, then cap *= factor
        assert cap < 500.0
        assert warmup_weight_cap(step, W) == pytest.approx(cap, rel=1e-9)
        cap *= step_factor
    assert cap == pytest.approx(500.0, rel=1e-9)


@pytest.mark.parametrize("target", ["eps", "x0"])
def test_fdm_weights_are_the_official_clamped_x0_weight(target: str) -> None:
    diffusion, recipe = _fdm_diffusion(f"diffusion.target={target}")
    W = recipe.diffusion.fdm_warmup_iterations
    t = torch.arange(recipe.diffusion.steps)
    alpha_bar = torch.from_numpy(np.cumprod(1.0 - linear_betas(len(t)).numpy()))
    snr = alpha_bar / (1 - alpha_bar)  # = 1/σ², the official x0-error weight
    for step in (1, W // 2 + 1, W):
        cap = 5.0 * 100 ** ((step - 1) / W)
        x0_weight = snr.clamp(max=cap)  # official: weight = 1/σ² clamped at the cap
        expected = x0_weight if target == "x0" else x0_weight / snr
        weights = mse_weights(recipe.diffusion, diffusion, t, step)
        torch.testing.assert_close(weights, expected.float(), rtol=1e-6, atol=0.0)
        assert bool((snr > cap).any())  # the cap bites at the low-noise steps
    lifted = mse_weights(recipe.diffusion, diffusion, t, W + 1)
    torch.testing.assert_close(lifted, (snr if target == "x0" else torch.ones_like(snr)).float())


@pytest.mark.parametrize(
    "override",
    [
        "diffusion.fdm_multiplier=0",
        "diffusion.fdm_beta_min=-0.1",
        "diffusion.fdm_warmup_iterations=-1",
    ],
)
def test_bad_fdm_settings_are_rejected(override: str) -> None:
    with pytest.raises(DmstabError, match=override.split("=")[0].split(".")[1]):
        _recipe("diffusion.weighting=fdm", override)


def test_tiny_fdm_training_run_warms_up_then_trains_unweighted() -> None:
    recipe = _recipe("diffusion.weighting=fdm", "diffusion.fdm_warmup_iterations=6")
    result = train(recipe)
    client: MlflowClient = store()
    assert client.get_run(result.run_id).info.status == "FINISHED"
    weights = client.get_metric_history(result.run_id, "train/loss_weight")
    history = {m.step: m.value for m in weights}
    losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    assert all(math.isfinite(v) for v in losses) and len(losses) == recipe.train.steps
    assert history[1] < 1.0  # cap 5 on SNR: the low-noise steps are down-weighted
    assert all(history[k] == 1.0 for k in range(7, recipe.train.steps + 1))
    samples = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert any(p.endswith(".npz") for p in samples)


def _oracle(point: torch.Tensor, diffusion: GaussianDiffusion, scale: np.ndarray):  # type: ignore[no-untyped-def]
    """The exact ε-predictor for data = {point}, assuming the model sees scale·(x0 + σε)."""
    T = diffusion.original_num_timesteps
    alpha_bar = diffusion.alphas_cumprod.numpy()
    sigma = torch.from_numpy(np.sqrt((1 - alpha_bar) / alpha_bar))
    scale_t = torch.from_numpy(scale)

    def model(x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        index = torch.round(time.double() * T / 1000.0).long()
        s, sig = (v[index].reshape(-1, 1, 1, 1) for v in (scale_t, sigma))
        return ((x.double() / s - point) / sig).float()

    return model


def test_sampling_feeds_the_model_the_same_fdm_input_as_training() -> None:
    # The exact ε-predictor of a one-point dataset under FDM's input must give x̂0 = point at
    # every respaced sampling step, and DDIM must land on the point; without the FDM input
    # scale (plain VP diffusion) the same predictor is wrong in the middle of the chain.
    diffusion, _ = _fdm_diffusion()
    alpha_bar = diffusion.alphas_cumprod.numpy()
    scale = _reference_scale(np.sqrt((1 - alpha_bar) / alpha_bar))
    point = torch.linspace(-0.9, 0.9, 48, dtype=torch.float64).reshape(1, 3, 4, 4)
    model = _oracle(point, diffusion, scale)
    vp = build_diffusion(_recipe("diffusion.schedule=linear"))
    kept = [0, 5, 20, 40, 60, 80, 99]
    t = torch.arange(len(kept))
    x0, eps = point.expand(len(kept), -1, -1, -1), torch.randn(len(kept), 3, 4, 4)
    for on, consistent in ((diffusion, True), (vp, False)):
        spaced = on.respaced(kept)
        x_t = spaced.q_sample(x0, t, eps.double()).float()
        step = spaced.p_mean_variance(with_labels(model, None), x_t, t, clip_denoised=False)
        error = float((step.pred_x0.double() - x0).abs().max())
        assert error < 1e-4 if consistent else error > 0.1

    noise = NoiseSource(seed=3, first_index=0, count=2, shape=(3, 4, 4))
    images = ddim(with_labels(model, None), noise, DiscreteSchedule(diffusion, 20, eta=0.0))
    torch.testing.assert_close(images.double(), point.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
