"""`dmstab sample`: images from a checkpoint or a training run, logged as a child run.

Under `torchrun` every rank samples its share of the images; rank 0 alone owns the MLflow
run and writes the `.npz` and the grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmstab.atomic import require_writable_directory
from dmstab.checkpoint import load_checkpoint
from dmstab.config import Recipe
from dmstab.console import SampleProgress, console, result
from dmstab.devices import pick_device
from dmstab.distributed import init_distributed, rank_device
from dmstab.errors import DmstabError
from dmstab.models.generate import generate_for_recipe, sampler_label, write_samples
from dmstab.tracking import (
    TAG_PARENT,
    MlflowTracker,
    NullTracker,
    Tracker,
    check_store_writable,
    tracked_run,
)
from dmstab.train.restore import (
    find_checkpoint,
    latest_checkpoint,
    load_guide,
    network_from_state,
    stored_recipe,
)

SAMPLES_DIR = Path("samples")  # each run's images go to samples/RUN_ID unless --out says


@dataclass(frozen=True)
class SampleResult:
    run_id: str
    npz: Path
    grid: Path
    count: int


def sample(
    source: str | None,
    overrides: Sequence[str] = (),
    *,
    experiment: str | None = None,
    uri: str | None = None,
    out_dir: Path | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> SampleResult | None:
    """The images' files and run on rank 0 (or a single process); None on the other ranks."""
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise DmstabError(f"--out {out_dir} is a file; give a folder for the images")
    checkpoint = find_checkpoint(source, experiment, uri)
    state = load_checkpoint(checkpoint)
    recipe = stored_recipe(state, checkpoint, overrides)
    device = pick_device(recipe.train.device)
    context = init_distributed(device.type)
    device = rank_device(device, context)
    context.decide_together(lambda: _check_writable(recipe, out_dir) if context.is_main else None)
    num_classes = int(state.get("num_classes", 0))
    model = network_from_state(state, recipe, use_ema=recipe.sample.use_ema, source=checkpoint)
    model.to(device)
    train_run = state.get("run_id")
    tags = {TAG_PARENT: str(train_run)} if train_run else {}
    started = context.from_main(  # a store that fails here stops every rank, not rank 0 alone
        lambda: MlflowTracker.start(recipe, kind="sample", extra_tags=tags)
    )
    tracker: Tracker = started if started is not None else NullTracker()
    with tracked_run(tracker):
        images = generate_for_recipe(
            model,
            recipe,
            dataset_classes=num_classes,
            device=device,
            callback=callback if context.is_main else None,
            guide=load_guide(recipe, device),
            context=context,
        )
        if not context.is_main:
            return None
        assert tracker.run_id is not None
        directory = out_dir or SAMPLES_DIR / tracker.run_id
        stem = f"{sampler_label(recipe, recipe.sample)}_seed{recipe.sample.seed}"
        npz, grid = write_samples(images, directory, stem)
        step = int(state.get("step", 0))
        tracker.log_metrics({"sample/num_images": float(len(images))}, step)
        tracker.log_artifact(grid, "samples")
        tracker.log_artifact(npz, "samples")
        tracker.set_tags({"dmstab.checkpoint": str(checkpoint.resolve()), "dmstab.step": str(step)})
    return SampleResult(tracker.run_id, npz, grid, len(images))


def _check_writable(recipe: Recipe, out_dir: Path | None) -> None:
    """The store and the images' folder take files, checked before the network is built."""
    check_store_writable(recipe.tracking.uri)
    require_writable_directory(out_dir or SAMPLES_DIR, "the samples folder")


def main(
    source: str | None, overrides: Sequence[str], *, experiment: str | None, out: Path | None
) -> dict[str, Any] | None:
    """`dmstab sample [SOURCE] [OVERRIDES]`: a first argument with '=' is an override. stdout:
    the .npz of the images (what `dmstab fid` scores); returned: the summary `--json` prints."""
    if source is not None and "=" in source:
        overrides, source = [source, *overrides], None
    which = None  # said once the inputs are accepted: a refusal stays one line
    if source is None:
        checkpoint, which = latest_checkpoint(experiment, None)
        source = str(checkpoint)
    made = sample(
        source, overrides, experiment=experiment, out_dir=out, callback=SampleProgress("sample")
    )
    if made is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    if which is not None:
        console.print(f"sampled {which}: {source}", highlight=False)
    console.print(f"[green]done[/] {made.count} images, run {made.run_id}")
    console.print(f"  images  {made.npz}")
    console.print(f"  grid    {made.grid}")
    result(str(made.npz))
    return {
        "run_id": made.run_id,
        "images": str(made.npz),
        "grid": str(made.grid),
        "count": made.count,
    }
