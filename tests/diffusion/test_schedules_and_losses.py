"""Schedules and training losses checked against closed forms and torch.distributions."""

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from dmstab.diffusion.gaussian import GaussianDiffusion
from dmstab.diffusion.schedules import cosine_betas, linear_betas, make_betas

T = 4000  # not 1000, so that the VB term's T/1000 scale is visible
SHAPE = (6, 3, 4, 4)


def alpha_bars(num_timesteps: int) -> np.ndarray:
    """ᾱ_t of the cosine schedule, from its betas, in float64 numpy."""
    return np.cumprod(1.0 - cosine_betas(num_timesteps).numpy())


def eight_bit_images(generator: torch.Generator) -> Tensor:
    """Random 8-bit images on [−1, 1] whose first pixels are exactly −1 and 1."""
    x0 = torch.randint(0, 256, SHAPE, generator=generator).float() / 127.5 - 1.0
    x0[:, 0, 0, 0] = -1.0
    x0[:, 0, 0, 1] = 1.0
    return x0


def index_from_model_time(t_model: Tensor) -> np.ndarray:
    """Undo rescale_timesteps: the model sees t·1000/T."""
    return np.rint(t_model.numpy() * T / 1000.0).astype(np.int64)


def per_sample(values: np.ndarray) -> np.ndarray:
    return values.reshape(-1, 1, 1, 1)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_linear_betas_endpoints_scale_with_num_timesteps() -> None:
    for num_timesteps, first, last in [(1000, 1e-4, 0.02), (4000, 2.5e-5, 0.005)]:
        betas = linear_betas(num_timesteps)
        assert betas.dtype == torch.float64 and betas.shape == (num_timesteps,)
        assert betas[0].item() == pytest.approx(first, rel=1e-12)
        assert betas[-1].item() == pytest.approx(last, rel=1e-12)
        assert bool((betas.diff() > 0).all())


def test_scaled_linear_betas_are_stable_diffusions_square_root_linear_schedule() -> None:
    # Stable Diffusion / U-ViT's stable_diffusion_beta_schedule: √β from √0.00085 to √0.012,
    # written here as β_i = (√b0 + i/(T−1)·(√b1 − √b0))²
    betas = make_betas("scaled_linear", 1000).numpy()
    i = np.arange(1000)
    expected = (0.00085**0.5 + i / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1] == pytest.approx(0.012, rel=1e-12)


def test_cosine_alpha_bar_matches_closed_form_before_clipping() -> None:
    num_timesteps, s = 4000, 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_betas(num_timesteps).numpy()
    clipped = np.flatnonzero(betas >= 0.999)
    first_clipped = int(clipped[0]) if clipped.size else num_timesteps
    assert first_clipped > 0.99 * num_timesteps
    expected = np.array([f((i + 1) / num_timesteps) / f(0) for i in range(first_clipped)])
    np.testing.assert_allclose(alpha_bars(num_timesteps)[:first_clipped], expected, rtol=1e-9)


def test_cosine_betas_are_clipped_at_max_beta() -> None:
    betas = cosine_betas(1000)
    assert betas.max().item() <= 0.999
    assert betas[-1].item() == pytest.approx(0.999)  # f(1) = 0 would give β = 1 unclipped
    assert bool((betas > 0).all())


def test_make_betas_dispatches_and_rejects_unknown_names() -> None:
    assert torch.equal(make_betas("linear", 10), linear_betas(10))
    assert torch.equal(make_betas("cosine", 10), cosine_betas(10))
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("sigmoid", 10)  # type: ignore[arg-type]


def test_q_sample_matches_eq3(generator: torch.Generator) -> None:
    diffusion = GaussianDiffusion(
        make_betas("cosine", T), target="eps", learn_sigma=False, hybrid_loss=False
    )
    x0 = eight_bit_images(generator)
    noise = torch.randn(SHAPE, generator=generator)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    a = per_sample(alpha_bars(T)[t.numpy()])
    expected = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * noise.double().numpy()
    np.testing.assert_allclose(diffusion.q_sample(x0, t, noise).numpy(), expected, atol=1e-6)


def test_model_time_rescales_to_thousand() -> None:
    diffusion = GaussianDiffusion(
        make_betas("cosine", 4000), target="eps", learn_sigma=False, hybrid_loss=False
    )
    times = diffusion.model_time(torch.tensor([0, 2000, 3999]))
    assert times.dtype == torch.float32
    assert times.tolist() == [0.0, 500.0, 999.75]


def true_eps_model(x0: Tensor) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """A model returning the ε that produced x_t from x0 (Eq. 3 solved for ε)."""
    a = alpha_bars(T)

    def model(x_t: Tensor, t_model: Tensor, y: Tensor | None) -> Tensor:
        abar = torch.from_numpy(per_sample(a[index_from_model_time(t_model)]))
        return ((x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()).float()

    return model


def test_eps_oracle_has_zero_mse(generator: torch.Generator) -> None:
    diffusion = GaussianDiffusion(
        make_betas("cosine", T), target="eps", learn_sigma=False, hybrid_loss=False
    )
    x0 = eight_bit_images(generator)
    noise = torch.randn(SHAPE, generator=generator)
    t = torch.tensor([0, 3, 100, 400, 700, 950])
    losses = diffusion.training_losses(true_eps_model(x0), x0, t, noise)
    assert set(losses) == {"loss", "mse"}
    assert losses["mse"].shape == (6,)
    assert losses["mse"].max().item() < 1e-10
    # A wrong timestep in the model (t+1) must not give zero loss: model time is used.
    shifted = diffusion.training_losses(
        lambda x, tm, y: true_eps_model(x0)(x, tm + 1000 / T, y), x0, t.clamp(max=998), noise
    )
    assert shifted["mse"].min().item() > 1e-8


def test_x0_oracle_has_zero_mse_and_x0_loss_is_eq5(generator: torch.Generator) -> None:
    diffusion = GaussianDiffusion(
        make_betas("linear", T), target="x0", learn_sigma=False, hybrid_loss=False
    )
    x0 = eight_bit_images(generator)
    noise = torch.randn(SHAPE, generator=generator)
    t = torch.randint(0, T, (6,), generator=generator)
    oracle = diffusion.training_losses(lambda x, tm, y: x0.clone(), x0, t, noise)
    assert torch.equal(oracle["mse"], torch.zeros(6))
    output = torch.randn(SHAPE, generator=generator)
    losses = diffusion.training_losses(lambda x, tm, y: output, x0, t, noise)
    by_hand = ((x0 - output) ** 2).sum(dim=(1, 2, 3)) / (3 * 4 * 4)
    torch.testing.assert_close(losses["mse"], by_hand)
    torch.testing.assert_close(losses["loss"], by_hand)


def test_bf16_model_output_is_cast_to_float32(generator: torch.Generator) -> None:
    diffusion = GaussianDiffusion(
        make_betas("cosine", T), target="eps", learn_sigma=False, hybrid_loss=False
    )
    x0 = eight_bit_images(generator)
    noise = torch.randn(SHAPE, generator=generator)
    losses = diffusion.training_losses(
        lambda x, tm, y: x.to(torch.bfloat16), x0, torch.full((6,), 5), noise
    )
    assert losses["loss"].dtype == torch.float32


def learned_sigma_setup(
    generator: torch.Generator, t: Tensor
) -> tuple[GaussianDiffusion, Tensor, Tensor, Tensor, Tensor]:
    """Diffusion with learned Σ, data, noise, and a fixed model output (ε̂ near ε, v in (−1, 1))."""
    diffusion = GaussianDiffusion(
        make_betas("cosine", T), target="eps", learn_sigma=True, hybrid_loss=True
    )
    x0 = eight_bit_images(generator)
    noise = torch.randn(SHAPE, generator=generator)
    eps_hat = noise + 0.5 * torch.randn(SHAPE, generator=generator)
    v = torch.rand(SHAPE, generator=generator) * 2 - 1
    return diffusion, x0, noise, torch.cat([eps_hat, v], dim=1), t


def reference_distributions(
    x0: Tensor, noise: Tensor, output: Tensor, t: Tensor
) -> tuple[Normal, Normal]:
    """q(x_{t−1}|x_t,x0) and p_θ(x_{t−1}|x_t) in float64, from Ho et al. Eqs. 6–7 and
    Nichol & Dhariwal Eq. 15 (posterior variance at t = 0 replaced by the one at t = 1)."""
    betas = cosine_betas(T).numpy()
    a = alpha_bars(T)
    a_prev = np.append(1.0, a[:-1])
    idx = t.numpy()
    beta, ab, ab_prev = (per_sample(v[idx]) for v in (betas, a, a_prev))
    post_var_all = betas * (1 - a_prev) / (1 - a)
    post_var = per_sample(np.where(idx == 0, post_var_all[1], post_var_all[idx]))
    eps_hat, v = output[:, :3].double().numpy(), output[:, 3:].double().numpy()
    start = x0.double().numpy()
    x_t = np.sqrt(ab) * start + np.sqrt(1 - ab) * noise.double().numpy()
    x0_hat = (x_t - np.sqrt(1 - ab) * eps_hat) / np.sqrt(ab)
    coef_x0 = np.sqrt(ab_prev) * beta / (1 - ab)
    coef_xt = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
    frac = (v + 1) / 2
    model_var = np.exp(frac * np.log(beta) + (1 - frac) * np.log(post_var))
    true = Normal(
        torch.from_numpy(coef_x0 * start + coef_xt * x_t),
        torch.from_numpy(np.broadcast_to(np.sqrt(post_var), start.shape).copy()),
    )
    model = Normal(
        torch.from_numpy(coef_x0 * x0_hat + coef_xt * x_t), torch.from_numpy(np.sqrt(model_var))
    )
    return true, model


def test_vb_term_for_positive_t_is_kl_in_bits_per_dim(generator: torch.Generator) -> None:
    t = torch.tensor([1, 2, 30, 300, 700, 900])
    diffusion, x0, noise, output, t = learned_sigma_setup(generator, t)
    losses = diffusion.training_losses(lambda x, tm, y: output, x0, t, noise)
    true, model = reference_distributions(x0, noise, output, t)
    expected_kl = kl_divergence(true, model).mean(dim=(1, 2, 3)) / math.log(2) * (T / 1000)
    torch.testing.assert_close(losses["vb"].double(), expected_kl, rtol=1e-4, atol=1e-6)
    expected_mse = ((noise - output[:, :3]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], expected_mse)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_term_at_t0_is_discretised_decoder_nll(generator: torch.Generator) -> None:
    """Ho et al. Eq. 13 with scipy's normal CDF: bins x ± 1/255, open-ended at −1 and 1."""
    zeros = torch.zeros(6, dtype=torch.long)
    diffusion, x0, noise, output, t = learned_sigma_setup(generator, zeros)
    losses = diffusion.training_losses(lambda x, tm, y: output, x0, t, noise)
    _, model = reference_distributions(x0, noise, output, t)
    mean, std, x = model.mean.numpy(), model.stddev.numpy(), x0.double().numpy()
    below_upper = stats.norm.cdf(x + 1 / 255, mean, std)
    below_lower = stats.norm.cdf(x - 1 / 255, mean, std)
    bin_mass = np.where(
        x == -1, below_upper, np.where(x == 1, 1 - below_lower, below_upper - below_lower)
    )
    expected = -np.log(bin_mass).mean(axis=(1, 2, 3)) / math.log(2) * (T / 1000)
    assert bool(torch.isfinite(losses["vb"]).all())
    np.testing.assert_allclose(losses["vb"].numpy(), expected, rtol=1e-3, atol=1e-5)


def test_vb_gradient_trains_only_the_variance_channels(generator: torch.Generator) -> None:
    t = torch.tensor([0, 1, 50, 500, 800, 999])
    diffusion, x0, noise, output, t = learned_sigma_setup(generator, t)
    leaf = output.clone().requires_grad_(True)
    losses = diffusion.training_losses(lambda x, tm, y: leaf, x0, t, noise)
    (vb_grad,) = torch.autograd.grad(losses["vb"].sum(), leaf, retain_graph=True)
    assert bool((vb_grad[:, :3] == 0).all())
    assert bool((vb_grad[:, 3:] != 0).any())
    (mse_grad,) = torch.autograd.grad(losses["mse"].sum(), leaf)
    assert bool((mse_grad[:, 3:] == 0).all())


def test_learned_sigma_and_hybrid_loss_must_agree() -> None:
    betas = make_betas("cosine", 10)
    with pytest.raises(ValueError, match="learn_sigma and hybrid_loss"):
        GaussianDiffusion(betas, target="eps", learn_sigma=True, hybrid_loss=False)
    with pytest.raises(ValueError, match="learn_sigma and hybrid_loss"):
        GaussianDiffusion(betas, target="eps", learn_sigma=False, hybrid_loss=True)


def test_wrong_output_channel_count_is_reported(generator: torch.Generator) -> None:
    diffusion, x0, noise, output, t = learned_sigma_setup(
        generator, torch.zeros(6, dtype=torch.long)
    )
    with pytest.raises(ValueError, match="expected 6"):
        diffusion.training_losses(lambda x, tm, y: output[:, :3], x0, t, noise)


def test_fixed_and_learned_variances_span_beta_tilde_to_beta() -> None:
    """Fixed Σ is "fixedlarge" (β_t, β̃_1 at t = 0); learned v = ±1 gives β_t and β̃_t."""
    diffusion = GaussianDiffusion(
        make_betas("cosine", T), target="eps", learn_sigma=True, hybrid_loss=True
    )
    betas = cosine_betas(T).numpy()
    a = alpha_bars(T)
    beta_tilde = betas[1:] * (1 - a[:-1]) / (1 - a[1:])
    t = torch.tensor([0, 1, 500, 999])
    like = torch.zeros(4, 1, 1, 1)
    expected_large = np.log([beta_tilde[0], betas[1], betas[500], betas[999]])
    expected_small = np.log([beta_tilde[0], beta_tilde[0], beta_tilde[499], beta_tilde[998]])
    fixed = diffusion.model_log_variance(None, t, like)
    upper = diffusion.model_log_variance(torch.ones_like(like), t, like)
    lower = diffusion.model_log_variance(-torch.ones_like(like), t, like)
    np.testing.assert_allclose(fixed.flatten().numpy(), expected_large, rtol=1e-6)
    np.testing.assert_allclose(upper.flatten().numpy()[1:], np.log(betas[[1, 500, 999]]), rtol=1e-6)
    np.testing.assert_allclose(lower.flatten().numpy(), expected_small, rtol=1e-6)
