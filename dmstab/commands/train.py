"""`dmstab train`: train a recipe, or every child of its `sweep:` under one parent run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dmstab.commands.sweep import Sweep, load_sweep, run_sweep
from dmstab.config import load_recipe, to_yaml
from dmstab.config.describe import run_name
from dmstab.console import SampleProgress, TrainProgress, announce_child, console, result
from dmstab.tracking import browse_hint
from dmstab.train.loop import train


def main(recipe: Path, overrides: Sequence[str], *, dry_run: bool, resume: str | None) -> None:
    """Train `recipe` with `overrides` (or print the resolved recipe with `dry_run`)."""
    sweep = load_sweep(recipe, overrides)
    if sweep is not None:
        _train_sweep(sweep, dry_run=dry_run, resume=resume)
        return
    resolved = load_recipe(recipe, overrides)
    if dry_run:
        result(to_yaml(resolved), end="")
        return
    if resolved.tracking.run_name is None:  # named by what sets it apart: quickstart·clts·s0
        named = replace(resolved.tracking, run_name=run_name(resolved, overrides))
        resolved = replace(resolved, tracking=named)
    trained = train(
        resolved, resume=resume, progress=TrainProgress(), on_sample=SampleProgress("sample")
    )
    if not trained.is_main:  # a torchrun rank other than 0: rank 0 reports
        return
    console.print(f"[green]done[/] run {trained.run_id}: step {trained.step}")
    console.print(f"  checkpoint  {trained.checkpoint}")
    if trained.samples:
        console.print(f"  samples     {trained.samples}")
    console.print(f"  browse      {browse_hint(resolved.tracking.uri)}")


def _train_sweep(sweep: Sweep, *, dry_run: bool, resume: str | None) -> None:
    if dry_run:
        result(to_yaml(sweep.base), end="")
        result(sweep.describe())
        return
    outcome = run_sweep(
        sweep,
        resume=resume,
        progress=TrainProgress,
        on_sample=SampleProgress("sample"),
        on_child=announce_child,
    )
    console.print(f"[green]done[/] sweep {outcome.run_id}: {len(outcome.children)} children")
    for child in outcome.children:
        console.print(f"  {child.label}  run {child.run_id} ({child.action})")
    console.print(f"  report      dmstab report {outcome.run_id}")
