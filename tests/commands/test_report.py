"""`dmstab report` over real SQLite MLflow stores holding runs whose metrics the test logs.

The report reads MLflow; it computes no FID. So the tests log known `eval/fid` curves and check
the table, the differences and the Fig. 5 speed-up against numbers worked out by hand.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path

import pytest
from mlflow.entities import Metric
from typer.testing import CliRunner

from dmstab.cli import app
from dmstab.commands.report import log_report
from dmstab.commands.report_collect import (
    build_report,
    final_step,
    first_reaching,
    format_iteration,
    metric_key,
    parse_iteration,
    rows,
    speed_up,
    varied_parameter,
)
from dmstab.commands.report_render import to_csv, to_markdown
from dmstab.config import flatten, load_recipe
from dmstab.errors import DmstabError
from dmstab.tracking import (
    TAG_KIND,
    TAG_PARENT,
    TAG_RECIPE_NAME,
    MlflowTracker,
    find_runs,
    metric_history,
    tracked_run,
)
from tests.helpers import RECIPES, Runner, store

# Measured curves the tests log. Baseline final: 3.0 at 500k; CLTS first <= 3.0 at 200k, so the
# measured speed-up is 500k / 200k = 2.5x. CLTS skips 400k (that row must read "—") and adds an
# off-table 150k point (not a row: only the paper's iterations are).
BASELINE_FID = {100_000: 6.0, 200_000: 4.5, 300_000: 3.6, 400_000: 3.2, 500_000: 3.0}
CLTS_FID = {100_000: 4.0, 150_000: 3.4, 200_000: 3.0, 300_000: 2.7, 500_000: 2.4}
# Paper (Table 3): ID ends at 2.60 (500k); ID+Ours is first <= 2.60 at 300k (2.46): 5/3.
K = 100_000
PAPER_CLTS = {100_000: 4.24, 200_000: 2.81, 300_000: 2.46, 400_000: 2.38, 500_000: 2.31}


def _recipe_file(directory: Path, name: str, base: str) -> Path:
    """A copy of a paper recipe that logs to the `tests` experiment of ./mlflow.db."""
    path = directory / f"{name}.yaml"
    path.write_text(f"base: {RECIPES / base}\ntracking: {{experiment: tests}}\n")
    return path


def _train_run(
    recipe: Path, fids: Mapping[int, float], key: str = "eval/fid", overrides: tuple[str, ...] = ()
) -> str:
    """A training run as `dmstab train` opens it (params, tags), with `fids` logged at steps."""
    tracker = MlflowTracker.start(load_recipe(recipe, overrides), kind="train")
    with tracked_run(tracker):
        for step, value in sorted(fids.items()):
            tracker.log_metrics({key: value}, step)
    assert tracker.run_id is not None
    return tracker.run_id


@pytest.fixture
def recipes(isolated_workdir: Path) -> tuple[Path, Path]:
    baseline = _recipe_file(isolated_workdir, "baseline", "cifar10_baseline.yaml")
    clts = _recipe_file(isolated_workdir, "clts", "cifar10_clts.yaml")
    return baseline, clts


def test_iterations_are_read_and_written_as_the_paper_spells_them() -> None:
    assert [parse_iteration(t) for t in ("100k", "1M", "1.5M", "250000", "25K")] == [
        100_000,
        1_000_000,
        1_500_000,
        250_000,
        25_000,
    ]
    assert [format_iteration(n) for n in (100_000, 2_000_000, 1_500_000, 1234)] == [
        "100k",
        "2M",
        "1500k",
        "1234",
    ]
    with pytest.raises(DmstabError, match="10x"):
        parse_iteration("10x")
    assert metric_key("fid") == "eval/fid" and metric_key("loss") == "train/loss"
    assert metric_key("images_per_s") == "system/images_per_s"
    assert metric_key("timesteps/gamma") == "timesteps/gamma"
    assert metric_key("consistency_psnr") == "consistency_psnr"


def test_end_means_the_last_step_the_recipe_trains() -> None:
    """EDM2's tables are at the end of training: `end` resolves to train.kimg or train.steps."""
    edm2 = flatten(load_recipe(RECIPES / "edm2_img512_s.yaml"))
    assert final_step(edm2) == 2**20  # 2^31 images in batches of 2048 (EDM2 Table 6)
    assert parse_iteration("end", final_step(edm2)) == 2**20
    assert final_step(flatten(load_recipe(RECIPES / "cifar10_clts.yaml"))) == 500_000
    with pytest.raises(DmstabError, match="or end"):
        parse_iteration("end")


def test_speed_up_is_the_final_baseline_iteration_over_the_first_one_reaching_it() -> None:
    baseline = [(100, 6.0), (500, 3.0)]
    assert speed_up(baseline, [(100, 3.5), (200, 2.9), (300, 3.1)], False) == (200, 2.5)
    assert speed_up(baseline, [(100, 3.5), (500, 3.01)], False) is None
    assert speed_up([], [(100, 1.0)], False) is None
    # Inception Score rises as samples improve: reaching means >= the baseline's final value.
    assert first_reaching([(100, 7.0), (200, 8.5)], 8.0, higher_better=True) == 200
    assert speed_up([(400, 8.0)], [(100, 8.0)], True) == (100, 4.0)


def test_table_csv_differences_and_speed_up(recipes: tuple[Path, Path]) -> None:
    baseline, clts = recipes
    _train_run(baseline, BASELINE_FID)
    clts_id = _train_run(clts, CLTS_FID)
    report = build_report([str(clts)], baseline=str(baseline))
    assert report.key == "eval/fid"  # from the paper block's `metric: fid`
    assert [m.label for m in report.methods] == ["baseline", "clts"]
    method = report.methods[1]
    assert method.run.run_id == clts_id
    table = {row.iteration: row for row in rows(method)}
    assert sorted(table) == sorted(PAPER_CLTS)
    for iteration, paper in PAPER_CLTS.items():
        measured = CLTS_FID.get(iteration)
        assert table[iteration].paper == paper
        assert table[iteration].measured == measured
        delta = table[iteration].delta
        assert (delta is None) if measured is None else delta == pytest.approx(measured - paper)
    (item,) = report.speed_ups
    assert item.measured == pytest.approx((200_000, 2.5))
    assert item.paper == pytest.approx((300_000, 5 / 3))

    lines = [
        line for line in csv.DictReader(io.StringIO(to_csv(report))) if line["method"] == "clts"
    ]
    assert [int(line["iteration"]) for line in lines] == sorted(PAPER_CLTS)
    assert {line["run_id"] for line in lines} == {clts_id}
    by_iteration = {int(line["iteration"]): line for line in lines}
    assert float(by_iteration[100_000]["delta"]) == pytest.approx(4.0 - 4.24)
    assert float(by_iteration[500_000]["measured"]) == 2.4
    assert by_iteration[400_000]["measured"] == "" and by_iteration[400_000]["delta"] == ""


def test_recipe_reports_its_newest_run_that_logged_the_metric(
    recipes: tuple[Path, Path],
) -> None:
    _, clts = recipes
    with_fid = _train_run(clts, CLTS_FID)
    _train_run(clts, {10: 0.5}, key="train/loss")  # newer, but no eval yet
    assert build_report([str(clts)]).methods[0].run.run_id == with_fid


def test_sweep_parent_reports_its_child_training_runs(recipes: tuple[Path, Path]) -> None:
    _, clts = recipes
    children = [_train_run(clts, {100_000: v}) for v in (4.0, 3.0)]
    parent = MlflowTracker.create(experiment="tests", kind="sweep", params={}, tags={})
    parent.finish("FINISHED")
    for child in children:
        store().set_tag(child, TAG_PARENT, parent.run_id)
    assert parent.run_id is not None
    report = build_report([parent.run_id])
    assert [m.run.run_id for m in report.methods] == children
    assert [m.measured for m in report.methods] == [[(100_000, 4.0)], [(100_000, 3.0)]]


def test_seeds_of_a_sweep_point_are_averaged_and_other_points_stay_apart(
    recipes: tuple[Path, Path],
) -> None:
    """Three seeds of CLTS become one method: mean and sample std at the steps all logged."""
    baseline, clts = recipes
    seed_fids = [{K: 4.0, 2 * K: 3.0}, {K: 5.0, 2 * K: 2.0}, {K: 6.0}]  # seed 2 skips 200k
    seeds = [
        _train_run(clts, fids, overrides=(f"train.seed={seed}", f"name=clts/train.seed={seed}"))
        for seed, fids in enumerate(seed_fids)
    ]
    other = _train_run(baseline, {K: 9.0})
    parent = MlflowTracker.create(experiment="tests", kind="sweep", params={}, tags={})
    parent.finish("FINISHED")
    for child in [*seeds, other]:
        store().set_tag(child, TAG_PARENT, parent.run_id)
    assert parent.run_id is not None
    report = build_report([parent.run_id], metric="fid")
    averaged, single = report.methods
    assert [r.run_id for r in averaged.seeds] == seeds and averaged.label == "clts (3 seeds)"
    assert averaged.measured == [(K, 5.0)]  # 200k is missing from seed 2: no mean there
    assert averaged.spread == {K: pytest.approx(1.0)}  # sample std of 4, 5, 6
    assert single.run.run_id == other and single.seeds == () and single.measured == [(K, 9.0)]
    line = next(csv.DictReader(io.StringIO(to_csv(report))))
    assert (line["measured"], line["std"], line["seeds"]) == ("5", "1", "3")
    assert "| 100k | 4.24 | 5.00 ± 1.00 | +0.76 |" in to_markdown(report)
    assert varied_parameter(report) is None  # baseline and CLTS differ in many keys
    by_label = build_report([parent.run_id], metric="fid", baseline="clts")  # a point's label
    assert by_label.baseline is not None and by_label.baseline.seeds == averaged.seeds
    assert [s.method.run.run_id for s in by_label.speed_ups] == [other]


def test_a_sweep_file_reports_the_children_of_its_newest_parent_run(
    isolated_workdir: Path,
) -> None:
    sweep_file = isolated_workdir / "seeds.yaml"
    sweep_file.write_text(
        f"base: {RECIPES / 'cifar10_clts.yaml'}\ntracking: {{experiment: tests}}\n"
        "sweep: {grid: {train.seed: [0, 1]}}\n"
    )
    with pytest.raises(DmstabError, match="no runs of sweep 'seeds'"):
        build_report([str(sweep_file)])
    for values in ((7.0, 9.0), (4.0, 6.0)):  # an older parent, then the newer one reported
        parent = MlflowTracker.create(
            experiment="tests", kind="sweep", params={}, tags={TAG_RECIPE_NAME: "seeds"}
        )
        parent.finish("FINISHED")
        for seed, value in enumerate(values):
            overrides = (f"train.seed={seed}", f"name=seeds/train.seed={seed}")
            child = _train_run(
                RECIPES / "cifar10_clts.yaml",
                {K: value},
                "eval/fid",
                (*overrides, "tracking.experiment=tests"),
            )
            store().set_tag(child, TAG_PARENT, parent.run_id)
    (method,) = build_report([str(sweep_file)]).methods
    assert method.label == "seeds (2 seeds)" and method.measured == [(K, 5.0)]


def test_a_one_key_sweep_gets_the_fig6_figure_of_the_metric_against_that_key(
    recipes: tuple[Path, Path],
) -> None:
    _, clts = recipes
    runs = [
        _train_run(clts, {K: 5.0 - mu / 100}, overrides=(f"timesteps.mu={mu}",))
        for mu in (10, 20, 30)
    ]
    report = build_report(runs)
    assert varied_parameter(report) == "timesteps.mu"
    logged = log_report(report)
    names = {uri.rpartition("/")[2] for uri in logged.artifacts}
    assert "eval_fid_vs_timesteps.mu.png" in names
    assert varied_parameter(build_report(runs[:1])) is None


def test_metric_history_keeps_the_latest_value_of_a_step_and_find_runs_filters_tags(
    recipes: tuple[Path, Path],
) -> None:
    baseline, _ = recipes
    run_id = _train_run(baseline, {100: 5.0, 200: 4.0})
    store().log_batch(run_id, metrics=[Metric("eval/fid", 3.5, 2**41, 200)])  # a later rewrite
    assert metric_history(run_id, "eval/fid") == [(100, 5.0), (200, 3.5)]
    assert metric_history(run_id, "eval/kid") == []
    assert [r.run_id for r in find_runs({TAG_KIND: "train"}, "tests")] == [run_id]
    assert find_runs({TAG_KIND: "fid"}, "tests") == []
    assert find_runs({TAG_KIND: "train"}, "no-such-experiment") == []


def test_cli_prints_the_table_and_logs_the_report_run(
    recipes: tuple[Path, Path], dmstab: Runner
) -> None:
    baseline, clts = recipes
    _train_run(baseline, BASELINE_FID)
    clts_id = _train_run(clts, CLTS_FID)
    result = dmstab("report", str(baseline), str(clts), "--baseline", str(baseline))
    assert result.returncode == 0, result.stderr
    assert clts_id in result.stdout
    assert "2.50×" in result.stdout and "1.67×" in result.stdout
    client = store()
    (run,) = find_runs({TAG_KIND: "report"}, "report")
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert artifacts == {"report.md", "report.csv", "speedup.csv", "eval_fid_vs_iteration.png"}
    for name in artifacts:
        assert name in result.stderr  # the artifact paths are printed
    local = Path(client.download_artifacts(run.run_id, "speedup.csv"))
    (line,) = list(csv.DictReader(local.open()))
    assert (int(line["reached_at"]), float(line["speed_up"])) == (200_000, 2.5)
    figure = Path(client.download_artifacts(run.run_id, "eval_fid_vs_iteration.png"))
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = Path(client.download_artifacts(run.run_id, "report.md")).read_text()
    assert "| 400k | 2.38 | — | — |" in markdown


def test_cli_shows_what_a_run_without_eval_has_logged(recipes: tuple[Path, Path]) -> None:
    _, clts = recipes
    run_id = _train_run(clts, {1: 0.9, 2: 0.8}, key="train/loss")
    result = CliRunner().invoke(app, ["report", run_id])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # rich wraps long captions
    assert "eval/fid not logged yet" in out and "train/loss" in out


def test_cli_errors_are_one_line_and_exit_2(recipes: tuple[Path, Path]) -> None:
    _, clts = recipes
    MlflowTracker.create(experiment="scores", kind="fid", params={}, tags={}).finish("FINISHED")
    cases = [
        (["report", "0123456789abcdef"], "no MLflow run '0123456789abcdef'"),
        (["report", "--experiment", "scores"], "has no dmstab training runs"),
        (["report", str(clts)], "no training runs of recipe 'clts'"),
        (["report"], "nothing to report"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_help_shows_examples() -> None:
    result = CliRunner().invoke(app, ["report", "--help"])
    assert result.exit_code == 0 and "Examples" in result.output and "--baseline" in result.output
