"""Power-function EMA and post-hoc reconstruction against EDM2's closed forms and test vectors."""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dmstab.analysis.ema_profiles import (
    gamma_to_sigma_rel,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    sigma_rel_to_gamma,
)
from dmstab.analysis.ema_reconstruct import (
    profile_inner_product,
    reconstruct,
    solve_coefficients,
)
from dmstab.errors import DmstabError
from dmstab.train.power_ema import PowerEMA, power_beta


class Vector(nn.Module):
    """A "model" whose only weight is one vector, plus an integer buffer."""

    updates: torch.Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size))
        self.register_buffer("updates", torch.tensor(0))


def power_profile(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
    """EDM2 Eq. 1: θ̂(t) = (γ+1)/t^(γ+1) ∫_0^t τ^γ θ(τ) dτ, so the weight density on (0, t]."""
    return np.where(tau <= t, (gamma + 1) * (tau / t) ** gamma / t, 0.0)


def integrate(values: np.ndarray, grid: np.ndarray) -> float:
    return float(np.sum((values[1:] + values[:-1]) * np.diff(grid)) / 2)


# --- σrel <-> γ and β -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma_rel", "gamma"),
    [(0.05, 16.97220), (0.10, 6.93720), (0.15, 3.55787), (0.20, 1.82621), (0.25, 0.71982)],
)
def test_sigma_rel_to_gamma_matches_facts(sigma_rel: float, gamma: float) -> None:
    assert sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, rel=1e-5)


@pytest.mark.parametrize(
    ("gamma", "sigma_rel"), [(0.0, 0.288675), (1.0, 0.235702), (5.0, 0.123718)]
)
def test_gamma_to_sigma_rel_matches_facts(gamma: float, sigma_rel: float) -> None:
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-5)


def test_sigma_rel_round_trip_and_domain() -> None:
    for sigma_rel in np.linspace(0.005, 0.2886, 60):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, 1e-12)
    for gamma in (0.0, 0.3, 2.0, 40.0, 1000.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, 1e-9, abs=1e-9)
    for bad in (0.0, -0.1, 0.2887, 0.5, float("nan")):
        with pytest.raises(DmstabError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)
    with pytest.raises(DmstabError, match="gamma"):
        gamma_to_sigma_rel(-0.5)


def test_power_beta_matches_facts_for_block_updates() -> None:
    assert power_beta(4096, sigma_rel_to_gamma(0.05), 2048) == pytest.approx(3.889e-6, rel=1e-3)
    assert power_beta(4096, sigma_rel_to_gamma(0.10), 2048) == pytest.approx(0.004080, rel=1e-3)
    assert power_beta(1, 7.0) == 0.0  # the first step replaces the initialisation
    assert power_beta(10, 2.0) == pytest.approx(0.9**3)


# --- the profile inner product ----------------------------------------------------------


def test_profile_inner_product_matches_facts() -> None:
    g05, g10 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    assert float(profile_inner_product(1, g05, 1, g05)) == pytest.approx(9.243254, rel=1e-6)
    assert float(profile_inner_product(1, g05, 2, g10)) == pytest.approx(0.0233652, rel=1e-5)


@pytest.mark.parametrize(
    ("t_a", "gamma_a", "t_b", "gamma_b"),
    [(1.0, 16.9722, 2.0, 6.9372), (3.0, 0.0, 1.5, 2.5), (2.0, 6.9372, 2.0, 3.5579), (5, 1, 4, 9)],
)
def test_profile_inner_product_equals_numeric_integral(
    t_a: float, gamma_a: float, t_b: float, gamma_b: float
) -> None:
    grid = np.linspace(0.0, min(t_a, t_b), 2_000_001)
    numeric = integrate(power_profile(grid, t_a, gamma_a) * power_profile(grid, t_b, gamma_b), grid)
    exact = float(profile_inner_product(t_a, gamma_a, t_b, gamma_b))
    assert exact == pytest.approx(numeric, rel=1e-6)
    assert float(profile_inner_product(t_b, gamma_b, t_a, gamma_a)) == pytest.approx(exact, 1e-12)


# --- PowerEMA during training -----------------------------------------------------------


def test_power_ema_weights_each_step_by_the_integrated_profile() -> None:
    steps = 300
    model = Vector(steps)  # random initial weights: they must end up with weight 0
    ema = PowerEMA(model, [0.05, 0.20])
    for step in range(1, steps + 1):
        model.weight.data = torch.nn.functional.one_hot(torch.tensor(step - 1), steps).float()
        ema.update(model, step)
    s = np.arange(1, steps + 1, dtype=np.float64)
    for index, gamma in enumerate(ema.gammas):
        # The profile (γ+1)τ^γ/t^(γ+1) integrated over step s's interval (s−1, s].
        expected = (s / steps) ** (gamma + 1) - ((s - 1) / steps) ** (gamma + 1)
        weights = ema.snapshot(index)["weight"].double().numpy()
        np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-7)
        assert weights.sum() == pytest.approx(1.0, abs=1e-5)


def test_power_ema_refuses_skipped_steps_and_resumes_exactly() -> None:
    torch.manual_seed(0)
    model = Vector(16)
    uninterrupted, first_half = PowerEMA(model, [0.05, 0.1]), PowerEMA(model, [0.05, 0.1])
    trajectory = torch.randn(40, 16).cumsum(0)
    for step in range(1, 41):
        model.weight.data.copy_(trajectory[step - 1])
        model.updates.fill_(step)
        uninterrupted.update(model, step)
        if step <= 20:
            first_half.update(model, step)
        if step == 20:
            buffer = io.BytesIO()
            torch.save(first_half.state_dict(), buffer)
            resumed = PowerEMA(Vector(16), [0.05, 0.1])
            resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        if step > 20:
            resumed.update(model, step)
    for index in range(2):
        assert torch.equal(
            resumed.snapshot(index)["weight"], uninterrupted.snapshot(index)["weight"]
        )
        assert resumed.snapshot(index)["updates"].item() == 40
    kept = uninterrupted.snapshot(0)
    uninterrupted.update(model, 41)
    assert not torch.equal(kept["weight"], uninterrupted.snapshot(0)["weight"])  # a copy
    with pytest.raises(ValueError, match="every"):
        uninterrupted.update(model, 43)
    with pytest.raises(DmstabError, match="sigma_rel"):
        PowerEMA(model, [0.05, 0.07]).load_state_dict(uninterrupted.state_dict())
    with pytest.raises(DmstabError, match="distinct"):
        PowerEMA(model, [0.05, 0.05])


# --- solving for coefficients -----------------------------------------------------------


def _two_ema_snapshots(count: int, every: int) -> list[tuple[float, float]]:
    gammas = (sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10))
    return [(k * every, g) for k in range(1, count + 1) for g in gammas]


def test_coefficients_reproduce_a_stored_profile_exactly() -> None:
    snapshots = _two_ema_snapshots(10, 100)
    coefficients, errors = solve_coefficients(snapshots, [snapshots[13]])
    assert coefficients[13, 0] == pytest.approx(1.0, abs=1e-6)
    assert np.abs(np.delete(coefficients[:, 0], 13)).max() < 1e-6
    assert errors[0] < 1e-6


def test_coefficients_use_only_earlier_snapshots_and_sum_to_one() -> None:
    snapshots = _two_ema_snapshots(10, 100)
    targets = [(1000, sigma_rel_to_gamma(0.13)), (550, sigma_rel_to_gamma(0.07))]
    coefficients, _ = solve_coefficients(snapshots, targets)
    assert coefficients.shape == (20, 2)
    np.testing.assert_allclose(coefficients.sum(axis=0), 1.0, rtol=1e-12)
    later = np.array([t > 550 for t, _ in snapshots])
    assert np.all(coefficients[later, 1] == 0) and np.any(coefficients[~later, 1] != 0)
    with pytest.raises(DmstabError, match="no snapshot"):
        solve_coefficients(snapshots, [(50, 3.0)])
    with pytest.raises(DmstabError, match="t > 0"):
        solve_coefficients([(0, 3.0)], [(50, 3.0)])


def test_profile_error_equals_numeric_residual_and_falls_with_density() -> None:
    gamma_out = sigma_rel_to_gamma(0.13)
    grid = np.linspace(0.0, 1024.0, 400_001)
    target = power_profile(grid, 1024, gamma_out)
    errors = []
    for count in (4, 8, 16, 32):
        snapshots = _two_ema_snapshots(count, 1024 // count)
        coefficients, predicted = solve_coefficients(snapshots, [(1024, gamma_out)])
        fitted = sum(
            x * power_profile(grid, t, g)
            for x, (t, g) in zip(coefficients[:, 0], snapshots, strict=True)
        )
        residual = np.sqrt(integrate((fitted - target) ** 2, grid) / integrate(target**2, grid))
        assert predicted[0] == pytest.approx(residual, rel=1e-3)
        errors.append(predicted[0])
    print("profile error for 4/8/16/32 snapshots per EMA:", errors)
    # The relative L2 error falls about as 1/n² (its square, as 1/n⁴).
    assert all(later < earlier / 3 for earlier, later in itertools.pairwise(errors))


# --- reconstruction end to end ----------------------------------------------------------


def test_reconstruct_streams_linear_combinations(tmp_path: Path) -> None:
    torch.manual_seed(1)
    stored = [{"weight": torch.randn(5), "updates": torch.tensor(k)} for k in range(3)]
    paths = [
        save_snapshot(w, 10 * (k + 1), 0.1, sigma_rel_to_gamma(0.1), tmp_path, torch.float32).path
        for k, w in enumerate(stored)
    ]
    coefficients = np.array([[0.5, 0.0, 2.0, 1.0], [0.5, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    outputs = list(reconstruct(paths, coefficients, batch=3))
    assert len(outputs) == 4
    for j, output in enumerate(outputs):
        expected = sum(coefficients[k, j] * stored[k]["weight"] for k in range(3))
        torch.testing.assert_close(output["weight"], expected)
    assert outputs[0]["updates"].item() == 1 and outputs[3]["updates"].item() == 2
    with pytest.raises(ValueError, match="nonzero"):
        next(reconstruct(paths, np.zeros((3, 1)), batch=1))
    save_snapshot(
        {"other": torch.zeros(5)}, 40, 0.1, sigma_rel_to_gamma(0.1), tmp_path, torch.float32
    )
    with pytest.raises(DmstabError, match="other tensors"):
        list(reconstruct([paths[0], tmp_path / "phema-0000000040-0.1000.pt"], np.ones((2, 1)), 1))


def test_reconstructed_ema_matches_directly_tracked_one(tmp_path: Path) -> None:
    steps, size, every = 4096, 256, 64
    generator = torch.Generator().manual_seed(0)
    trajectory = torch.randn(steps, size, generator=generator, dtype=torch.float64).cumsum(0)
    model = Vector(size)
    tracked, direct = PowerEMA(model, [0.05, 0.10]), PowerEMA(model, [0.13])
    for step in range(1, steps + 1):
        model.weight.data.copy_(trajectory[step - 1])
        tracked.update(model, step)
        direct.update(model, step)
        if step % every == 0:
            tracked.save_snapshots(tmp_path, torch.float32)
    wanted = direct.snapshot(0)["weight"].double()
    nearest_stored = (tracked.snapshot(1)["weight"].double() - wanted).norm()
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 2 * steps // every
    report = []
    for spacing in (1024, 512, 256, 128, 64):
        chosen = [info for info in snapshots if info.step % spacing == 0]
        profiles = [(info.step, info.gamma) for info in chosen]
        coefficients, profile_error = solve_coefficients(profiles, [(steps, direct.gammas[0])])
        [rebuilt] = reconstruct([info.path for info in chosen], coefficients, batch=1)
        error = float((rebuilt["weight"].double() - wanted).norm() / nearest_stored)
        report.append((len(chosen) // 2, error, float(profile_error[0])))
    print("snapshots per EMA, error / distance to stored 0.10 EMA, profile error:", report)
    errors = [error for _, error, _ in report]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 0.01


# --- snapshot files ---------------------------------------------------------------------


def test_snapshot_files_round_trip_atomically(tmp_path: Path) -> None:
    gamma = sigma_rel_to_gamma(0.05)
    weights = {"weight": torch.randn(8), "updates": torch.tensor(3)}
    info = save_snapshot(weights, 128, 0.05, gamma, tmp_path, torch.float16)
    inode = os.stat(info.path).st_ino
    info = save_snapshot(weights, 128, 0.05, gamma, tmp_path, torch.float16)
    assert os.stat(info.path).st_ino != inode  # written beside, then renamed over
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "phema-0000000128-0.0500.json",
        "phema-0000000128-0.0500.pt",
    ]
    raw = torch.load(info.path, weights_only=True)
    assert (raw["step"], raw["sigma_rel"], raw["gamma"]) == (128, 0.05, gamma)
    assert raw["model"]["weight"].dtype == torch.float16
    assert raw["model"]["updates"].dtype == torch.int64
    assert json.loads(info.path.with_suffix(".json").read_text())["step"] == 128
    loaded, loaded_info = load_snapshot(info.path)
    assert loaded_info == info
    torch.testing.assert_close(loaded["weight"], weights["weight"].half())
    save_snapshot(weights, 64, 0.10, sigma_rel_to_gamma(0.1), tmp_path, torch.float32)
    save_snapshot(weights, 64, 0.05, gamma, tmp_path, torch.float32)
    listed = [(i.step, i.sigma_rel, i.dtype) for i in list_snapshots(tmp_path)]
    assert listed == [(64, 0.05, "float32"), (64, 0.10, "float32"), (128, 0.05, "float16")]
    with pytest.raises(DmstabError, match="dtype"):
        save_snapshot(weights, 1, 0.05, gamma, tmp_path, torch.bfloat16)


def test_corrupt_snapshots_are_user_errors(tmp_path: Path) -> None:
    gamma = sigma_rel_to_gamma(0.1)
    info = save_snapshot({"weight": torch.randn(64)}, 7, 0.1, gamma, tmp_path, torch.float32)
    info.path.write_bytes(info.path.read_bytes()[:100])
    with pytest.raises(DmstabError, match="corrupt"):
        load_snapshot(info.path)
    info.path.with_suffix(".json").write_text("{not json")
    with pytest.raises(DmstabError, match="corrupt"):
        list_snapshots(tmp_path)
    info.path.with_suffix(".json").write_text(json.dumps({"step": "7"}))
    with pytest.raises(DmstabError, match="not a power-EMA snapshot"):
        list_snapshots(tmp_path)
    with pytest.raises(DmstabError, match="not found"):
        list_snapshots(tmp_path / "absent")
