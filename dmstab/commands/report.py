"""`dmstab report`: the paper's numbers beside the measured ones, read back from MLflow
(report_collect), printed as tables and logged as a report run (report_render's files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console

from dmstab.commands.report_collect import (
    Report,
    build_report,
    format_iteration,
    varied_parameter,
)
from dmstab.commands.report_render import (
    curves,
    speed_up_csv,
    sweep_lines,
    text_tables,
    to_csv,
    to_markdown,
)
from dmstab.console import console, rich_table
from dmstab.plots import curves_figure, sweep_figure
from dmstab.tracking import MlflowTracker, save_figure, tracked_run


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
        figure = curves_figure(curves(report), report.key, iteration_label=format_iteration)
        save_figure(tracker, figure, figure_name)
        files.append(figure_name)
        parameter = varied_parameter(report)
        if parameter is not None:
            sweep_name = f"{report.key.replace('/', '_')}_vs_{parameter}.png"
            lines = sweep_lines(report, parameter)
            save_figure(tracker, sweep_figure(lines, parameter, report.key), sweep_name)
            files.append(sweep_name)
    root = tracker.artifact_uri().rstrip("/")
    return LoggedReport(tracker.run_id, [f"{root}/{name}" for name in files])


def main(
    sources: Sequence[str],
    *,
    experiment: str | None,
    metric: str | None,
    baseline: str | None,
    log_experiment: str,
) -> None:
    """Print the report's tables on stdout and log it as a report run."""
    report = build_report(sources, experiment=experiment, metric=metric, baseline=baseline)
    stdout = Console()
    for table in text_tables(report):
        stdout.print(rich_table(table))
    logged = log_report(report, experiment=log_experiment)
    console.print(f"[green]done[/] report run {logged.run_id}")
    for artifact in logged.artifacts:
        console.print(f"  {artifact}")
