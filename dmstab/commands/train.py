"""`dmstab train`: train a recipe, or every child of its `sweep:` under one parent run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dmstab.commands.sweep import Launcher, Sweep, load_sweep, run_sweep
from dmstab.config import load_recipe, to_yaml
from dmstab.config.describe import run_name
from dmstab.console import (
    CountedProgress,
    SampleProgress,
    TrainProgress,
    announce_child,
    console,
    duration,
    result,
    wall_time,
)
from dmstab.errors import DmstabError
from dmstab.tracking import browse_hint, is_remote, run_page
from dmstab.train.loop import StartedRun, TrainResult, train


def main(
    recipe: Path,
    overrides: Sequence[str],
    *,
    dry_run: bool,
    resume: str | None,
    launcher: str | None = None,
    parallel: int | None = None,
    launcher_options: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Train `recipe` with `overrides` (or print the resolved recipe with `dry_run`). stdout: the
    run id (a sweep's parent run id); the return value: the summary `--json` prints (None on
    torchrun ranks other than 0). `launcher` "submitit" trains a sweep's children as submitit
    jobs (`parallel` at a time, `launcher_options` KEY=VALUE its parameters)."""
    sweep = load_sweep(recipe, overrides)
    if launcher is None and (parallel is not None or launcher_options):
        raise DmstabError("--parallel and --launcher-option need --launcher submitit")
    if launcher is not None and launcher != "submitit":
        raise DmstabError(
            f"--launcher {launcher}: the one launcher is submitit (without --launcher a "
            "sweep's children train here, one after the other)"
        )
    if launcher is not None and sweep is None:
        raise DmstabError(
            f"--launcher submitit runs the children of a sweep; {recipe} has no `sweep:` section"
        )
    if sweep is not None:
        child_launcher = None  # options are checked on a dry run too
        if launcher is not None:
            child_launcher = _submitit_launcher(sweep, parallel, launcher_options)
        return _train_sweep(sweep, dry_run=dry_run, resume=resume, launcher=child_launcher)
    resolved = load_recipe(recipe, overrides)
    if dry_run:
        text = to_yaml(resolved)
        result(text, end="")
        return {"dry_run": True, "recipe_yaml": text}
    if resolved.tracking.run_name is None:  # named by what sets it apart: quickstart·clts·s0
        named = replace(resolved.tracking, run_name=run_name(resolved, overrides))
        resolved = replace(resolved, tracking=named)
    trained = train(
        resolved,
        resume=resume,
        progress=TrainProgress(),
        on_sample=SampleProgress("sample"),
        on_run=announce_run,
    )
    if not trained.is_main:  # a torchrun rank other than 0: rank 0 reports
        return None
    summary = train_summary(trained)
    _print_summary(trained, summary)
    result(trained.run_id)
    return summary


def announce_run(run: StartedRun) -> None:
    """The line printed as soon as the MLflow run exists."""
    verb = "resumed" if run.resumed else "started"
    name = f" {run.run_name}" if run.run_name else ""
    console.print(
        f"[bold]run[/]{name} {run.run_id} {verb}: experiment {run.experiment} in "
        f"{run.tracking_uri}\n  run dir     {run.run_dir}",
        highlight=False,
    )


def train_summary(trained: TrainResult) -> dict[str, Any]:
    """What `dmstab train --json` prints: ids, where things are, the final loss, the wall time."""
    run = trained.run
    assert run is not None  # rank 0 always has its run
    return {
        "run_id": trained.run_id,
        "run_name": run.run_name,
        "experiment": run.experiment,
        "experiment_id": run.experiment_id,
        "tracking_uri": run.tracking_uri,
        "run_page": run_page(run.tracking_uri, run.experiment_id, run.run_id),
        "run_dir": str(trained.run_dir),
        "checkpoint": str(trained.checkpoint),
        "samples": None if trained.samples is None else str(trained.samples),
        "step": trained.step,
        "final_loss": trained.final_loss,
        "wall_time_s": round(wall_time(), 3),
    }


def _print_summary(trained: TrainResult, summary: dict[str, Any]) -> None:
    loss = "" if trained.final_loss is None else f", loss {trained.final_loss:.4f}"
    name = f" {summary['run_name']}" if summary["run_name"] else ""
    console.print(
        f"[green]done[/] run{name} {trained.run_id}: step {trained.step}{loss}, "
        f"{duration(summary['wall_time_s'])}",
        highlight=False,
    )
    uri = summary["tracking_uri"]
    page = summary["run_page"]
    if not is_remote(uri):
        page += f"   (after: {browse_hint(uri).partition('   ')[0]})"
    console.print(f"  run page    {page}", highlight=False)
    console.print(f"  run dir     {trained.run_dir}", highlight=False)
    console.print(f"  checkpoint  {trained.checkpoint}", highlight=False)
    if trained.samples:
        console.print(f"  samples     {trained.samples}", highlight=False)


def _submitit_launcher(sweep: Sweep, parallel: int | None, options: Sequence[str]) -> Launcher:
    """submitit's launcher for `sweep`, its options checked; a one-line error without submitit."""
    try:
        from dmstab.commands.launch import SubmititLauncher, parse_settings
    except ImportError as exc:
        if exc.name != "submitit":
            raise
        raise DmstabError(
            "--launcher submitit needs submitit: pip install 'dmstab[cluster]'"
        ) from None
    settings = parse_settings(options, parallel)
    return SubmititLauncher(settings, Path(sweep.base.train.out_dir) / "submitit", announce_run)


def _train_sweep(
    sweep: Sweep, *, dry_run: bool, resume: str | None, launcher: Launcher | None
) -> dict[str, Any] | None:
    if dry_run:
        text = to_yaml(sweep.base)
        result(text, end="")
        result(sweep.describe())
        return {"dry_run": True, "recipe_yaml": text, "sweep": sweep.describe()}
    outcome = run_sweep(
        sweep,
        resume=resume,
        launcher=launcher,
        progress=TrainProgress,
        on_sample=SampleProgress("sample"),
        on_child=announce_child,
        on_run=announce_run,
        children_done=CountedProgress("sweep children", bar=False),
    )
    console.print(
        f"[green]done[/] sweep {outcome.run_id}: {len(outcome.children)} children, "
        f"{duration(wall_time())}"
    )
    for child in outcome.children:
        console.print(f"  {child.label}  run {child.run_id} ({child.action})")
    console.print(f"  report      dmstab report {outcome.run_id}")
    result(outcome.run_id)
    return {
        "run_id": outcome.run_id,
        "children": [
            {"label": child.label, "run_id": child.run_id, "action": child.action}
            for child in outcome.children
        ],
        "wall_time_s": round(wall_time(), 3),
    }
