"""EDM preconditioning, the EDM2 loss, the Heun sampler with guidance, and EDM2's LR schedule.

Checked against published test vectors (EDM, EDM2), hand computations, exact denoisers of toy
datasets (a single point, a Gaussian) and the ODE's closed-form solution.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dmstab.diffusion.edm import (
    Denoiser,
    EDMPrecond,
    edm2_loss,
    loss_weight,
    precond_coefficients,
    sample_sigmas,
)
from dmstab.diffusion.edm_sampling import Churn, SigmaSchedule, heun, karras_sigmas
from dmstab.diffusion.sampling import NoiseSource, guided, unconditional, with_labels
from dmstab.errors import DmstabError
from dmstab.train.lr_schedules import edm2_learning_rate

SHAPE = (3, 4, 4)
# EDM's stochastic settings for ImageNet-64 (Karras et al. 2022 Table 5).
CHURN = Churn(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)


class RecordingNet(nn.Module):
    """A raw network F = 2·tanh(input) + c_noise that records what it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        self.calls.append((x.clone(), c_noise.clone(), labels))
        return 2 * torch.tanh(x) + c_noise.reshape(-1, 1, 1, 1)


class AffineUncertainty(nn.Module):
    """u = a·c_noise + b, standing in for EDM2's Fourier-feature uncertainty head."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.a * c_noise + self.b


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations (NFE)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        self.calls += 1
        return self.denoiser(x, sigma, labels)


def point_oracle(point: Tensor) -> CountingDenoiser:
    """The optimal denoiser of the one-point dataset {point}: D(x, σ) = point for every σ."""
    return CountingDenoiser(lambda x, sigma, labels: point.expand_as(x).clone())


def gaussian_oracle(std: float) -> CountingDenoiser:
    """The optimal denoiser of N(0, s²) data: E[y | y + σn = x] = x·s²/(s² + σ²)."""
    return CountingDenoiser(
        lambda x, sigma, labels: x * std**2 / (std**2 + sigma.reshape(-1, 1, 1, 1) ** 2)
    )


def smooth_denoiser(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
    """A nonlinear per-pixel denoiser (no batch mixing), to make sample comparisons meaningful."""
    return 0.8 * torch.tanh(x / (1 + sigma.reshape(-1, 1, 1, 1)))


# --- preconditioning -------------------------------------------------------------------


def test_precond_coefficients_match_facts_at_sigma_one() -> None:
    c = precond_coefficients(torch.tensor(1.0, dtype=torch.float64))
    assert c.c_skip.item() == pytest.approx(0.2, rel=1e-6)
    assert c.c_out.item() == pytest.approx(0.447214, rel=1e-5)
    assert c.c_in.item() == pytest.approx(0.894427, rel=1e-5)
    assert c.c_noise.item() == 0.0


@pytest.mark.parametrize("sigma", [0.002, 0.5, 3.0, 80.0])
def test_precond_coefficients_closed_forms(sigma: float) -> None:
    c = precond_coefficients(torch.tensor(sigma, dtype=torch.float64))
    total = sigma**2 + 0.25
    assert c.c_skip.item() == pytest.approx(0.25 / total, rel=1e-12)
    assert c.c_out.item() == pytest.approx(sigma * 0.5 / math.sqrt(total), rel=1e-12)
    assert c.c_in.item() == pytest.approx(1 / math.sqrt(total), rel=1e-12)
    assert c.c_noise.item() == pytest.approx(math.log(sigma) / 4, abs=1e-12)
    # EDM's design: unit-variance network input and target (Karras et al. 2022 App. B.6).
    assert c.c_in.item() ** 2 * total == pytest.approx(1.0, rel=1e-12)
    # λ(σ) = 1/c_out²: the effective weight of F's regression target is 1 everywhere.
    assert loss_weight(torch.tensor(sigma, dtype=torch.float64)).item() == pytest.approx(
        1 / c.c_out.item() ** 2, rel=1e-12
    )


def test_precond_wraps_the_raw_network() -> None:
    net = RecordingNet()
    precond = EDMPrecond(net)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    labels = torch.eye(2)
    sigma = torch.tensor([1.0, 2.0])
    out = precond(x, sigma, labels)
    net_input, c_noise, seen_labels = net.calls[-1]
    for i, s in enumerate([1.0, 2.0]):
        total = s**2 + 0.25
        expected_input = x[i] / math.sqrt(total)
        torch.testing.assert_close(net_input[i], expected_input)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4)
        raw = 2 * torch.tanh(expected_input) + math.log(s) / 4
        expected = 0.25 / total * x[i] + s * 0.5 / math.sqrt(total) * raw
        torch.testing.assert_close(out[i], expected)
    assert seen_labels is labels
    # A single number is one σ for the whole batch.
    torch.testing.assert_close(precond(x, 2.0, labels)[1], out[1])


def test_precond_logvar_passes_c_noise_to_the_uncertainty_module() -> None:
    precond = EDMPrecond(RecordingNet(), uncertainty=AffineUncertainty(0.7, -0.3))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    expected = torch.tensor([0.7 * math.log(s) / 4 - 0.3 for s in [0.1, 1.0, 5.0]])
    torch.testing.assert_close(precond.logvar(sigma), expected)
    assert {name for name, _ in precond.named_parameters()} == {"uncertainty.a", "uncertainty.b"}
    with pytest.raises(ValueError, match="no uncertainty module"):
        EDMPrecond(RecordingNet()).logvar(sigma)


# --- training noise levels and loss ------------------------------------------------------


@pytest.mark.parametrize(("p_mean", "p_std"), [(-0.4, 1.0), (-0.8, 1.6)])
def test_log_sigma_is_normal_with_the_recipe_moments(p_mean: float, p_std: float) -> None:
    n = 20_000
    sigma = sample_sigmas(n, p_mean, p_std, torch.Generator().manual_seed(1))
    assert sigma.shape == (n,) and bool((sigma > 0).all())
    log_sigma = sigma.double().log()
    # Four standard errors: the mean's is P_std/√n, the standard deviation's P_std/√(2n).
    assert abs(log_sigma.mean().item() - p_mean) < 4 * p_std / math.sqrt(n)
    assert abs(log_sigma.std().item() - p_std) < 4 * p_std / math.sqrt(2 * n)


def test_sample_sigmas_rejects_a_non_positive_std() -> None:
    with pytest.raises(DmstabError, match="P_std"):
        sample_sigmas(4, -0.4, 0.0)


def _hand_loss(
    x: np.ndarray, sigma: np.ndarray, noise: np.ndarray, logvar: np.ndarray | None
) -> list[float]:
    """EDM2 Eq. 21 per sample, in float64 loops, for the denoiser D(x_noisy) = 0.5·x_noisy."""
    losses = []
    for i in range(x.shape[0]):
        s = float(sigma[i])
        weight = (s**2 + 0.5**2) / (s * 0.5) ** 2
        denoised = 0.5 * (x[i] + s * noise[i])
        squared_error = float(np.mean((denoised - x[i]) ** 2))
        if logvar is None:
            losses.append(weight * squared_error)
        else:
            u = float(logvar[i])
            losses.append(weight / math.exp(u) * squared_error + u)
    return losses


@pytest.mark.parametrize("with_logvar", [False, True])
def test_edm2_loss_equals_hand_computation(with_logvar: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, *SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, *SHAPE, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    logvar = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64) if with_logvar else None
    calls: list[Tensor] = []

    def half(x_noisy: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        calls.append(s)
        return 0.5 * x_noisy

    loss = edm2_loss(half, x, sigma, noise, logvar=logvar)
    expected = _hand_loss(
        x.numpy(), sigma.numpy(), noise.numpy(), None if logvar is None else logvar.numpy()
    )
    assert loss.shape == (3,)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(calls[0], sigma.float())


def test_learned_uncertainty_is_optimal_at_the_log_of_the_weighted_error() -> None:
    # d/du [(λ/e^u)·L + u] = 0 ⇔ u = ln(λ·L): the uncertainty tracks the raw loss (EDM2 B.2).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, *SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, *SHAPE, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.3, 4.0], dtype=torch.float64)

    def half(x_noisy: Tensor, s: Tensor, labels: Tensor | None) -> Tensor:
        return 0.5 * x_noisy

    plain = edm2_loss(half, x, sigma, noise)
    u = plain.log().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(edm2_loss(half, x, sigma, noise, logvar=u).sum(), u)
    torch.testing.assert_close(grad, torch.zeros(2, dtype=torch.float64))


# --- noise-level schedule ----------------------------------------------------------------


def test_karras_sigmas_match_facts() -> None:
    sigmas = karras_sigmas(32)
    assert sigmas.shape == (33,) and sigmas.dtype == torch.float64
    np.testing.assert_allclose(sigmas[:4].numpy(), [80.0, 66.93087, 55.73621, 46.18639], rtol=1e-6)
    assert sigmas[31].item() == pytest.approx(0.002, rel=1e-12)
    assert sigmas[32].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # EDM Eq. 5: σ^(1/ρ) is evenly spaced between σmax^(1/ρ) and σmin^(1/ρ).
    roots = sigmas[:32] ** (1 / 7)
    np.testing.assert_allclose(np.diff(roots.numpy()), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 31)


def test_karras_sigmas_reject_bad_settings() -> None:
    with pytest.raises(DmstabError, match="at least 2"):
        karras_sigmas(1)
    with pytest.raises(DmstabError, match="0 < min < max"):
        karras_sigmas(10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(DmstabError, match="rho"):
        karras_sigmas(10, rho=0.0)


# --- Heun sampler ------------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [False, True])
def test_heun_returns_the_single_training_point(stochastic: bool) -> None:
    point = torch.linspace(-0.9, 0.9, math.prod(SHAPE)).reshape(SHAPE)
    out = heun(
        with_labels(point_oracle(point), None),
        NoiseSource(0, 0, 4, SHAPE),
        SigmaSchedule(karras_sigmas(32), CHURN if stochastic else None),
    )
    torch.testing.assert_close(out, point.expand(4, *SHAPE), atol=1e-4, rtol=0)


def test_heun_uses_63_evaluations_for_32_steps() -> None:
    oracle = gaussian_oracle(0.5)
    steps: list[tuple[int, int]] = []
    heun(
        with_labels(oracle, None),
        NoiseSource(0, 0, 2, SHAPE),
        SigmaSchedule(karras_sigmas(32)),
        callback=lambda done, total: steps.append((done, total)),
    )
    assert oracle.calls == 63
    assert steps == [(i, 32) for i in range(1, 33)]


def test_deterministic_heun_keeps_the_variance_of_gaussian_data() -> None:
    std = 0.5
    out = heun(
        with_labels(gaussian_oracle(std), None),
        NoiseSource(0, 0, 128, (3, 8, 8)),
        SigmaSchedule(karras_sigmas(32)),
    )
    # ~0.9 % Monte Carlo error on 24 576 values plus ~3 % discretisation error at 32 steps.
    assert out.var().item() == pytest.approx(std**2, rel=0.06)
    assert abs(out.mean().item()) < 4 * std / math.sqrt(out.numel())


def test_heun_converges_to_the_ode_solution_at_second_order() -> None:
    # For N(0, s²) data the ODE solution is x(σ) = x_T·√(s²+σ²)/√(s²+σ_max²).
    std = 0.5
    exact_gain = std / math.sqrt(std**2 + 80.0**2)
    errors = []
    for steps in (16, 32, 64, 128):
        x_t = NoiseSource(5, 0, 1, (1, 1, 1)).next() * 80.0
        out = heun(
            with_labels(gaussian_oracle(std), None),
            NoiseSource(5, 0, 1, (1, 1, 1)),
            SigmaSchedule(karras_sigmas(steps)),
        )
        errors.append(abs((out / x_t).item() / exact_gain - 1))
    ratios = [coarse / fine for coarse, fine in itertools.pairwise(errors)]
    assert errors[-1] < 2e-3
    assert all(3.0 < r < 5.5 for r in ratios), ratios  # 2nd order: 4× per halved step


def test_stochastic_heun_keeps_the_variance_of_gaussian_data() -> None:
    std = 0.5
    out = heun(
        with_labels(gaussian_oracle(std), None),
        NoiseSource(1, 0, 128, (3, 8, 8)),
        SigmaSchedule(karras_sigmas(128), CHURN),
    )
    assert out.var().item() == pytest.approx(std**2, rel=0.05)


def test_churn_gamma_follows_edm_algorithm_2() -> None:
    assert CHURN.gamma(10.0, 32) == pytest.approx(math.sqrt(2) - 1)  # capped at √2 − 1
    gentle = Churn(s_churn=8.0, s_min=0.05, s_max=50.0)
    assert gentle.gamma(10.0, 32) == pytest.approx(0.25)
    assert gentle.gamma(60.0, 32) == 0.0
    assert gentle.gamma(0.01, 32) == 0.0
    assert Churn(s_churn=0.0).gamma(10.0, 32) == 0.0


@pytest.mark.parametrize("churn", [None, CHURN])
def test_fixed_noise_gives_identical_samples(churn: Churn | None) -> None:
    schedule, denoise = SigmaSchedule(karras_sigmas(8), churn), with_labels(smooth_denoiser, None)
    first = heun(denoise, NoiseSource(7, 0, 4, SHAPE), schedule)
    again = heun(denoise, NoiseSource(7, 0, 4, SHAPE), schedule)
    other = heun(denoise, NoiseSource(8, 0, 4, SHAPE), schedule)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)
    # Image i's noise depends on (seed, i) only, so splitting the batch changes nothing.
    halves = [heun(denoise, NoiseSource(7, start, 2, SHAPE), schedule) for start in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), first, atol=1e-6, rtol=0)


def test_churn_changes_the_samples() -> None:
    sigmas, denoise = karras_sigmas(8), with_labels(smooth_denoiser, None)
    plain = heun(denoise, NoiseSource(7, 0, 4, SHAPE), SigmaSchedule(sigmas))
    churned = heun(denoise, NoiseSource(7, 0, 4, SHAPE), SigmaSchedule(sigmas, CHURN))
    assert not torch.allclose(plain, churned)


def test_heun_rejects_bad_schedules_and_settings() -> None:
    noise, denoise = NoiseSource(0, 0, 1, SHAPE), with_labels(smooth_denoiser, None)
    with pytest.raises(DmstabError, match="decrease"):
        heun(denoise, noise, SigmaSchedule(torch.tensor([1.0, 2.0, 0.0])))
    with pytest.raises(DmstabError, match="noise levels > 0"):
        heun(denoise, noise, SigmaSchedule(torch.tensor([1.0, 0.0, 0.0])))
    with pytest.raises(DmstabError, match="s_churn"):
        Churn(s_churn=-1.0)
    with pytest.raises(DmstabError, match="s_min <= s_max"):
        Churn(s_churn=1.0, s_min=2.0, s_max=1.0)


# --- guidance ----------------------------------------------------------------------------


def test_guidance_one_equals_no_guidance_and_skips_the_guide() -> None:
    def failing_guide(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        raise AssertionError("the guide must not run at guidance 1")

    schedule, denoise = SigmaSchedule(karras_sigmas(8)), with_labels(smooth_denoiser, None)
    plain = heun(denoise, NoiseSource(3, 0, 2, SHAPE), schedule)
    with_guide = heun(
        guided(denoise, with_labels(failing_guide, None), 1.0),
        NoiseSource(3, 0, 2, SHAPE),
        schedule,
    )
    torch.testing.assert_close(with_guide, plain, atol=0, rtol=0)


def test_identical_main_and_guide_equal_either() -> None:
    schedule, denoise = SigmaSchedule(karras_sigmas(8)), with_labels(smooth_denoiser, None)
    plain = heun(denoise, NoiseSource(3, 0, 2, SHAPE), schedule)
    guided_out = heun(guided(denoise, denoise, 2.5), NoiseSource(3, 0, 2, SHAPE), schedule)
    torch.testing.assert_close(guided_out, plain, atol=1e-6, rtol=0)


def test_autoguidance_extrapolates_from_the_guide() -> None:
    # Main and guide are oracles of different points a, b: the guided ODE ends at
    # D_w = b + w·(a − b), and each model is evaluated 63 times for 32 steps.
    a = torch.full(SHAPE, 0.4)
    b = torch.full(SHAPE, 0.1)
    main, guide = point_oracle(a), point_oracle(b)
    out = heun(
        guided(with_labels(main, None), with_labels(guide, None), 2.0),
        NoiseSource(0, 0, 2, SHAPE),
        SigmaSchedule(karras_sigmas(32)),
    )
    torch.testing.assert_close(out, torch.full((2, *SHAPE), 0.7), atol=1e-4, rtol=0)
    assert main.calls == guide.calls == 63


def test_classifier_free_guidance_drops_the_labels_for_the_guide() -> None:
    seen: list[Tensor | None] = []

    def labelled(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        seen.append(labels)
        level = torch.zeros(x.shape[0]) if labels is None else labels.float()
        return level.reshape(-1, 1, 1, 1).expand_as(x)

    labels = torch.tensor([0.25, -0.5])
    denoise = guided(
        with_labels(labelled, labels), with_labels(unconditional(labelled), labels), 3.0
    )
    out = denoise(torch.zeros(2, *SHAPE), torch.ones(2))
    torch.testing.assert_close(out[:, 0, 0, 0], 3.0 * labels)
    assert seen[0] is labels and seen[1] is None


def test_guidance_without_a_guide_is_refused() -> None:
    with pytest.raises(DmstabError, match="no guide"):
        heun(
            guided(with_labels(smooth_denoiser, None), None, 2.0),
            NoiseSource(0, 0, 1, SHAPE),
            SigmaSchedule(karras_sigmas(4)),
        )


# --- learning rate -----------------------------------------------------------------------

# EDM2-S at 512²: α_ref 0.010, t_ref 70k batches of 2048 images, 10M images of warm-up.
REF_LR, REF_IMAGES, RAMPUP = 0.010, 70_000 * 2048, 10_000_000


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (0, 0.0),
        (2_500_000, REF_LR / 4),  # warm-up, before t_ref
        (10_000_000, REF_LR),  # end of warm-up
        (REF_IMAGES, REF_LR),  # t_ref: decay starts
        (4 * REF_IMAGES, REF_LR / 2),
        (100 * REF_IMAGES, REF_LR / 10),
    ],
)
def test_edm2_learning_rate_against_the_formula(images: int, expected: float) -> None:
    assert edm2_learning_rate(images, REF_LR, REF_IMAGES, RAMPUP) == pytest.approx(
        expected, rel=1e-12, abs=1e-15
    )


def test_warm_up_and_decay_multiply_when_they_overlap() -> None:
    # t = 8M images with t_ref = 2M and a 10M warm-up: (0.01/√4)·0.8.
    assert edm2_learning_rate(8_000_000, 0.01, 2_000_000, 10_000_000) == pytest.approx(0.004)
    # Zero switches a factor off.
    assert edm2_learning_rate(8_000_000, 0.01, 0, 10_000_000) == pytest.approx(0.008)
    assert edm2_learning_rate(8_000_000, 0.01, 2_000_000, 0) == pytest.approx(0.005)


def test_edm2_learning_rate_rejects_bad_values() -> None:
    with pytest.raises(DmstabError, match="must all be >= 0"):
        edm2_learning_rate(-1, 0.01, 100, 10)
    with pytest.raises(DmstabError, match="ref_lr"):
        edm2_learning_rate(5, 0.0, 100, 10)
