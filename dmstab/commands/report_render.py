"""How `dmstab report` shows a report: text tables, Markdown, CSV and the figures' data."""

from __future__ import annotations

import csv
import io
from typing import Any

from dmstab.commands.report_collect import (
    Method,
    Report,
    Row,
    SpeedUp,
    format_iteration,
    paper_comparable,
    rows,
)
from dmstab.console import TextTable
from dmstab.plots import Curve

_MISSING = "—"
_LISTED_STEPS = 8  # a caption lists the logged steps up to this many, else their range


def _number(value: float | None, signed: bool = False) -> str:
    """Two decimals as the papers print FID; three significant digits for small values (KID)."""
    if value is None:
        return _MISSING
    spec = ".2f" if value == 0 or abs(value) >= 0.1 else ".3g"
    return format(value, ("+" if signed else "") + spec)


def _paper_reached(item: SpeedUp, baseline: Method) -> tuple[str, str]:
    """The paper's speed-up, or dashes when the two paper blocks give nothing to compare."""
    if not paper_comparable(baseline.paper, item.method.paper):
        return _MISSING, _MISSING
    return _reached(item.paper)


def _reached(result: tuple[int, float] | None) -> tuple[str, str]:
    if result is None:
        return "not reached", _MISSING
    return format_iteration(result[0]), f"{result[1]:.2f}×"


def logged_note(method: Method, key: str) -> str:
    """Where the metric was logged, or, when it was not, what the run has logged instead."""
    if method.seeds:
        ids = ", ".join(r.run_id for r in method.seeds)
        listed = ", ".join(format_iteration(step) for step, _ in method.measured[:_LISTED_STEPS])
        more = "…" if len(method.measured) > _LISTED_STEPS else ""
        where = f"at {listed}{more}" if listed else "at no step common to all seeds"
        return f"mean ± std over {len(method.seeds)} seeds (runs {ids}), {where}"
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


def _measured(method: Method, row: Row) -> str:
    spread = method.spread.get(row.iteration)
    text = _number(row.measured)
    return text if spread is None or row.measured is None else f"{text} ± {_number(spread)}"


def _method_table(method: Method, key: str) -> TextTable:
    body = [
        (
            format_iteration(row.iteration),
            _number(row.paper),
            _measured(method, row),
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
    body = [
        (s.method.label, *_reached(s.measured), *_paper_reached(s, baseline))
        for s in report.speed_ups
    ]
    return TextTable(title, header, body)


def text_tables(report: Report) -> list[TextTable]:
    """One table per method (iteration | paper | measured | Δ), then the speed-ups."""
    tables = [_method_table(method, report.key) for method in report.methods]
    if report.baseline is not None:
        tables.append(_speed_up_table(report, report.baseline))
    return tables


def to_markdown(report: Report) -> str:
    lines = [f"# dmstab report: {report.key}", ""]
    for table in text_tables(report):
        lines += [f"## {table.title}", "", "| " + " | ".join(table.header) + " |"]
        lines += ["|---|" + "---:|" * (len(table.header) - 1)]
        lines += ["| " + " | ".join(cells) + " |" for cells in table.body]
        lines += ["", table.caption, ""] if table.caption else [""]
    return "\n".join(lines)


def to_csv(report: Report) -> str:
    """method, run_id(s), iteration, paper, measured, delta, std and seeds: one line per row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["method", "run_id", "metric", "iteration", "paper", "measured", "delta", "std"]
    writer.writerow([*header, "seeds"])
    for method in report.methods:
        run_ids = " ".join(r.run_id for r in method.seeds) or method.run.run_id
        for row in rows(method):
            values = (row.paper, row.measured, row.delta, method.spread.get(row.iteration))
            writer.writerow(
                [method.label, run_ids, report.key, row.iteration]
                + ["" if v is None else f"{v:.10g}" for v in values]
                + [len(method.seeds) or 1]
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


def curves(report: Report) -> list[Curve]:
    """What `plots.curves_figure` draws: each method's measured curve (labelled with its run)
    with its seed spread, and the paper's numbers."""
    return [
        Curve(
            f"{method.label} ({method.run.run_id[:8]})",
            method.measured,
            method.spread,
            f"{method.label}: paper",
            method.paper.points(),
        )
        for method in report.methods
    ]


def sweep_lines(
    report: Report, parameter: str
) -> list[tuple[str, list[tuple[float, float, float | None]]]]:
    """What `plots.sweep_figure` draws: one line per logged iteration, each point a method's
    (swept value, measured value, seed spread or None), by swept value."""
    iterations = sorted({step for m in report.methods for step, _ in m.measured})
    return [
        (
            f"iteration {format_iteration(iteration)}",
            sorted(
                (
                    float(m.run.params[parameter]),
                    dict(m.measured)[iteration],
                    m.spread.get(iteration),
                )
                for m in report.methods
                if iteration in dict(m.measured)
            ),
        )
        for iteration in iterations
    ]
