"""`diffusion.target: previous_x` (improved-diffusion's PREVIOUS_X) against Ho et al. 2020 Eq. 7.

Every reference value is computed here in float64 numpy from the cosine schedule's β_t:
μ̃(x_t, x0) = β_t·√ᾱ_{t−1}/(1−ᾱ_t)·x0 + (1−ᾱ_{t−1})·√α_t/(1−ᾱ_t)·x_t, ᾱ_{−1} = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from dmstab.config import DiffusionConfig
from dmstab.diffusion.ddpm_sampling import DiscreteSchedule
from dmstab.diffusion.gaussian import GaussianDiffusion
from dmstab.diffusion.samplers import find_sampler
from dmstab.diffusion.sampling import NoiseSource, with_labels
from dmstab.diffusion.schedules import cosine_betas, make_betas
from dmstab.diffusion.weighting import mse_weights

T = 1000
SHAPE = (7, 3, 4, 4)
STEPS = torch.tensor([0, 1, 20, 250, 500, 800, 999])
EPS32 = float(np.finfo(np.float32).eps)
Model = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def schedule(num_timesteps: int = T) -> tuple[np.ndarray, np.ndarray]:
    """(β_t, ᾱ_t) in float64."""
    betas = cosine_betas(num_timesteps).numpy()
    return betas, np.cumprod(1.0 - betas)


def posterior(t: Tensor, num_timesteps: int = T) -> tuple[np.ndarray, np.ndarray]:
    """Ho et al. 2020 Eq. 7's coefficients of x0 and x_t, shaped (B, 1, 1, 1)."""
    betas, alpha_bar = schedule(num_timesteps)
    previous = np.concatenate([[1.0], alpha_bar[:-1]])
    i = t.numpy()
    coef_x0 = betas[i] * np.sqrt(previous[i]) / (1.0 - alpha_bar[i])
    coef_xt = (1.0 - previous[i]) * np.sqrt(1.0 - betas[i]) / (1.0 - alpha_bar[i])
    return coef_x0.reshape(-1, 1, 1, 1), coef_xt.reshape(-1, 1, 1, 1)


def forward(x0: np.ndarray, noise: np.ndarray, t: Tensor) -> np.ndarray:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (AAAI Eq. 3) in float64."""
    alpha_bar = schedule()[1][t.numpy()].reshape(-1, 1, 1, 1)
    return np.asarray(np.sqrt(alpha_bar) * x0 + np.sqrt(1.0 - alpha_bar) * noise)


def diffusion(learn_sigma: bool = False, num_timesteps: int = T) -> GaussianDiffusion:
    return GaussianDiffusion(
        make_betas("cosine", num_timesteps),
        target="previous_x",
        learn_sigma=learn_sigma,
        hybrid_loss=learn_sigma,
    )


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.rand(SHAPE, generator=generator) * 2 - 1, torch.randn(SHAPE, generator=generator)


def exact_mean(x0: Tensor, noise: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(μ̃, x_t) in float64 for STEPS."""
    x0_64, x_t = x0.double().numpy(), forward(x0.double().numpy(), noise.double().numpy(), STEPS)
    coef_x0, coef_xt = posterior(STEPS)
    return coef_x0 * x0_64 + coef_xt * x_t, x_t


def test_training_target_is_the_posterior_mean(data: tuple[Tensor, Tensor]) -> None:
    x0, noise = data
    target = diffusion().training_target(x0, STEPS, noise)
    mean, _ = exact_mean(x0, noise)
    np.testing.assert_allclose(target.double().numpy(), mean, rtol=0, atol=2e-6)
    # t = 0: β_0·1/(1 − ᾱ_0) = 1 and 1 − ᾱ_{−1} = 0, so the target is x0 itself
    assert torch.equal(target[0], x0[0])


def test_the_exact_posterior_mean_recovers_x0(data: tuple[Tensor, Tensor]) -> None:
    """x̂0 = (μ − c_t·x_t)/c_0 to float32 precision: rounding μ and c_t·x_t to float32 errs by
    a few ulps of |μ| + |c_t·x_t|, which the division by c_0 (1.6e-3 at t = T−1) magnifies."""
    x0, noise = data
    mean, x_t = exact_mean(x0, noise)
    output = torch.from_numpy(mean).float()
    recovered = diffusion().predict_x0(torch.from_numpy(x_t).float(), STEPS, output)
    coef_x0, coef_xt = posterior(STEPS)
    bound = 4 * EPS32 * (np.abs(mean) + np.abs(coef_xt * x_t) + np.abs(x0.numpy())) / coef_x0
    error = np.abs(recovered.double().numpy() - x0.double().numpy())
    assert (error <= bound).all(), (error / bound).max()
    assert torch.equal(recovered[0], x0[0])  # t = 0: x̂0 = μ


def test_the_reverse_mean_is_the_prediction_even_when_x0_is_clipped(
    data: tuple[Tensor, Tensor],
) -> None:
    """improved-diffusion's p_mean_variance: model_mean = model_output for PREVIOUS_X; only
    pred_xstart is clipped."""
    x0, noise = data
    model = diffusion()
    x_t = model.q_sample(x0, STEPS, noise)
    output = 3.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    step = model.p_mean_variance(lambda x, tm: output, x_t, STEPS, clip_denoised=True)
    assert torch.equal(step.mean, output)
    unclipped = model.predict_x0(x_t, STEPS, output)
    assert unclipped.abs().max() > 1  # the clip bites …
    assert torch.equal(step.pred_x0, unclipped.clamp(-1, 1))  # … x̂0 only
    coef_x0, coef_xt = posterior(STEPS)
    expected = (output.double().numpy() - coef_xt * x_t.double().numpy()) / coef_x0
    np.testing.assert_allclose(unclipped.double().numpy()[1:], expected[1:], rtol=1e-4, atol=1e-4)


def test_with_learned_sigma_the_exact_posterior_has_zero_loss(
    data: tuple[Tensor, Tensor],
) -> None:
    """Output μ̃ and Σ's value −1 (log σ² = log β̃_t, Nichol & Dhariwal Eq. 15) is q itself:
    MSE 0 and KL(q ‖ p_θ) 0 for t > 0."""
    x0, noise = data
    mean, _ = exact_mean(x0, noise)
    output = torch.cat([torch.from_numpy(mean).float(), -torch.ones(SHAPE)], dim=1)
    losses = diffusion(learn_sigma=True).training_losses(lambda x, tm, y: output, x0, STEPS, noise)
    assert losses["mse"].max().item() < 1e-12
    assert losses["vb"][1:].abs().max().item() < 1e-5


def test_min_snr_weight_is_the_same_objective_in_closed_form() -> None:
    """w_μ = w_ε·SNR/c_0² = w_ε·α_t(1 − ᾱ_t)/β_t² (c_0 = β_t√ᾱ_{t−1}/(1 − ᾱ_t))."""
    betas, alpha_bar = schedule()
    i = STEPS.numpy()
    snr = alpha_bar[i] / (1 - alpha_bar[i])
    ratio = (1 - betas[i]) * (1 - alpha_bar[i]) / betas[i] ** 2
    weights = mse_weights(DiffusionConfig(weighting="min_snr"), diffusion(), STEPS, step=1)
    np.testing.assert_allclose(weights.numpy(), np.minimum(snr, 5.0) / snr * ratio, rtol=1e-6)


def posterior_mean_oracle(image: Tensor, num_timesteps: int) -> Model:
    """A model that knows x0 = image: μ̃(x_t, image) of its original timestep, float64."""

    def model(x_t: Tensor, t_model: Tensor, y: Tensor | None) -> Tensor:
        t = torch.from_numpy(np.rint(t_model.numpy() * num_timesteps / 1000.0).astype(np.int64))
        coef_x0, coef_xt = posterior(t, num_timesteps)
        mean = coef_x0 * image.double().numpy() + coef_xt * x_t.double().numpy()
        return torch.from_numpy(mean).float()

    return model


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sampling_the_whole_chain_with_the_exact_mean_returns_its_image(
    sampler: str, eta: float
) -> None:
    """Over all T steps the last step (c_0 = 1) returns the image; deterministic DDIM stays on
    x_t = √ᾱ_t·image + √(1−ᾱ_t)·ε_T throughout, which needs every x̂0 to be the image."""
    num_timesteps = 100
    image = torch.linspace(-0.9, 0.9, 3 * 4 * 4).reshape(3, 4, 4)
    oracle, seen = posterior_mean_oracle(image, num_timesteps), []

    def recording(x_t: Tensor, t_model: Tensor, y: Tensor | None) -> Tensor:
        seen.append(x_t.double())
        return oracle(x_t, t_model, y)

    images = find_sampler(sampler)(
        with_labels(recording, None),
        NoiseSource(0, 0, 2, (3, 4, 4)),
        DiscreteSchedule(diffusion(num_timesteps=num_timesteps), num_timesteps, eta=eta),
    )
    torch.testing.assert_close(images, image.expand(2, 3, 4, 4), atol=1e-5, rtol=0)
    if sampler == "ddim" and eta == 0:
        alpha_bar = torch.from_numpy(schedule(num_timesteps)[1]).flip(0)  # t = T−1 … 0
        implied = [
            (x - a.sqrt() * image.double()) / (1 - a).sqrt()
            for x, a in zip(seen, alpha_bar, strict=True)
        ]
        for eps in implied[:-10]:  # near t = 0, √(1−ᾱ_t) → 0 magnifies float32 rounding
            torch.testing.assert_close(eps, implied[0], atol=1e-4, rtol=0)
