"""`dmstab recipes` and `dmstab runs`: what they list, on a terminal and with `--json`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dmstab.tracking import resolve_uri
from tests.helpers import RECIPES, CachedRun, Runner, store


def _json(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def test_recipes_lists_every_bundled_recipe_with_its_paper_table(dmstab: Runner) -> None:
    listed = _json(dmstab("recipes", "--json"))["recipes"]
    by_name = {entry["name"]: entry for entry in listed}
    expected = sorted(p.name for p in RECIPES.glob("*.yaml") if not p.stem.endswith("_base"))
    assert [entry["name"] for entry in listed] == expected
    assert "cifar10_base.yaml" not in by_name

    clts = by_name["cifar10_clts.yaml"]
    assert clts["reproduces"] == "Table 3, ID+Ours"
    assert clts["paper"]["values"]["100k"] == 4.24  # the published FID at 100k (Table 3)
    assert clts["description"].startswith('Table 3, row "ID+Ours": improved-diffusion on CIFAR-10')
    assert clts["description"].endswith("(Eqs. 6-7).")  # one sentence, not cut at "Eqs."
    # its own file has no `paper:`: the one of its base chain (mini_dcgan -> dcgan_cifar10)
    assert "paper:" not in (RECIPES / "mini_stability_dcgan.yaml").read_text()
    assert by_name["mini_stability_dcgan.yaml"]["reproduces"] == "Table 1"
    quickstart = by_name["quickstart.yaml"]
    assert quickstart["reproduces"] == "" and quickstart["description"] == (
        "Quickstart: a small class-conditional DDPM on the embedded synthetic shapes, with CLTS."
    )

    table = dmstab("recipes")
    assert table.returncode == 0, table.stderr
    rows = [line.split("│")[1:-1] for line in table.stdout.splitlines() if line.startswith("│")]
    assert [row[0].strip() for row in rows if row[0].strip()] == expected  # one row each
    (clts_row,) = [row for row in rows if row[0].strip() == "cifar10_clts.yaml"]
    assert clts_row[1].strip().startswith("Table 3,")  # the rest on the lines below


def test_runs_lists_the_tiny_run_with_its_step_and_final_loss(
    dmstab: Runner, tiny_dm: CachedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = store().get_run(tiny_dm.run_id)
    history = store().get_metric_history(tiny_dm.run_id, "train/loss")
    final = max(history, key=lambda metric: metric.step)
    (listed,) = _json(dmstab("runs", "--json"))["runs"]
    assert listed["run_id"] == tiny_dm.run_id and listed["name"] == run.info.run_name
    assert listed["kind"] == "train" and listed["status"] == "FINISHED"
    assert listed["experiment"] == "tests"
    assert listed["last_step"] == final.step == tiny_dm.step
    assert listed["loss"] == final.value

    monkeypatch.setenv("COLUMNS", "140")  # a terminal wide enough for a row on one line
    table = dmstab("runs", "--kind", "train", "--experiment", "tests")
    assert table.returncode == 0, table.stderr
    assert run.info.run_name in table.stdout and tiny_dm.run_id in table.stdout
    assert f"{final.value:.4g}" in table.stdout and " 12 " in table.stdout

    assert _json(dmstab("runs", "--limit", "1", "--json"))["runs"][0]["run_id"] == tiny_dm.run_id


def test_runs_without_a_store_is_one_line(dmstab: Runner) -> None:
    result = dmstab("runs")
    assert result.returncode == 2
    assert (result.stdout + result.stderr).strip().splitlines() == [
        f"error: no MLflow store at {resolve_uri(None)}"
    ]
