"""`dmstab ema-reconstruct`: choose the EMA length after training (EDM2 Sec. 3, App. C).

A training run with `ema.power_sigma_rels` leaves snapshots of its power-function EMAs in
`RUN_DIR/snapshots`. For each requested σrel this module solves the least-squares problem
over the snapshots taken at or before step `at`, combines the snapshot weights with the
solution (streaming, about batch + 1 models in memory) and writes a checkpoint that
`dmstab sample` loads like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmstab.analysis.ema_profiles import (
    SnapshotInfo,
    check_sigma_rel,
    gamma_to_sigma_rel,
    list_snapshots,
    load_snapshot,
    sigma_rel_to_gamma,
)
from dmstab.analysis.ema_reconstruct import reconstruct, solve_coefficients
from dmstab.atomic import require_writable_directory
from dmstab.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from dmstab.config import from_mapping
from dmstab.console import CountedProgress, console, result
from dmstab.errors import DmstabError
from dmstab.tracking import (
    TAG_OUTPUT,
    TAG_OUTPUT_COUNT,
    TAG_PARENT,
    TAG_SIGMA_RELS,
    MlflowTracker,
    check_store_writable,
    latest_run,
    run_directory,
    tracked_run,
)
from dmstab.train.loop import SNAPSHOT_DIR


@dataclass(frozen=True)
class Plan:
    """Which snapshots combine, with which coefficients, into which σrel at which step."""

    snapshots: list[SnapshotInfo]
    step: int
    sigma_rels: list[float]
    coefficients: np.ndarray  # (len(snapshots), len(sigma_rels)), float64
    profile_errors: np.ndarray  # relative L2 error of each reconstructed EMA profile

    def describe(self) -> str:
        header = "snapshot (step, σrel)   " + "  ".join(f"σ={s:<7.3f}" for s in self.sigma_rels)
        rows = [
            f"{info.step:>10d}  {info.sigma_rel:<8.3f}  "
            + "  ".join(f"{c:>9.4f}" for c in self.coefficients[i])
            for i, info in enumerate(self.snapshots)
        ]
        errors = "relative profile error " + "  ".join(f"{e:>9.2e}" for e in self.profile_errors)
        return "\n".join([f"reconstruction at step {self.step}", header, *rows, errors])


@dataclass(frozen=True)
class Reconstructed:
    sigma_rel: float
    path: Path
    profile_error: float
    run_id: str  # the ema-reconstruct run that logged it


def parse_sigma_rel_range(text: str) -> list[float]:
    """`start:stop:step` (stop included), e.g. `0.03:0.20:0.01` -> 18 values."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise DmstabError(f"--sweep {text!r} must look like start:stop:step") from None
    if step <= 0 or stop < start:
        raise DmstabError(f"--sweep {text!r}: need step > 0 and stop >= start")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(count)]


def find_snapshots(run_id: str | None, snapshots: Path | None, uri: str | None) -> Path:
    """The snapshot directory of `--snapshots`, of `--run`, or of the latest training run."""
    if snapshots is not None:
        if not snapshots.is_dir():
            raise DmstabError(f"snapshot directory not found: {snapshots}")
        return snapshots
    run_id = run_id or latest_run(None, "train", uri)
    if run_id is None:
        raise DmstabError("no training run found; pass --run ID or --snapshots DIR")
    directory = run_directory(run_id, uri) / SNAPSHOT_DIR
    if not directory.is_dir():
        raise DmstabError(
            f"run {run_id} has no power-EMA snapshots in {directory}; train with "
            "ema.power_sigma_rels=[0.05,0.1] to store them"
        )
    return directory


def make_plan(directory: Path, sigma_rels: Sequence[float], at: int | None) -> Plan:
    infos = list_snapshots(directory)
    if not infos:
        raise DmstabError(f"no snapshots in {directory}")
    steps = sorted({info.step for info in infos})
    step = steps[-1] if at is None else at
    if not steps[0] <= step <= steps[-1]:
        raise DmstabError(f"--at {step} is outside the snapshot steps {steps[0]}..{steps[-1]}")
    used = [info for info in infos if info.step <= step]
    targets = [(float(step), sigma_rel_to_gamma(s)) for s in sigma_rels]
    coefficients, errors = solve_coefficients([(float(i.step), i.gamma) for i in used], targets)
    return Plan(used, step, list(sigma_rels), coefficients, errors)


def _training_state(directory: Path) -> dict[str, Any]:
    """The training checkpoint beside the snapshots: it carries the recipe and class count."""
    checkpoint = directory.parent / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise DmstabError(f"{checkpoint} not found: the snapshots need their run's checkpoint")
    return load_checkpoint(checkpoint)


def reconstruct_ema(
    directory: Path,
    sigma_rels: Sequence[float],
    *,
    at: int | None = None,
    out_dir: Path | None = None,
    batch: int = 8,
) -> tuple[Plan, list[Reconstructed]]:
    """Write one loadable checkpoint per σrel and log them to a child run of the training run."""
    plan = make_plan(directory, sigma_rels, at)
    state = _training_state(directory)
    recipe = from_mapping(state["recipe"])
    train_run = state.get("run_id")
    out_dir = out_dir or directory.parent / "reconstructed"
    check_store_writable(recipe.tracking.uri)  # before the run and the reconstruction
    require_writable_directory(out_dir, "the reconstruction folder")
    for info in plan.snapshots:  # every file it combines readable before a run opens: mapped,
        load_snapshot(info.path, mmap=True)  # so a damaged one costs no reading of the rest
    tags = {TAG_PARENT: str(train_run)} if train_run else {}
    tags[TAG_SIGMA_RELS] = ",".join(f"{s:g}" for s in plan.sigma_rels)
    tags["dmstab.step"] = str(plan.step)
    tracker = MlflowTracker.start(recipe, kind="ema-reconstruct", extra_tags=tags)
    assert tracker.run_id is not None
    results: list[Reconstructed] = []
    with tracked_run(tracker):
        tracker.log_text(plan.describe(), "coefficients.txt")
        outputs = reconstruct(
            [info.path for info in plan.snapshots],
            plan.coefficients,
            batch,
            CountedProgress("ema-reconstruct snapshots"),
        )
        for sigma_rel, error, weights in zip(
            plan.sigma_rels, plan.profile_errors, outputs, strict=True
        ):
            path = out_dir / f"phema_step{plan.step:010d}_sigma{sigma_rel:.4f}.pt"
            save_checkpoint(
                {
                    "model": weights,
                    "ema": {"shadow": weights, "updates": 0},
                    "recipe": state["recipe"],
                    "num_classes": state.get("num_classes", 0),
                    "step": plan.step,
                    "run_id": train_run,
                    "sigma_rel": sigma_rel,
                    "gamma": sigma_rel_to_gamma(sigma_rel),
                },
                path,
            )
            tracker.log_metrics({f"profile_error/sigma_{sigma_rel:.4f}": float(error)}, plan.step)
            tracker.log_artifact(path, "checkpoints")
            results.append(Reconstructed(sigma_rel, path, float(error), tracker.run_id))
        written = results[0].path if len(results) == 1 else out_dir  # for `dmstab sample`
        tracker.set_tags({TAG_OUTPUT: str(written.resolve()), TAG_OUTPUT_COUNT: str(len(results))})
    return plan, results


def main(
    sigma_rels: Sequence[float],
    gammas: Sequence[float],
    sigma_rel_range: str | None,
    *,
    at: int | None,
    run: str | None,
    snapshots: Path | None,
    out: Path | None,
    dry_run: bool,
) -> dict[str, Any]:
    """Reconstruct every requested EMA length (σrel, γ or a start:stop:step range of σrel).
    stdout: the checkpoints' paths, one a line (the plan with `dry_run`); returned: the
    summary `--json` prints."""
    sigmas = [*sigma_rels, *(gamma_to_sigma_rel(g) for g in gammas)]
    sigmas += parse_sigma_rel_range(sigma_rel_range) if sigma_rel_range else []
    if not sigmas:
        raise DmstabError("give --sigma-rel, --gamma or --sweep")
    for sigma in sigmas:  # before any store or run is looked up
        check_sigma_rel(sigma)
    directory = find_snapshots(run, snapshots, None)
    if dry_run:
        plan = make_plan(directory, sigmas, at)
        result(plan.describe())
        return {
            "dry_run": True,
            "step": plan.step,
            "sigma_rels": plan.sigma_rels,
            "profile_errors": [float(error) for error in plan.profile_errors],
        }
    plan, results = reconstruct_ema(directory, sigmas, at=at, out_dir=out)
    console.print(f"[green]done[/] {len(results)} reconstruction(s) at step {plan.step}")
    for item in results:
        console.print(
            f"  σrel {item.sigma_rel:.4f}  {item.path}  (profile error {item.profile_error:.1e})"
        )
    for item in results:
        result(str(item.path))
    return {
        "run_id": results[0].run_id if results else None,
        "step": plan.step,
        "checkpoints": [
            {"sigma_rel": r.sigma_rel, "path": str(r.path), "profile_error": r.profile_error}
            for r in results
        ],
    }
