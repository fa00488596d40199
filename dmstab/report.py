"""`dmstab report`: the paper's numbers beside the measured ones, read back from MLflow.

Each reported method is one training run: its metric (e.g. `eval/fid`) at the iterations of
its recipe's `paper:` block (AAAI Tables 2-3), and, against a baseline, the Fig. 5 speed-up.
A measured value is the one logged at exactly the paper's iteration; nothing is interpolated.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from rich.table import Table

from dmstab.errors import DmstabError
from dmstab.recipe import EvalMetric, fingerprint, flatten, load_recipe
from dmstab.tracking import (
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_PARENT,
    TAG_RECIPE_NAME,
    MlflowTracker,
    RunRecord,
    find_runs,
    metric_history,
    resolve_uri,
    run_record,
    save_figure,
    tracked_run,
)

Points = list[tuple[int, float]]  # (iteration, value), by iteration
_ITERATION = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")
_SCALE = {"": 1, "k": 1_000, "m": 1_000_000}
_HIGHER_IS_BETTER = frozenset({"is"})  # Inception Score; FID and KID fall as samples improve
_MISSING = "—"
_LISTED_STEPS = 8  # a caption lists the logged steps up to this many, else their range


def parse_iteration(text: str, final_step: int | None = None) -> int:
    """A paper iteration key: '100k' -> 100000, '1M' -> 1000000, '1.5M', '250000'; 'end' ->
    `final_step`, the run's last training step (EDM2 reports its tables at the end of training)."""
    if text.strip() == "end" and final_step is not None:
        return final_step
    match = _ITERATION.match(text.strip())
    if match is None:
        raise DmstabError(
            f"paper iteration '{text}' is not a count like 100k, 1.5M or 250000 (k and M only) "
            "or end"
        )
    return round(float(match.group(1)) * _SCALE[match.group(2).lower()])


def final_step(params: Mapping[str, str]) -> int | None:
    """The last training step a run's (flattened recipe) params ask for: train.kimg or steps."""
    try:
        kimg, batch = float(params.get("train.kimg", "0")), int(params["train.batch_size"])
        return math.ceil(kimg * 1000 / batch) if kimg > 0 else int(params["train.steps"])
    except (KeyError, ValueError):
        return None


def format_iteration(iteration: int) -> str:
    """The paper's spelling of an iteration count: 100k, 2M, or the plain number."""
    for suffix, scale in (("M", 1_000_000), ("k", 1_000)):
        if iteration >= scale and iteration % scale == 0:
            return f"{iteration // scale}{suffix}"
    return str(iteration)


def metric_key(metric: str) -> str:
    """The MLflow key of a metric: `eval:` logs fid, kid and is as eval/<name>."""
    return f"eval/{metric}" if metric in get_args(EvalMetric) else metric


def higher_is_better(key: str) -> bool:
    return key.rpartition("/")[2] in _HIGHER_IS_BETTER


@dataclass(frozen=True)
class Paper:
    """A recipe's `paper:` block as training logged it (params `paper.*`)."""

    table: str
    metric: str
    values: dict[int, float]  # iteration -> published value

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Paper:
        prefix = "paper.values."
        values: dict[int, float] = {}
        for key, text in params.items():
            if key.startswith(prefix):
                try:
                    values[parse_iteration(key[len(prefix) :], final_step(params))] = float(text)
                except ValueError:
                    raise DmstabError(f"param {key} is '{text}', not a number") from None
        return cls(params.get("paper.table", ""), params.get("paper.metric", ""), values)

    def points(self) -> Points:
        return sorted(self.values.items())


@dataclass(frozen=True)
class Method:
    """One reported training run and what it logged of the reported metric."""

    label: str
    run: RunRecord
    paper: Paper
    measured: Points
    uri: str | None  # the store holding the run


@dataclass(frozen=True)
class Row:
    iteration: int
    paper: float | None
    measured: float | None

    @property
    def delta(self) -> float | None:
        if self.paper is None or self.measured is None:
            return None
        return self.measured - self.paper


def rows(method: Method) -> list[Row]:
    """The paper's iterations (or, without a paper block, every logged step), exact matches only."""
    measured = dict(method.measured)
    iterations = sorted(method.paper.values) or sorted(measured)
    return [Row(i, method.paper.values.get(i), measured.get(i)) for i in iterations]


# ---------------------------------------------------------------- Fig. 5 speed-up


def first_reaching(points: Points, target: float, higher_better: bool) -> int | None:
    """The first iteration whose value is at least as good as `target`."""
    for iteration, value in points:
        if (value >= target) if higher_better else (value <= target):
            return iteration
    return None


def speed_up(baseline: Points, method: Points, higher_better: bool) -> tuple[int, float] | None:
    """AAAI Fig. 5: (first iteration the method reaches the baseline's final value,
    baseline's final iteration / that iteration); None when it never does."""
    if not baseline:
        return None
    final_iteration, final_value = baseline[-1]
    reached = first_reaching(method, final_value, higher_better)
    if reached is None or reached <= 0:
        return None
    return reached, final_iteration / reached


@dataclass(frozen=True)
class SpeedUp:
    method: Method
    measured: tuple[int, float] | None
    paper: tuple[int, float] | None


def _paper_comparable(a: Paper, b: Paper) -> bool:
    same_metric = not a.metric or not b.metric or a.metric == b.metric
    return bool(a.values) and bool(b.values) and same_metric


def speed_ups(baseline: Method, methods: Sequence[Method], key: str) -> list[SpeedUp]:
    better = higher_is_better(key)
    result = []
    for method in methods:
        if method.run.run_id == baseline.run.run_id:
            continue
        paper = (
            speed_up(baseline.paper.points(), method.paper.points(), better)
            if _paper_comparable(baseline.paper, method.paper)
            else None
        )
        result.append(SpeedUp(method, speed_up(baseline.measured, method.measured, better), paper))
    return result


# ---------------------------------------------------------------- finding the runs


@dataclass(frozen=True)
class _Target:
    """A method to report: its label, published numbers and the runs that may hold it."""

    label: str
    paper: Paper
    uri: str | None
    candidates: list[RunRecord]  # preferred first


def _is_recipe(source: str) -> bool:
    return Path(source).suffix in (".yaml", ".yml") or Path(source).is_file()


def _run_target(run: RunRecord, uri: str | None) -> _Target:
    return _Target(run.params.get("name", run.name), Paper.from_params(run.params), uri, [run])


def _recipe_target(path: str) -> _Target:
    """The recipe's training runs (same recipe name), exact fingerprint first, newest first."""
    recipe = load_recipe(path)
    runs = find_runs(
        {TAG_KIND: "train", TAG_RECIPE_NAME: recipe.name},
        recipe.tracking.experiment,
        recipe.tracking.uri,
    )
    if not runs:
        raise DmstabError(
            f"no training runs of recipe '{recipe.name}' in experiment "
            f"'{recipe.tracking.experiment}' of {resolve_uri(recipe.tracking.uri)} yet; "
            f"train it first: dmstab train {path}"
        )
    exact = fingerprint(recipe)
    runs.sort(key=lambda run: run.tags.get(TAG_FINGERPRINT) != exact)  # stable: newest first
    return _Target(recipe.name, Paper.from_params(flatten(recipe)), recipe.tracking.uri, runs)


def _run_id_targets(run_id: str, uri: str | None) -> list[_Target]:
    """A training run, or the training runs under a sweep parent."""
    run = run_record(run_id, uri)
    if run.tags.get(TAG_KIND) == "train":
        return [_run_target(run, uri)]
    children = find_runs({TAG_KIND: "train", TAG_PARENT: run_id}, None, uri)
    if not children:
        kind = run.tags.get(TAG_KIND, "non-dmstab")
        raise DmstabError(
            f"run {run_id} is a '{kind}' run with no training runs under it; "
            "give a training run, a sweep parent, a recipe or --experiment"
        )
    return [_run_target(child, uri) for child in reversed(children)]


def _experiment_targets(experiment: str, uri: str | None) -> list[_Target]:
    runs = find_runs({TAG_KIND: "train"}, experiment, uri)
    if not runs:
        raise DmstabError(f"MLflow experiment '{experiment}' has no dmstab training runs")
    return [_run_target(run, uri) for run in reversed(runs)]


def _targets(source: str, uri: str | None) -> list[_Target]:
    return [_recipe_target(source)] if _is_recipe(source) else _run_id_targets(source, uri)


def _method(target: _Target, key: str) -> Method:
    """The first candidate run that logged `key` (else the first run), with its curve."""
    run = next((r for r in target.candidates if key in r.metrics), target.candidates[0])
    measured = metric_history(run.run_id, key, target.uri)
    return Method(target.label, run, target.paper, measured, target.uri)


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    key: str  # the MLflow metric key reported, e.g. eval/fid
    methods: list[Method]
    baseline: Method | None
    speed_ups: list[SpeedUp]


def build_report(
    sources: Sequence[str],
    *,
    experiment: str | None = None,
    metric: str | None = None,
    baseline: str | None = None,
    uri: str | None = None,
) -> Report:
    """Read the runs behind `sources` (recipe files, run ids) and `experiment` from MLflow.

    `metric` defaults to the first method's `paper.metric` (else fid); `baseline` (a recipe or
    run id, reported too) adds the Fig. 5 speed-up of every other method.
    """
    targets = [t for source in sources for t in _targets(source, uri)]
    if experiment is not None:
        targets += _experiment_targets(experiment, uri)
    if not targets:
        raise DmstabError("nothing to report: give recipe files, run ids or --experiment NAME")
    base_targets = _targets(baseline, uri) if baseline is not None else []
    if len(base_targets) > 1:
        raise DmstabError(f"baseline {baseline} names {len(base_targets)} runs; give one run")
    first = (base_targets or targets)[0]
    key = metric_key(metric or first.paper.metric or "fid")
    base = _method(base_targets[0], key) if base_targets else None
    methods = _unique([base] if base else [], (_method(t, key) for t in targets))
    return Report(key, methods, base, speed_ups(base, methods, key) if base else [])


def _unique(head: list[Method], rest: Iterable[Method]) -> list[Method]:
    """Methods in order, each run once (a run given twice, or also as baseline, is one)."""
    seen = {m.run.run_id for m in head}
    result = list(head)
    for method in rest:
        if method.run.run_id not in seen:
            seen.add(method.run.run_id)
            result.append(method)
    return result


# ---------------------------------------------------------------- rendering


def _number(value: float | None, signed: bool = False) -> str:
    """Two decimals as the papers print FID; three significant digits for small values (KID)."""
    if value is None:
        return _MISSING
    spec = ".2f" if value == 0 or abs(value) >= 0.1 else ".3g"
    return format(value, ("+" if signed else "") + spec)


def _reached(result: tuple[int, float] | None) -> tuple[str, str]:
    if result is None:
        return "not reached", _MISSING
    return format_iteration(result[0]), f"{result[1]:.2f}×"


def logged_note(method: Method, key: str) -> str:
    """Where the metric was logged, or, when it was not, what the run has logged instead."""
    run = f"run {method.run.run_id}"
    steps = [format_iteration(step) for step, _ in method.measured]
    if len(steps) > _LISTED_STEPS:
        return f"{run}: {key} logged at {len(steps)} steps, {steps[0]} to {steps[-1]}"
    if steps:
        return f"{run}: {key} logged at {', '.join(steps)}"
    logged = ", ".join(sorted(method.run.metrics)) or "nothing"
    return f"{run} ({method.run.status}): {key} not logged yet; it has logged {logged}"


def method_title(method: Method) -> str:
    return f"{method.label} — paper: {method.paper.table}" if method.paper.table else method.label


@dataclass(frozen=True)
class TextTable:
    """A rendered table, printed with rich and written as Markdown."""

    title: str
    header: tuple[str, ...]
    body: Sequence[tuple[str, ...]]
    caption: str = ""


def _method_table(method: Method, key: str) -> TextTable:
    body = [
        (
            format_iteration(row.iteration),
            _number(row.paper),
            _number(row.measured),
            _number(row.delta, signed=True),
        )
        for row in rows(method)
    ]
    header = ("iteration", "paper", f"measured {key}", "Δ")
    return TextTable(method_title(method), header, body, logged_note(method, key))


def _speed_up_table(report: Report, baseline: Method) -> TextTable:
    final = baseline.measured[-1] if baseline.measured else None
    reached = f"final {_number(final[1])} at {format_iteration(final[0])}" if final else "none"
    title = f"Speed-up vs {baseline.label} (Fig. 5): baseline {report.key} {reached}"
    header = ("method", "reaches it at", "speed-up", "paper: reaches at", "paper speed-up")
    body = [(s.method.label, *_reached(s.measured), *_reached(s.paper)) for s in report.speed_ups]
    return TextTable(title, header, body)


def text_tables(report: Report) -> list[TextTable]:
    """One table per method (iteration | paper | measured | Δ), then the speed-ups."""
    tables = [_method_table(method, report.key) for method in report.methods]
    if report.baseline is not None:
        tables.append(_speed_up_table(report, report.baseline))
    return tables


def rich_table(table: TextTable) -> Table:
    rendered = Table(title=table.title, caption=table.caption or None)
    for index, column in enumerate(table.header):
        rendered.add_column(column, justify="left" if index == 0 else "right")
    for cells in table.body:
        rendered.add_row(*cells)
    return rendered


def to_markdown(report: Report) -> str:
    lines = [f"# dmstab report: {report.key}", ""]
    for table in text_tables(report):
        lines += [f"## {table.title}", "", "| " + " | ".join(table.header) + " |"]
        lines += ["|---|" + "---:|" * (len(table.header) - 1)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table.body]
        lines += ["", table.caption, ""] if table.caption else [""]
    return "\n".join(lines)


def to_csv(report: Report) -> str:
    """method, run_id, iteration, paper, measured, delta: one line per table row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "run_id", "metric", "iteration", "paper", "measured", "delta"])
    for method in report.methods:
        for row in rows(method):
            values = (row.paper, row.measured, row.delta)
            writer.writerow(
                [method.label, method.run.run_id, report.key, row.iteration]
                + ["" if v is None else f"{v:.10g}" for v in values]
            )
    return out.getvalue()


def speed_up_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["method", "run_id", "reached_at", "speed_up", "paper_reached_at", "paper_speed_up"]
    )
    for item in report.speed_ups:
        cells: list[Any] = [item.method.label, item.method.run.run_id]
        for result in (item.measured, item.paper):
            cells += ["", ""] if result is None else [result[0], f"{result[1]:.10g}"]
        writer.writerow(cells)
    return out.getvalue()


def curves_figure(report: Report) -> Any:
    """Metric vs iteration: measured curves solid, the paper's numbers as markers."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for index, method in enumerate(report.methods):
        color = f"C{index % 10}"
        label = f"{method.label} ({method.run.run_id[:8]})"
        if method.measured:
            steps, values = zip(*method.measured, strict=True)
            ax.plot(steps, values, "-", marker=".", ms=4, color=color, label=label)
        if method.paper.values:
            steps, values = zip(*method.paper.points(), strict=True)
            ax.plot(steps, values, "o", color=color, mfc="none", label=f"{method.label}: paper")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_iteration(round(x))))
    ax.set_xlabel("training iteration")
    ax.set_ylabel(report.key)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no run logged the metric
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- logging


@dataclass(frozen=True)
class LoggedReport:
    run_id: str
    artifacts: list[str]  # URIs of the Markdown, CSV(s) and figure


def log_report(report: Report, experiment: str = "report") -> LoggedReport:
    """A run of kind `report` (in the first method's store) holding report.md, report.csv,
    speedup.csv with a baseline, and the figure."""
    params = {
        "metric": report.key,
        "runs": ",".join(m.run.run_id for m in report.methods),
        "baseline": report.baseline.run.run_id if report.baseline else "",
    }
    tracker = MlflowTracker.create(
        experiment=experiment, kind="report", params=params, tags={}, uri=report.methods[0].uri
    )
    assert tracker.run_id is not None
    figure_name = f"{report.key.replace('/', '_')}_vs_iteration.png"
    files = ["report.md", "report.csv"]
    with tracked_run(tracker):
        tracker.log_text(to_markdown(report), "report.md")
        tracker.log_text(to_csv(report), "report.csv")
        if report.baseline is not None:
            tracker.log_text(speed_up_csv(report), "speedup.csv")
            files.append("speedup.csv")
        save_figure(tracker, curves_figure(report), figure_name)
        files.append(figure_name)
    root = tracker.artifact_uri().rstrip("/")
    return LoggedReport(tracker.run_id, [f"{root}/{name}" for name in files])
