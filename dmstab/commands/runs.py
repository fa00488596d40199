"""`dmstab runs`: the latest runs of the MLflow store, one line each: name, id, kind, status,
last training step, final loss and evaluation metrics (eval/fid, eval/kid, eval/is), start."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from dmstab.console import result_table
from dmstab.tracking import TAG_KIND, ListedRun, recent_runs, resolve_uri
from dmstab.train.metric_names import tracked_name

LOSS = tracked_name("loss")  # train/loss, logged every train.log_every steps
EVAL_PREFIX = "eval/"  # the eval: block's metrics (docs/tracking.md)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _eval_metrics(run: ListedRun) -> dict[str, float]:
    return {k: v for k, v in sorted(run.record.metrics.items()) if k.startswith(EVAL_PREFIX)}


def _row(run: ListedRun, eval_keys: list[str]) -> tuple[str, ...]:
    record = run.record
    return (
        record.name,
        record.run_id,
        record.tags.get(TAG_KIND, ""),
        record.status,
        "" if run.last_step is None else str(run.last_step),
        _number(record.metrics.get(LOSS)),
        *(_number(record.metrics.get(key)) for key in eval_keys),
        run.started.strftime("%Y-%m-%d %H:%M") if run.started else "",
    )


def _summary(run: ListedRun) -> dict[str, Any]:
    record = run.record
    return {
        "name": record.name,
        "run_id": record.run_id,
        "experiment": run.experiment,
        "kind": record.tags.get(TAG_KIND),
        "status": record.status,
        "last_step": run.last_step,
        "loss": record.metrics.get(LOSS),
        "eval": {k.removeprefix(EVAL_PREFIX): v for k, v in _eval_metrics(run).items()},
        "started": run.started.isoformat() if run.started else None,
    }


def main(*, experiment: str | None, kind: str | None, limit: int) -> dict[str, Any]:
    """Print the runs as a table (times in UTC); the same runs as the summary."""
    uri = resolve_uri(None)
    runs = recent_runs(experiment=experiment, kind=kind, limit=limit, step_metric=LOSS)
    eval_keys = sorted({key for run in runs for key in _eval_metrics(run)})
    where = f"{experiment} in {uri}" if experiment else uri
    table = Table(title=f"{len(runs)} latest runs in {where}")
    table.add_column("name", overflow="fold", min_width=20)  # whole: names hold overrides
    table.add_column("run id", no_wrap=True)  # whole, to paste into other commands
    for column in ("kind", "status"):
        table.add_column(column, no_wrap=True)
    for column in ("step", LOSS, *eval_keys):
        table.add_column(column, justify="right")
    table.add_column("started (UTC)", no_wrap=True)
    for run in runs:
        table.add_row(*_row(run, eval_keys))
    result_table(table)
    return {"uri": uri, "runs": [_summary(run) for run in runs]}
