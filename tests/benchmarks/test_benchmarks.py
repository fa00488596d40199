"""Every side-by-side benchmark at toy size, so that none rots: it runs, both sides are timed,
the JSON record is complete, and the sides agree where the benchmark checks that they do."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.run import BENCHMARKS, run_benchmark, table, write_results


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_at_toy_size(name: str, tmp_path) -> None:
    comparisons = run_benchmark(name, "toy", torch.device("cpu"))
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
    (comparison,) = run_benchmark("frechet", "toy", torch.device("cpu"))
    assert comparison.checks["relative_difference"] < 1e-6
