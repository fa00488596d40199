"""Timestep samplers: CLTS (AAAI 2024 Eqs. 6–7) against scipy and chi-square tests."""

import numpy as np
import pytest
import torch
from scipy import stats

from dmstab.diffusion.timesteps import CLTSSampler, TimestepSampler, UniformSampler

T = 4000
MU = 1200
NUM_SAMPLES = 200_000
NUM_BINS = 20


def binned(values: np.ndarray) -> np.ndarray:
    """Sum a (T,) array over NUM_BINS equal bins of timesteps."""
    return np.asarray(values.reshape(NUM_BINS, T // NUM_BINS).sum(axis=1), dtype=np.float64)


def histogram(t: torch.Tensor) -> np.ndarray:
    return binned(np.bincount(t.numpy(), minlength=T).astype(np.float64))


def chi_square_p_value(t: torch.Tensor, probabilities: np.ndarray) -> float:
    expected = binned(probabilities) * t.numel()
    return float(stats.chisquare(histogram(t), expected).pvalue)


def draw(sampler: TimestepSampler, iteration: int, seed: int = 0) -> torch.Tensor:
    t, weights = sampler.sample(NUM_SAMPLES, iteration, torch.Generator().manual_seed(seed))
    assert weights is None
    assert t.dtype == torch.int64 and t.shape == (NUM_SAMPLES,)
    assert int(t.min()) >= 0 and int(t.max()) < T
    return t


def expected_clts(sigma: float, gamma: float) -> np.ndarray:
    """Eq. 7 with Eq. 6's density from scipy, renormalised over {0, …, T−1}."""
    gaussian = stats.norm.pdf(np.arange(T), loc=MU, scale=sigma)
    return np.asarray((1 - gamma) / T + gamma * gaussian / gaussian.sum(), dtype=np.float64)


def test_gamma_ramps_linearly_then_holds() -> None:
    sampler = CLTSSampler(T, MU, T, target_iteration=10_000)
    gammas = [sampler.metrics(i)["timesteps/gamma"] for i in (0, 5_000, 10_000, 50_000)]
    assert gammas == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("iteration", [0, 2_500, 5_000, 7_000])
def test_clts_probabilities_follow_eq7(iteration: int) -> None:
    sampler = CLTSSampler(T, MU, 200.0, target_iteration=5_000)
    probabilities = sampler.probabilities(iteration)
    assert probabilities.dtype == torch.float64 and probabilities.shape == (T,)
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-12)
    gamma = min(iteration / 5_000, 1.0)
    np.testing.assert_allclose(probabilities.numpy(), expected_clts(200.0, gamma), rtol=1e-10)


@pytest.mark.parametrize("iteration", [0, 5_000, 10_000])
def test_clts_samples_pass_chi_square_at_paper_sigma(iteration: int) -> None:
    sampler = CLTSSampler(T, MU, sigma=T, target_iteration=10_000)
    t = draw(sampler, iteration)
    probabilities = expected_clts(T, iteration / 10_000)
    assert chi_square_p_value(t, probabilities) > 1e-3


def test_chi_square_discriminates_at_paper_sigma() -> None:
    """Even σ = T is far enough from uniform for 200k samples to tell them apart."""
    uniform = draw(UniformSampler(T), 0)
    assert chi_square_p_value(uniform, expected_clts(T, 1.0)) < 1e-12


def test_sharp_clts_passes_and_uniform_fails_the_same_test() -> None:
    sharp = CLTSSampler(T, MU, sigma=T / 20, target_iteration=100)
    probabilities = expected_clts(T / 20, 1.0)
    assert chi_square_p_value(draw(sharp, 100), probabilities) > 1e-3
    assert chi_square_p_value(draw(UniformSampler(T), 0), probabilities) < 1e-12


def test_uniform_sampler_is_uniform() -> None:
    sampler = UniformSampler(T)
    np.testing.assert_allclose(sampler.probabilities(3).numpy(), np.full(T, 1 / T))
    assert chi_square_p_value(draw(sampler, 0), np.full(T, 1 / T)) > 1e-3
    assert sampler.metrics(0) == {}


@pytest.mark.parametrize("sampler", [CLTSSampler(T, MU, T, 10), UniformSampler(T)])
def test_sampling_is_deterministic_for_a_generator_state(sampler: TimestepSampler) -> None:
    first, _ = sampler.sample(64, 5, torch.Generator().manual_seed(7))
    again, _ = sampler.sample(64, 5, torch.Generator().manual_seed(7))
    other, _ = sampler.sample(64, 5, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    ("mu", "sigma", "target_iteration", "message"),
    [
        (-1.0, 10.0, 10, "mu must lie in"),
        (float(T), 10.0, 10, "mu must lie in"),
        (10.0, 0.0, 10, "sigma must be positive"),
        (10.0, 10.0, 0, "target_iteration must be positive"),
    ],
)
def test_clts_rejects_bad_hyperparameters(
    mu: float, sigma: float, target_iteration: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CLTSSampler(T, mu, sigma, target_iteration)


def test_negative_iteration_is_rejected() -> None:
    with pytest.raises(ValueError, match="iteration must be non-negative"):
        CLTSSampler(T, MU, T, 10).probabilities(-1)
