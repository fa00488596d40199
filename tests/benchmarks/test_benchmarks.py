"""Every side-by-side benchmark at toy size, so that none rots: it runs, both sides are timed,
the JSON record is complete, and the sides agree where the benchmark checks that they do."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch import nn

from benchmarks.ema_reconstruct import RECIPES
from benchmarks.harness import Comparison
from benchmarks.hessian import (
    TOLERANCE,
    converged_lambda1,
    first_stop,
    lanczos_top_eigenvalue,
    power_iteration,
    relative_change_below,
    relative_error,
    within,
)
from benchmarks.run import BENCHMARKS, run_benchmark, table, write_results
from benchmarks.sampling import TOLERANCE as SAMPLING_TOLERANCE
from dmstab.config import load_recipe
from dmstab.models import build_model


@functools.cache
def at_toy_size(name: str) -> tuple[Comparison, ...]:
    """Each benchmark run once at toy size for all the tests that read it."""
    return tuple(run_benchmark(name, "toy", torch.device("cpu")))


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_at_toy_size(name: str, tmp_path) -> None:
    comparisons = list(at_toy_size(name))
    assert comparisons
    path = write_results(name, comparisons, tmp_path, seconds=1.0)
    record = json.loads(path.read_text())
    assert record["environment"]["torch"] == torch.__version__
    for comparison in record["comparisons"]:
        names = [side["name"] for side in comparison["sides"]]
        assert comparison["subject"] in names and comparison["baseline"] in names
        for side in comparison["sides"]:
            assert side["seconds"] and all(s > 0 for s in side["seconds"])
            assert side["min_s"] <= side["median_s"] <= side["max_s"]
        assert math.isfinite(comparison["ratio"]) and comparison["ratio"] > 0
    table(comparisons)  # renders


def test_frechet_sides_agree_at_toy_size() -> None:
    """Both routes compute the same distance (the benchmark reports their difference)."""
    (comparison,) = at_toy_size("frechet")
    assert comparison.checks["relative_difference"] < 1e-6


class _Quadratic(nn.Module):
    """½ θᵀAθ: its Hessian is A wherever θ is."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = matrix
        self.theta = nn.Parameter(torch.ones(len(matrix), dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.matrix @ self.theta


def test_power_iteration_and_lanczos_reach_a_known_top_eigenvalue_within_tolerance() -> None:
    """On a Hessian with a known spectrum (−7 is the largest in magnitude, ahead of 5; PyHessian's
    iteration takes magnitudes, as top_eigenpairs), the benchmark's converged λ1 is −7 and is
    confirmed by the long power iteration; the oracle stops the power iteration at the first step
    within the tolerance, and Lanczos's own rule ends within it too, in fewer products."""
    spectrum = torch.tensor([-7.0, 5.0, 3.0, 1.0, 0.5, -0.25, 0.1, 0.0], dtype=torch.float64)
    rotation, _ = torch.linalg.qr(
        torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    model = _Quadratic(rotation @ torch.diag(spectrum) @ rotation.T)
    start = torch.ones(8, dtype=torch.float64) / math.sqrt(8)
    converged = converged_lambda1(model, _value, start, products=500)
    assert converged.value == pytest.approx(-7.0, rel=1e-9) and converged.confirmed
    oracle = power_iteration(
        model, _value, start, iterations=500, stop=within(converged.value, TOLERANCE)
    )
    assert relative_error(oracle[-1].eigenvalue, -7.0) <= TOLERANCE
    assert all(relative_error(step.eigenvalue, -7.0) > TOLERANCE for step in oracle[:-1])
    own = first_stop(converged.check, relative_change_below(TOLERANCE))
    assert own is not None and own < len(converged.check)
    lanczos, products = lanczos_top_eigenvalue(
        model, _value, "double_backward", iterations=8, tol=TOLERANCE
    )
    assert relative_error(lanczos, -7.0) <= TOLERANCE and products < len(oracle)


def _value(model: nn.Module) -> torch.Tensor:
    value: torch.Tensor = model()
    return value


def test_hessian_sides_report_their_eigenvalues_products_and_errors() -> None:
    for comparison in at_toy_size("hessian"):
        checks = comparison.checks
        assert 0 < checks["dmstab_products"] <= 4 and 0 < checks["reference_products"] <= 4
        assert math.isfinite(checks["dmstab_lambda1"]) and checks["dmstab_lambda1"] != 0
        for error in ("dmstab_relative_error", "reference_relative_error"):
            assert math.isfinite(checks[error]) and checks[error] >= 0
        assert 0 < checks["check_power_products"] <= 12


def test_landscape_sides_compute_identical_values() -> None:
    """dmstab's in-place moves and the reference's rebuilt weights, reloaded batch and redrawn
    noise give the same loss at every grid point, bit for bit."""
    for comparison in at_toy_size("landscape"):
        assert comparison.checks["identical"] and comparison.checks["max_abs_difference"] == 0.0


def test_fid_pipelines_agree_and_resizes_match() -> None:
    pipelines, resize = at_toy_size("fid")
    assert pipelines.checks["relative_difference"] < 1e-3
    assert pipelines.checks["dmstab"] > 0
    assert resize.checks["max_abs_difference"] <= 1e-3


def test_train_step_bare_loop_minimises_dmstabs_objective() -> None:
    """The hand-written loss equals dmstab's objective on the same draws, so the bare loop
    times the same work; both sides timed the same number of steps."""
    (comparison,) = at_toy_size("train_step")
    assert comparison.checks["bare_loss_relative_difference"] < 1e-6
    dmstab, bare = comparison.sides
    assert len(dmstab.seconds) == len(bare.seconds) == 4


def test_sampling_bare_loops_equal_dmstabs_samplers() -> None:
    """DDPM, DDIM and Heun written out by hand give dmstab's samples from the same noise."""
    comparisons = at_toy_size("sampling")
    assert [c.config["sampler"] for c in comparisons] == ["ddpm", "ddim", "heun"]
    for comparison in comparisons:
        assert comparison.checks["relative_difference"] <= SAMPLING_TOLERANCE


def test_ema_reconstruct_streams_within_batch_plus_two_models() -> None:
    """The streamed reconstruction equals the one from all snapshots loaded at once, and its
    peak memory stays within (batch + 2) float32 models of the network, counted here from its
    parameters; loading everything at once exceeds that bound, so the measurement can see it."""
    (comparison,) = at_toy_size("ema_reconstruct")
    config, checks = comparison.config, comparison.checks
    recipe = load_recipe(RECIPES / config["recipe"], config["overrides"])
    network = build_model(recipe, 10)
    one_model = 4 * sum(value.numel() for value in network.state_dict().values())
    bound = (config["batch"] + 2) * one_model
    assert checks["relative_difference"] <= 1e-6
    assert checks["dmstab_peak_models"] * config["model_bytes"] <= bound
    assert checks["all_at_once_peak_models"] * config["model_bytes"] > bound
    assert config["snapshots"] > config["batch"] + 2


def test_mlflow_cost_logs_the_loops_metric_set() -> None:
    """The logging side sends what a quickstart window logs, under the loop's MLflow names."""
    (comparison,) = at_toy_size("mlflow")
    names = comparison.checks["metric_names"]
    assert {"train/loss", "train/grad_norm", "system/images_per_s", "timesteps/gamma"} <= set(names)


def test_report_tabulates_written_results_in_markdown(tmp_path) -> None:
    """The Markdown table for docs/performance.md: one row per comparison, with its ratio, from
    the JSON files `benchmarks.run` writes."""
    from benchmarks.report import markdown

    comparisons = list(at_toy_size("frechet"))
    write_results("frechet", comparisons, tmp_path, seconds=2.0)
    text = markdown(tmp_path)
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {comparisons[0].title}")]
    assert f"| {comparisons[0].ratio:.3f} |" in row
    assert ("| met |" in row) == bool(comparisons[0].met)
    assert "- `frechet`:" in text and torch.__version__ in text
