"""Timestep samplers: CLTS (AAAI 2024 Eqs. 6–7) and the shifted Gaussian against scipy and
chi-square tests; the loss-second-moment importance sampler against its closed form and an
unbiasedness Monte-Carlo test."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor

from dmstab.diffusion.timesteps import (
    CLTSSampler,
    LossSecondMomentSampler,
    ShiftedGaussianSampler,
    TimestepSampler,
    UniformSampler,
)

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


# ---------------------------------------------------------------- shifted Gaussian


@pytest.mark.parametrize(
    ("iteration", "mean"), [(0, T - 1), (5_000, (T - 1 + MU) / 2), (10_000, MU), (40_000, MU)]
)
def test_shifted_gaussian_mean_moves_linearly_from_t_minus_1_to_mu(
    iteration: int, mean: float
) -> None:
    sampler = ShiftedGaussianSampler(T, MU, 300.0, target_iteration=10_000)
    assert sampler.mean(iteration) == pytest.approx(mean, rel=1e-12)
    assert sampler.metrics(iteration) == {"timesteps/mean": pytest.approx(mean, rel=1e-12)}
    gaussian = stats.norm.pdf(np.arange(T), loc=mean, scale=300.0)
    probabilities = sampler.probabilities(iteration)
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(probabilities.numpy(), gaussian / gaussian.sum(), rtol=1e-9)


def test_shifted_gaussian_samples_follow_their_distribution_without_weights() -> None:
    sampler = ShiftedGaussianSampler(T, 0.0, T / 10, target_iteration=100)
    t = draw(sampler, 50)
    assert chi_square_p_value(t, sampler.probabilities(50).numpy()) > 1e-3
    assert chi_square_p_value(t, sampler.probabilities(0).numpy()) < 1e-12


# ---------------------------------------------------------------- importance sampling

SMALL_T = 50


def loss_table(seed: int = 0) -> np.ndarray:
    """Positive per-timestep losses spanning two decades, like a diffusion loss over t."""
    rng = np.random.default_rng(seed)
    return np.asarray(np.exp(np.linspace(2.0, -2.5, SMALL_T)) * rng.uniform(0.5, 1.5, SMALL_T))


def feed_full_history(sampler: LossSecondMomentSampler, history: np.ndarray) -> None:
    """Feed history[:, h] for every timestep, h = 0, 1, … (oldest first)."""
    for column in history.T:
        sampler.update(torch.arange(SMALL_T), torch.from_numpy(column))


def expected_importance(history: np.ndarray, uniform_prob: float) -> np.ndarray:
    """improved-diffusion: p ∝ √(mean_h L²), then p·(1 − u) + u/T."""
    p = np.sqrt((history**2).mean(axis=1))
    return np.asarray(p / p.sum() * (1 - uniform_prob) + uniform_prob / SMALL_T)


def test_importance_sampler_is_uniform_with_unit_weights_until_every_history_is_full() -> None:
    sampler = LossSecondMomentSampler(SMALL_T, history=3, uniform_prob=0.001)
    rng = np.random.default_rng(1)
    history = rng.uniform(0.1, 5.0, (SMALL_T, 3))
    feed_full_history(sampler, history[:, :2])
    sampler.update(torch.arange(SMALL_T - 1), torch.from_numpy(history[:-1, 2]))
    assert not sampler.warmed_up()
    np.testing.assert_array_equal(sampler.probabilities(0).numpy(), np.full(SMALL_T, 1 / SMALL_T))
    _, weights = sampler.sample(1000, 0, torch.Generator().manual_seed(0))
    assert weights is not None and torch.equal(weights, torch.ones(1000))
    assert sampler.metrics(0) == {"timesteps/warmed_up": 0.0}
    sampler.update(torch.tensor([SMALL_T - 1]), torch.tensor([history[-1, 2]]))
    assert sampler.warmed_up()
    np.testing.assert_allclose(
        sampler.probabilities(0).numpy(), expected_importance(history, 0.001), rtol=1e-12
    )


def test_importance_history_keeps_the_last_losses_per_timestep() -> None:
    sampler = LossSecondMomentSampler(SMALL_T, history=4, uniform_prob=0.01)
    rng = np.random.default_rng(2)
    history = rng.uniform(0.1, 5.0, (SMALL_T, 7))
    feed_full_history(sampler, history)
    np.testing.assert_allclose(
        sampler.probabilities(3).numpy(), expected_importance(history[:, -4:], 0.01), rtol=1e-12
    )


def test_importance_weights_are_one_over_t_p_and_losses_are_unbiased() -> None:
    """E_p[w(t)·L(t)] = (1/T)·Σ_t L(t), within 4 standard errors; E_p[L] alone is biased."""
    sampler = LossSecondMomentSampler(SMALL_T, history=2, uniform_prob=0.001)
    losses = loss_table()
    feed_full_history(sampler, np.stack([losses, losses], axis=1))
    probabilities = sampler.probabilities(0).numpy()
    np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-12)
    t, weights = sampler.sample(NUM_SAMPLES, 0, torch.Generator().manual_seed(4))
    assert weights is not None and weights.dtype == torch.float32
    np.testing.assert_allclose(weights.numpy(), 1 / (SMALL_T * probabilities[t.numpy()]), rtol=1e-6)
    weighted = weights.double().numpy() * losses[t.numpy()]
    standard_error = weighted.std() / np.sqrt(NUM_SAMPLES)
    assert abs(weighted.mean() - losses.mean()) < 4 * standard_error
    unweighted = losses[t.numpy()]
    assert abs(unweighted.mean() - losses.mean()) > 20 * unweighted.std() / np.sqrt(NUM_SAMPLES)


def test_importance_draws_are_numpys_choice_of_the_same_uniforms() -> None:
    """improved-diffusion draws with np.random.choice(T, size, p=p), which takes the CDF
    p.cumsum() / its last entry and `cdf.searchsorted(u, side="right")` of uniforms u: the
    sampler's timesteps are exactly that for its generator's uniforms, and a timestep whose
    losses are all 0 (probability 0 without uniform mixing) is never drawn."""
    sampler = LossSecondMomentSampler(SMALL_T, history=1, uniform_prob=0.0)
    losses = loss_table()
    losses[[0, 7, 8, SMALL_T - 1]] = 0.0
    feed_full_history(sampler, losses[:, None])
    t, _ = sampler.sample(NUM_SAMPLES, 0, torch.Generator().manual_seed(5))
    uniforms = torch.rand(
        NUM_SAMPLES, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    cdf = sampler.probabilities(0).numpy().cumsum()
    cdf /= cdf[-1]
    np.testing.assert_array_equal(t.numpy(), cdf.searchsorted(uniforms.numpy(), side="right"))
    assert not np.isin(t.numpy(), [0, 7, 8, SMALL_T - 1]).any()


def test_importance_draws_follow_the_probabilities() -> None:
    """Chi-square of the drawn timesteps against P(t) once warmed up (p ∝ √E[L²], mixed)."""
    sampler = LossSecondMomentSampler(SMALL_T, history=2, uniform_prob=0.01)
    feed_full_history(sampler, np.stack([loss_table(0), loss_table(1)], axis=1))
    t, _ = sampler.sample(NUM_SAMPLES, 0, torch.Generator().manual_seed(6))
    observed = np.bincount(t.numpy(), minlength=SMALL_T)
    expected = sampler.probabilities(0).numpy() * NUM_SAMPLES
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_importance_sampler_ignores_non_finite_losses() -> None:
    sampler = LossSecondMomentSampler(SMALL_T, history=1, uniform_prob=0.0)
    sampler.update(torch.tensor([0, 1]), torch.tensor([float("nan"), float("inf")]))
    assert int(sampler.loss_counts.sum()) == 0


def test_importance_state_round_trips_and_draws_the_same_timesteps() -> None:
    sampler = LossSecondMomentSampler(SMALL_T, history=2, uniform_prob=0.001)
    feed_full_history(sampler, np.stack([loss_table(0), loss_table(1)], axis=1))
    restored = LossSecondMomentSampler(SMALL_T, history=2, uniform_prob=0.001)
    restored.load_state_dict(sampler.state_dict())
    first, first_weights = sampler.sample(64, 9, torch.Generator().manual_seed(3))
    again, again_weights = restored.sample(64, 9, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert first_weights is not None and again_weights is not None
    assert torch.equal(first_weights, again_weights)
    with pytest.raises(ValueError, match="does not fit"):
        LossSecondMomentSampler(SMALL_T, history=3).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="needs loss_history"):
        LossSecondMomentSampler(SMALL_T).load_state_dict({})


@pytest.mark.parametrize(
    "sampler",
    [UniformSampler(T), CLTSSampler(T, MU, T, 10), ShiftedGaussianSampler(T, MU, T, 10)],
)
def test_scheduled_samplers_have_no_state_and_ignore_losses(sampler: TimestepSampler) -> None:
    before = sampler.probabilities(5)
    sampler.update(torch.tensor([1, 2]), torch.tensor([10.0, 20.0]))
    assert torch.equal(sampler.probabilities(5), before)
    assert sampler.state_dict() == {}
    sampler.load_state_dict({})
    with pytest.raises(ValueError, match="has no state"):
        sampler.load_state_dict({"loss_counts": torch.zeros(T)})


def _append_one_by_one(history: Tensor, counts: Tensor, t: Tensor, losses: Tensor) -> None:
    """improved-diffusion's update, a loop over the samples: the reference for the vectorised
    one (finite losses only, each appended to its timestep's history, the oldest dropped)."""
    full = history.shape[1]
    for step, loss in zip(t.tolist(), losses.to(torch.float64).tolist(), strict=True):
        if not math.isfinite(loss):
            continue
        count = int(counts[step])
        if count == full:
            history[step] = history[step].roll(-1)
            history[step, -1] = loss
        else:
            history[step, count] = loss
            counts[step] = count + 1


@pytest.mark.parametrize(("num_timesteps", "history"), [(5, 3), (7, 1), (3, 4), (40, 10)])
def test_the_vectorised_history_update_matches_a_loop_over_samples(
    num_timesteps: int, history: int
) -> None:
    """Random batches (repeated timesteps, more repeats than the history, NaN/inf losses) and
    skipped steps (`accept` False: no change)."""
    generator = torch.Generator().manual_seed(0)
    sampler = LossSecondMomentSampler(num_timesteps, history)
    expected = torch.zeros(num_timesteps, history, dtype=torch.float64)
    counts = torch.zeros(num_timesteps, dtype=torch.long)
    for _ in range(40):
        batch = int(torch.randint(1, 3 * history + 4, (1,), generator=generator))
        t = torch.randint(0, num_timesteps, (batch,), generator=generator)
        losses = torch.randn(batch, generator=generator)
        losses[torch.rand(batch, generator=generator) < 0.1] = math.nan
        losses[torch.rand(batch, generator=generator) < 0.05] = math.inf
        accept = bool(torch.rand(1, generator=generator) < 0.8)
        sampler.update(t, losses, torch.tensor(accept))
        if accept:
            _append_one_by_one(expected, counts, t, losses)
        assert torch.equal(sampler.loss_history, expected)
        assert torch.equal(sampler.loss_counts, counts)
    assert sampler.warmed_up() == bool((counts == history).all())
