"""FID against EMA length (EDM2 Fig. 5a) and, per guidance strength, Fig. 6.

Scores every checkpoint an `ema-reconstruct` sweep wrote (each carries its σrel) with the
same sampler seed and the same reference, so the curve isolates the EMA length; the
optimum of each curve is marked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dmstab.analysis.scoring import FeaturePipeline, Reference, image_metrics, load_reference
from dmstab.atomic import require_writable_directory
from dmstab.checkpoint import load_checkpoint
from dmstab.commands.fid import check_fid_outputs, check_scoring, sampled_images
from dmstab.config import EvalConfig
from dmstab.console import SampleProgress, console, result
from dmstab.devices import pick_device
from dmstab.errors import DmstabError
from dmstab.plots import fid_figure
from dmstab.tracking import TAG_PARENT, MlflowTracker, save_figure, tracked_run
from dmstab.train.evaluate import feature_pipeline
from dmstab.train.restore import find_checkpoint


@dataclass(frozen=True)
class FidPoint:
    sigma_rel: float
    guidance: float
    fid: float
    checkpoint: Path


def reconstructed_checkpoints(paths: Sequence[Path]) -> list[tuple[float, Path]]:
    """(σrel, checkpoint) of each `ema-reconstruct` output among `paths` (files or folders),
    by σrel; a checkpoint without a σrel was not made by `ema-reconstruct` and is refused."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.pt"))
        elif path.is_file():
            files.append(path)
        else:
            raise DmstabError(f"reconstructed checkpoint or folder not found: {path}")
    found = []
    for file in files:
        sigma_rel = load_checkpoint(file).get("sigma_rel")
        if not isinstance(sigma_rel, float):
            raise DmstabError(f"{file} carries no σrel: give outputs of dmstab ema-reconstruct")
        found.append((sigma_rel, file))
    if len(found) < 2:
        raise DmstabError(f"a sweep needs at least 2 reconstructed checkpoints, found {len(found)}")
    return sorted(found)


def _output_folder(checkpoints: Sequence[tuple[float, Path]], out: Path | None) -> Path:
    """Where the sweep's CSV and figure go: `out`, else beside the checkpoints."""
    return out or checkpoints[0][1].parent


def score_checkpoints(
    checkpoints: Sequence[tuple[float, Path]],
    pipeline: FeaturePipeline,
    reference: Reference,
    *,
    num_images: int,
    guidances: Sequence[float] = (1.0,),
    guide: str | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> list[FidPoint]:
    """FID of `num_images` samples of every checkpoint at every guidance strength."""
    points = []
    for guidance in guidances:
        overrides = [f"sample.guidance={guidance}"]
        if guide is not None:
            overrides.append(f"sample.guide={guide}")
        for sigma_rel, checkpoint in checkpoints:
            images, _, _ = sampled_images(
                str(checkpoint), num_images, pipeline.device, callback, overrides
            )
            fid = image_metrics(pipeline.features(images), reference, pipeline, ["fid"])["fid"]
            points.append(FidPoint(sigma_rel, guidance, fid, checkpoint))
    return points


def best_points(points: Sequence[FidPoint]) -> dict[float, FidPoint]:
    """The lowest-FID point of each guidance strength."""
    best: dict[float, FidPoint] = {}
    for point in points:
        if point.guidance not in best or point.fid < best[point.guidance].fid:
            best[point.guidance] = point
    return best


def fid_table_csv(points: Sequence[FidPoint]) -> str:
    lines = ["sigma_rel,guidance,fid,checkpoint"]
    lines += [f"{p.sigma_rel:.4f},{p.guidance:g},{p.fid:.6f},{p.checkpoint}" for p in points]
    return "\n".join(lines) + "\n"


def fid_curves(
    points: Sequence[FidPoint],
) -> list[tuple[str, list[tuple[float, float]], tuple[float, float]]]:
    """What `plots.fid_figure` draws: per guidance strength, its label, its (σrel, FID) points
    by σrel and its optimum."""
    curves = []
    for guidance, best in sorted(best_points(points).items()):
        curve = sorted((p.sigma_rel, p.fid) for p in points if p.guidance == guidance)
        label = "no guidance" if guidance == 1.0 else f"guidance {guidance:g}"
        curves.append((label, curve, (best.sigma_rel, best.fid)))
    return curves


@dataclass(frozen=True)
class FidSweepResult:
    points: list[FidPoint]
    run_id: str
    figure: Path
    table: Path


def run_fid_sweep(
    paths: Sequence[Path],
    reference: Path,
    pipeline: FeaturePipeline,
    *,
    num_images: int,
    guidances: Sequence[float] = (1.0,),
    guide: str | None = None,
    out_dir: Path | None = None,
    experiment: str = "fid",
    callback: Callable[[int, int], None] | None = None,
) -> FidSweepResult:
    """Score a sweep and log it (kind `fid-sweep`, child of the training run): the points as
    metrics `fid/guidance_<w>` (step = point index, `sigma_rel` alongside), CSV and figure."""
    checkpoints = reconstructed_checkpoints(paths)
    out_dir = _output_folder(checkpoints, out_dir)
    ref = load_reference(reference, pipeline)  # a bad reference fails before any sampling
    points = score_checkpoints(
        checkpoints,
        pipeline,
        ref,
        num_images=num_images,
        guidances=guidances,
        guide=guide,
        callback=callback,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "fid_vs_sigma_rel.csv"
    table.write_text(fid_table_csv(points))
    figure = out_dir / "fid_vs_sigma_rel.png"
    title = f"FID vs EMA length ({num_images} images, {pipeline.key})"
    drawing = fid_figure(fid_curves(points), title)
    drawing.savefig(figure, dpi=120)
    train_run = load_checkpoint(checkpoints[0][1]).get("run_id")
    params = {
        "reference": str(reference.resolve()),
        "features": pipeline.key,
        "num_images": str(num_images),
        "checkpoints": str(out_dir.resolve()),
    }
    tags = {TAG_PARENT: str(train_run)} if train_run else {}
    tracker = MlflowTracker.create(
        experiment=experiment, kind="fid-sweep", params=params, tags=tags
    )
    assert tracker.run_id is not None
    with tracked_run(tracker):
        for guidance in sorted({p.guidance for p in points}):
            curve = [p for p in points if p.guidance == guidance]
            for index, point in enumerate(curve):
                values = {f"fid/guidance_{guidance:g}": point.fid, "sigma_rel": point.sigma_rel}
                tracker.log_metrics(values, index)
        for guidance, best in best_points(points).items():
            tracker.log_metrics({f"best_sigma_rel/guidance_{guidance:g}": best.sigma_rel}, 0)
        tracker.log_artifact(table, "sweep")
        save_figure(tracker, drawing, "sweep/fid_vs_sigma_rel.png")
    return FidSweepResult(points, tracker.run_id, figure, table)


def main(
    ref: Path,
    checkpoints: Sequence[Path],
    *,
    num_images: int,
    guidances: Sequence[float],
    guide: str | None,
    features: str,
    mode: str,
    inception_weights: str | None,
    batch_size: int,
    out: Path | None,
) -> None:
    """FID of each reconstructed checkpoint (default: the latest run's) per guidance strength."""
    config = EvalConfig(
        features=features,  # type: ignore[arg-type]  # feature_pipeline names the allowed ones
        mode=mode,  # type: ignore[arg-type]
        inception_weights=inception_weights,
        batch_size=batch_size,
    )
    check_fid_outputs(ref)  # the inputs in fid's order, before anything is computed
    paths = list(checkpoints) or [find_checkpoint(None, None, None).parent / "reconstructed"]
    folder = _output_folder(reconstructed_checkpoints(paths), out)
    require_writable_directory(folder, "the sweep's output folder")
    check_scoring(ref, features, mode, inception_weights)
    device = pick_device("auto")
    pipeline = feature_pipeline(config, device)
    sweep = run_fid_sweep(
        paths,
        ref,
        pipeline,
        num_images=num_images,
        guidances=guidances or [1.0],
        guide=guide,
        out_dir=out,
        callback=SampleProgress("sample"),
    )
    for point in sweep.points:
        result(f"σrel {point.sigma_rel:.4f}  guidance {point.guidance:g}  FID {point.fid:.4f}")
    for strength, best in sorted(best_points(sweep.points).items()):
        console.print(
            f"[green]best[/] guidance {strength:g}: FID {best.fid:.4f} at σrel {best.sigma_rel:.4f}"
        )
    console.print(f"  figure {sweep.figure}\n  table  {sweep.table}\n  run    {sweep.run_id}")
