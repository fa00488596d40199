"""Prediction targets (ε, x0, v) and MSE weightings (Min-SNR-γ, P2) against closed forms.

Every reference value is computed here in float64 numpy from the cosine schedule's ᾱ_t, not by
the code under test.
"""

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
TARGETS: list[str] = ["eps", "x0", "v"]
# t = 0 (SNR ≈ 1e5), mid-range, SNR ≈ γ = 5 and 1, and t = T−1 (SNR ≈ 1e-9).
STEPS = torch.tensor([0, 20, 150, 250, 500, 800, 999])

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def alpha_bars() -> np.ndarray:
    return np.cumprod(1.0 - cosine_betas(T).numpy())


def snr_at(t: Tensor) -> np.ndarray:
    a = alpha_bars()[t.numpy()]
    return np.asarray(a / (1.0 - a))


def per_sample(values: np.ndarray) -> np.ndarray:
    return values.reshape(-1, 1, 1, 1)


def diffusion_for(target: str, learn_sigma: bool = False) -> GaussianDiffusion:
    return GaussianDiffusion(
        make_betas("cosine", T), target=target, learn_sigma=learn_sigma, hybrid_loss=learn_sigma
    )


def true_target(target: str, x0: np.ndarray, eps: np.ndarray, t: Tensor) -> np.ndarray:
    """ε, x0 or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022) in float64."""
    a = per_sample(alpha_bars()[t.numpy()])
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    return np.asarray(np.sqrt(a) * eps - np.sqrt(1 - a) * x0)


def eps_from_prediction(
    target: str, prediction: np.ndarray, x_t: np.ndarray, t: Tensor
) -> np.ndarray:
    """The ε̂ implied by a prediction of `target` at x_t (Eq. 3, the v definition and, for
    previous_x, Ho et al. 2020 Eq. 7's μ̃ = c_0·x0 + c_t·x_t solved for x0)."""
    a = per_sample(alpha_bars()[t.numpy()])
    if target == "eps":
        return prediction
    if target == "previous_x":
        betas = per_sample(cosine_betas(T).numpy()[t.numpy()])
        a_prev = per_sample(np.concatenate([[1.0], alpha_bars()[:-1]])[t.numpy()])
        coef_x0 = betas * np.sqrt(a_prev) / (1 - a)
        coef_xt = (1 - a_prev) * np.sqrt(1 - betas) / (1 - a)
        x0_hat = (prediction - coef_xt * x_t) / coef_x0
    else:
        x0_hat = prediction if target == "x0" else np.sqrt(a) * x_t - np.sqrt(1 - a) * prediction
    return np.asarray((x_t - np.sqrt(a) * x0_hat) / np.sqrt(1 - a))


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.rand(SHAPE, generator=generator) * 2 - 1, torch.randn(SHAPE, generator=generator)


@pytest.mark.parametrize("target", TARGETS)
def test_true_target_has_zero_loss_and_recovers_x0(
    target: str, data: tuple[Tensor, Tensor]
) -> None:
    x0, noise = data
    diffusion = diffusion_for(target)
    exact = true_target(target, x0.double().numpy(), noise.double().numpy(), STEPS)
    output = torch.from_numpy(exact).float()
    losses = diffusion.training_losses(lambda x, tm, y: output, x0, STEPS, noise)
    assert losses["mse"].max().item() < 1e-12
    x_t = diffusion.q_sample(x0, STEPS, noise)
    # x̂0 from ε divides by √ᾱ_{T−1} ≈ 5e-5 at the last step: compare the others.
    recovered = diffusion.predict_x0(x_t[:-1], STEPS[:-1], output[:-1])
    torch.testing.assert_close(recovered, x0[:-1], atol=2e-4, rtol=0)


def test_v_prediction_recovers_x0_even_at_the_last_step(data: tuple[Tensor, Tensor]) -> None:
    """x̂0 = √ᾱ·x_t − √(1−ᾱ)·v̂ has no division, unlike ε-prediction (√ᾱ_{T−1} ≈ 5e-5)."""
    x0, noise = data
    diffusion = diffusion_for("v")
    v = torch.from_numpy(true_target("v", x0.double().numpy(), noise.double().numpy(), STEPS))
    x_t = diffusion.q_sample(x0, STEPS, noise)
    torch.testing.assert_close(diffusion.predict_x0(x_t, STEPS, v.float()), x0, atol=1e-5, rtol=0)


def test_v_loss_is_the_v_mse(data: tuple[Tensor, Tensor]) -> None:
    x0, noise = data
    output = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    losses = diffusion_for("v").training_losses(lambda x, tm, y: output, x0, STEPS, noise)
    v = true_target("v", x0.double().numpy(), noise.double().numpy(), STEPS)
    expected = ((v - output.double().numpy()) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(losses["mse"].numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(losses["loss"], losses["mse"])


def constant_image_oracle(target: str, image: Tensor) -> ModelFn:
    """A model that knows x0 = image: returns the exact ε, x0 or v for any x_t (original t)."""
    a_all = alpha_bars()

    def model(x_t: Tensor, t_model: Tensor, y: Tensor | None) -> Tensor:
        index = np.rint(t_model.numpy() * T / 1000.0).astype(np.int64)
        a = per_sample(a_all[index])
        x0 = np.broadcast_to(image.double().numpy(), x_t.shape)
        eps = (x_t.double().numpy() - np.sqrt(a) * x0) / np.sqrt(1 - a)
        exact = true_target(target, x0, eps, torch.from_numpy(index))
        return torch.tensor(exact, dtype=torch.float32)

    return model


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sampling_with_a_perfect_model_returns_its_image(
    target: str, sampler: str, eta: float
) -> None:
    """Both samplers end in the posterior at t = 0, which is x̂0 itself (ᾱ_{−1} = 1)."""
    image = torch.linspace(-0.9, 0.9, 3 * 4 * 4).reshape(3, 4, 4)
    images = find_sampler(sampler)(
        with_labels(constant_image_oracle(target, image), None),
        NoiseSource(0, 0, 2, (3, 4, 4)),
        DiscreteSchedule(diffusion_for(target), 10, eta=eta),
    )
    torch.testing.assert_close(images, image.expand(2, 3, 4, 4), atol=1e-4, rtol=0)


def weighting(name: str, **kwargs: float) -> DiffusionConfig:
    return DiffusionConfig(steps=T, weighting=name, **kwargs)  # type: ignore[arg-type]


def test_min_snr_on_eps_is_min_snr_gamma_over_snr() -> None:
    weights = mse_weights(weighting("min_snr"), diffusion_for("eps"), STEPS, step=1)
    assert weights.dtype == torch.float32 and weights.shape == STEPS.shape
    snr = snr_at(STEPS)
    np.testing.assert_allclose(weights.numpy(), np.minimum(snr, 5.0) / snr, rtol=1e-6)
    assert weights[-1].item() == 1.0 and weights[0].item() < 1e-3


def test_min_snr_closed_forms_for_x0_and_v() -> None:
    """Hang et al. 2023: min(SNR, γ) on the x0-MSE, min(SNR, γ)/(SNR + 1) on the v-MSE."""
    snr = snr_at(STEPS)
    config = weighting("min_snr", min_snr_gamma=3.0)
    x0 = mse_weights(config, diffusion_for("x0"), STEPS, step=1).numpy()
    v = mse_weights(config, diffusion_for("v"), STEPS, step=1).numpy()
    np.testing.assert_allclose(x0, np.minimum(snr, 3.0), rtol=1e-6)
    np.testing.assert_allclose(v, np.minimum(snr, 3.0) / (snr + 1), rtol=1e-6)


def test_p2_is_one_over_k_plus_snr_to_the_gamma_and_gamma_zero_is_uniform() -> None:
    snr = snr_at(STEPS)
    p2 = mse_weights(weighting("p2", p2_k=2.0, p2_gamma=0.5), diffusion_for("eps"), STEPS, 1)
    np.testing.assert_allclose(p2.numpy(), (2.0 + snr) ** -0.5, rtol=1e-6)
    flat = mse_weights(weighting("p2", p2_gamma=0.0), diffusion_for("eps"), STEPS, step=1)
    assert torch.equal(flat, torch.ones(len(STEPS)))
    none = mse_weights(weighting("none"), diffusion_for("x0"), STEPS, step=1)
    assert torch.equal(none, torch.ones(len(STEPS)))


EPS_WEIGHTS = {
    "min_snr": lambda snr: np.minimum(snr, 5.0) / snr,
    "p2": lambda snr: (1.0 + snr) ** -1.0,
}


@pytest.mark.parametrize("target", [*TARGETS, "previous_x"])
@pytest.mark.parametrize("name", sorted(EPS_WEIGHTS))
def test_a_weighting_is_the_same_objective_for_every_target(
    target: str, name: str, data: tuple[Tensor, Tensor]
) -> None:
    """w_target·MSE_target of any prediction equals w_ε·MSE_ε of the ε̂ it implies."""
    x0, noise = data
    diffusion = diffusion_for(target)
    prediction = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    weights = mse_weights(weighting(name), diffusion, STEPS, step=1)
    loss = diffusion.training_losses(lambda x, tm, y: prediction, x0, STEPS, noise, None, weights)

    a = per_sample(alpha_bars()[STEPS.numpy()])
    eps = noise.double().numpy()
    x_t = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * eps
    eps_hat = eps_from_prediction(target, prediction.double().numpy(), x_t, STEPS)
    eps_mse = ((eps_hat - eps) ** 2).mean(axis=(1, 2, 3))
    expected = EPS_WEIGHTS[name](snr_at(STEPS)) * eps_mse
    np.testing.assert_allclose(loss["loss"].numpy(), expected, rtol=2e-4)


def test_weights_scale_only_the_mse_term_of_the_hybrid_loss(data: tuple[Tensor, Tensor]) -> None:
    x0, noise = data
    diffusion = diffusion_for("eps", learn_sigma=True)
    generator = torch.Generator().manual_seed(3)
    output = torch.cat([torch.randn(SHAPE, generator=generator), torch.zeros(SHAPE)], dim=1)
    plain = diffusion.training_losses(lambda x, tm, y: output, x0, STEPS, noise)
    weights = mse_weights(weighting("min_snr"), diffusion, STEPS, step=1)
    weighted = diffusion.training_losses(lambda x, tm, y: output, x0, STEPS, noise, None, weights)
    torch.testing.assert_close(weighted["mse"], plain["mse"])
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    torch.testing.assert_close(weighted["loss"], weights * plain["mse"] + plain["vb"])
