"""FID against EMA length (EDM2 Fig. 5a) and, per guidance strength, Fig. 6.

Scores every checkpoint an `ema-reconstruct` sweep wrote (each carries its σrel) with the
same sampler seed and the same reference, so the curve isolates the EMA length; the
optimum of each curve is marked.

A recipe's `fid_sweep:` section does the same over released models: EDM2's post-hoc
reconstructions (each named with its σrel) and the guide they are sampled with (EDM2 Sec. 5:
an unconditional XS model), imported once each (dmstab.commands.published_group) and scored
against `eval.reference` at every guidance strength. A missing file is one line naming where
to download it, before anything is imported or computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dmstab.analysis.scoring import FeaturePipeline, Reference, image_metrics, load_reference
from dmstab.atomic import require_writable_directory
from dmstab.checkpoint import load_checkpoint
from dmstab.commands.fid import check_fid_outputs, check_scoring, sampled_images
from dmstab.commands.published_group import (
    import_entries,
    imported_checkpoint,
    require_downloaded,
    split_entry,
)
from dmstab.commands.subjects import ANALYSES_DIR, parse_inputs
from dmstab.config import ANALYSES, AnalysisSection, EvalConfig, Recipe
from dmstab.console import SampleProgress, console, result
from dmstab.devices import pick_device
from dmstab.errors import DmstabError
from dmstab.plots import fid_figure
from dmstab.published.edm2_releases import named_sigma_rel
from dmstab.tracking import TAG_PARENT, MlflowTracker, save_figure, tracked_run
from dmstab.train.evaluate import feature_pipeline
from dmstab.train.restore import find_checkpoint

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class FidSweepConfig(AnalysisSection):
    """`fid_sweep:` (EDM2 Fig. 6 on released models, `dmstab fid-sweep RECIPE`): the FID of
    each released network in `published` at each guidance strength w in `guidance`, guided by
    `guide` (D = D_guide + w·(D − D_guide), EDM2 Sec. 5), against `eval.reference` with
    `eval.features` and `eval.mode`. Each file is imported once; a later run reuses the import.
    """

    section: ClassVar[str] = "fid_sweep"

    published: tuple[str, ...] = ()
    """released networks, at least 2, one string each: the file's path, whose name gives its
    EMA length (`models/edm2-img512-s-2147483-0.130.pkl`: σrel 0.130), and any settings
    `dmstab import` needs"""
    guide: str | None = None
    """the released guide for w ≠ 1, its path and settings
    (`models/edm2-img512-xs-uncond-2147483-0.025.pkl`)"""
    guidance: tuple[float, ...] = (1.0,)
    """guidance strengths w to score every network at (1: none)"""
    num_images: int = 50_000
    """images per network and guidance strength"""


def check_fid_sweep(recipe: Recipe) -> None:
    """What a sweep over released files needs, checked when the recipe loads."""
    section = recipe.analysis(FidSweepConfig)
    if len(section.published) < 2:
        raise DmstabError(
            f"fid_sweep.published lists {len(section.published)} file(s); a sweep needs at least 2"
        )
    lengths: dict[float, str] = {}
    for entry in section.published:
        name = split_entry(entry, "fid_sweep.published")[0].name
        sigma_rel = named_sigma_rel(name)
        if sigma_rel is None:
            raise DmstabError(
                f"fid_sweep.published entry {entry!r}: its name gives no EMA length; EDM2's "
                "files end in -<σrel>.pkl (edm2-img512-s-2147483-0.130.pkl)"
            )
        if sigma_rel in lengths:
            raise DmstabError(
                f"fid_sweep.published: {lengths[sigma_rel]} and {name} have the same σrel "
                f"{sigma_rel:g}; a curve has one network per EMA length"
            )
        lengths[sigma_rel] = name
    if not section.guidance or not all(math.isfinite(w) for w in section.guidance):
        raise DmstabError(f"fid_sweep.guidance is {list(section.guidance)}; give finite strengths")
    if any(w != 1.0 for w in section.guidance) and section.guide is None:
        raise DmstabError("fid_sweep.guidance other than 1 needs fid_sweep.guide: a guide file")
    if section.num_images < 2:
        raise DmstabError(f"fid_sweep.num_images is {section.num_images}; must be at least 2")
    if recipe.eval.reference is None:
        raise DmstabError(
            "fid_sweep needs eval.reference: the statistics or images to score against"
        )


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
            raise DmstabError(
                f"{file} carries no σrel: give outputs of dmstab ema-reconstruct (or EDM2's "
                "released files, imported)"
            )
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
    uri: str | None = None,
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
        **({"guide": guide} if guide is not None else {}),
    }
    tags = {TAG_PARENT: str(train_run)} if train_run else {}
    tracker = MlflowTracker.create(
        experiment=experiment, kind="fid-sweep", params=params, tags=tags, uri=uri
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


def _report(sweep: FidSweepResult) -> dict[str, Any]:
    """Each point on stdout, the optima and where the results are on stderr; the summary."""
    for point in sweep.points:
        result(f"σrel {point.sigma_rel:.4f}  guidance {point.guidance:g}  FID {point.fid:.4f}")
    for strength, best in sorted(best_points(sweep.points).items()):
        console.print(
            f"[green]best[/] guidance {strength:g}: FID {best.fid:.4f} at σrel {best.sigma_rel:.4f}"
        )
    console.print(f"  figure {sweep.figure}\n  table  {sweep.table}\n  run    {sweep.run_id}")
    return {
        "run_id": sweep.run_id,
        "table": str(sweep.table),
        "figure": str(sweep.figure),
        "points": [
            {"sigma_rel": p.sigma_rel, "guidance": p.guidance, "fid": p.fid} for p in sweep.points
        ],
    }


def sweep_released(arguments: Sequence[str], out: Path | None = None) -> dict[str, Any]:
    """`dmstab fid-sweep RECIPE [OVERRIDES]` (and `dmstab analyse fid_sweep`): the recipe's
    released files imported (or their imports reused) and swept; the CSV and figure go to
    `out`, else analyses/fid-sweep/RECIPE_NAME."""
    recipe = parse_inputs(arguments).recipe
    if recipe is None:
        raise DmstabError("give a recipe with a fid_sweep: section (and its overrides)")
    section = recipe.analysis(FidSweepConfig)
    if not section.published:
        raise DmstabError(f"recipe {recipe.name} has no fid_sweep: section listing released files")
    models = import_entries(section.published, recipe, "fid_sweep.published")
    guides = import_entries([section.guide] if section.guide else [], recipe, "fid_sweep.guide")
    require_downloaded([*models, *guides])  # a missing download: before anything else
    reference, scoring = Path(str(recipe.eval.reference)), recipe.eval
    check_fid_outputs(reference)
    out_dir = out or ANALYSES_DIR / "fid-sweep" / recipe.name
    require_writable_directory(out_dir, "the sweep's output folder")
    check_scoring(reference, scoring.features, scoring.mode, scoring.inception_weights)
    pipeline = feature_pipeline(scoring, pick_device(recipe.train.device))
    uri = recipe.tracking.uri
    checkpoints = [imported_checkpoint(path, settings, uri) for path, settings in models]
    guide = [str(imported_checkpoint(path, settings, uri)) for path, settings in guides]
    sweep = run_fid_sweep(
        checkpoints,
        reference,
        pipeline,
        num_images=section.num_images,
        guidances=section.guidance,
        guide=guide[0] if guide else None,
        out_dir=out_dir,
        experiment=recipe.tracking.experiment,
        uri=uri,
        callback=SampleProgress("sample"),
    )
    return _report(sweep)


def _as_overrides(options: dict[str, Any]) -> list[str]:
    """The command-line options given beside a recipe, as the overrides of its keys."""
    return [
        f"{key}={json.dumps(value) if isinstance(value, list) else value}"
        for key, value in options.items()
        if value is not None and value != []
    ]


def main(
    ref: Path | None,
    arguments: Sequence[str],
    *,
    num_images: int | None,
    guidances: Sequence[float],
    guide: str | None,
    features: str | None,
    mode: str | None,
    inception_weights: str | None,
    batch_size: int | None,
    out: Path | None,
) -> dict[str, Any]:
    """FID of each reconstructed checkpoint (default: the latest run's) per guidance strength;
    or, given a recipe, of its released files (the options given override its keys)."""
    if any(Path(argument).suffix in RECIPE_SUFFIXES for argument in arguments):
        options = {
            "eval.reference": ref,
            "eval.features": features,
            "eval.mode": mode,
            "eval.inception_weights": inception_weights,
            "eval.batch_size": batch_size,
            "fid_sweep.num_images": num_images,
            "fid_sweep.guidance": list(guidances),
            "fid_sweep.guide": guide,
        }
        return sweep_released([*arguments, *_as_overrides(options)], out)
    if ref is None:
        raise DmstabError("give --ref: the statistics or images to score against (or a recipe)")
    features, mode = features or "inception", mode or "clean"
    config = EvalConfig(
        features=features,  # type: ignore[arg-type]  # feature_pipeline names the allowed ones
        mode=mode,  # type: ignore[arg-type]
        inception_weights=inception_weights,
        batch_size=EvalConfig.batch_size if batch_size is None else batch_size,
    )
    check_fid_outputs(ref)  # the inputs in fid's order, before anything is computed
    paths = [Path(a) for a in arguments] or [
        find_checkpoint(None, None, None).parent / "reconstructed"
    ]
    folder = _output_folder(reconstructed_checkpoints(paths), out)
    require_writable_directory(folder, "the sweep's output folder")
    check_scoring(ref, features, mode, inception_weights)
    device = pick_device("auto")
    pipeline = feature_pipeline(config, device)
    sweep = run_fid_sweep(
        paths,
        ref,
        pipeline,
        num_images=EvalConfig.num_images if num_images is None else num_images,
        guidances=guidances or [1.0],
        guide=guide,
        out_dir=out,
        callback=SampleProgress("sample"),
    )
    return _report(sweep)


ANALYSES.register(
    FidSweepConfig.section, sweep_released, config=FidSweepConfig, check=check_fid_sweep
)
