"""`dmstab fid`: FID (KID, IS) of generated images against a reference, logged to MLflow.

Images come from an `.npz` (uint8 NHWC under `arr_0`), a folder of image files, or a training
run / checkpoint (sampled with its recipe's sampler, kept in memory). The reference is a
statistics `.npz` (`mu`, `sigma`), images (`.npz` or folder), a recipe or a `DataConfig`, whose
dataset's statistics are computed once and cached (dmstab.analysis.scoring). The inputs are
checked before anything is computed, in this order: the MLflow store and the statistics cache
can be written, the images exist, the reference exists, the Inception weights are there. Under
`torchrun` the ranks share the sampling; rank 0 alone scores and logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dmstab.analysis.features import inception_weights_path
from dmstab.analysis.fid import ImageSource
from dmstab.analysis.progress import Progress
from dmstab.analysis.scoring import (
    PAPER_NUM_IMAGES,
    FeaturePipeline,
    Reference,
    Score,
    folder_images,
    image_metrics,
    load_reference,
    network_pipeline,
    npz_images,
    require_images,
    stats_cache,
)
from dmstab.atomic import require_writable_directory
from dmstab.checkpoint import load_checkpoint
from dmstab.config import DataConfig, EvalConfig, FeatureNetwork, Recipe
from dmstab.console import CountedProgress, SampleProgress, console, result
from dmstab.data.images import IMAGE_SUFFIXES, image_files, read_npz_images
from dmstab.devices import pick_device
from dmstab.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    init_distributed,
    rank_device,
)
from dmstab.errors import DmstabError
from dmstab.models.generate import generate_for_recipe
from dmstab.reading import require_file
from dmstab.tracking import TAG_PARENT, MlflowTracker, check_store_writable, tracked_run
from dmstab.train.restore import (
    find_checkpoint,
    latest_checkpoint,
    load_guide,
    network_from_state,
    stored_recipe,
)


def sampled_images(
    source: str,
    num_images: int,
    device: torch.device,
    callback: Callable[[int, int], None] | None = None,
    overrides: Sequence[str] = (),
    context: DistributedContext = SINGLE_PROCESS,
) -> tuple[torch.Tensor, Path, str | None]:
    """`num_images` images from a checkpoint or training run with its recipe's sampler
    (`overrides`: sampling keys such as `sample.guidance=2`, as `dmstab sample` takes them),
    shared out over the ranks of `context` and gathered on each.

    Returns the images, the checkpoint and the training run it belongs to.
    """
    if num_images < 2:
        raise DmstabError(f"the number of images to sample must be >= 2, got {num_images}")
    checkpoint = find_checkpoint(source, None, None)
    state = load_checkpoint(checkpoint)
    recipe = stored_recipe(state, checkpoint, overrides)
    require_images(recipe, device)
    use_ema = recipe.sample.use_ema
    model = network_from_state(state, recipe, use_ema=use_ema, source=checkpoint).to(device)
    images = generate_for_recipe(
        model,
        recipe,
        dataset_classes=int(state.get("num_classes", 0)),
        device=device,
        callback=callback,
        sample=dataclasses.replace(recipe.sample, num_images=num_images),
        guide=load_guide(recipe, device),
        context=context,
    )
    run_id = state.get("run_id")
    return images, checkpoint, str(run_id) if run_id else None


def _images_to_score(
    images: str,
    num_images: int,
    batch_size: int,
    device: torch.device,
    callback: Callable[[int, int], None] | None,
    context: DistributedContext = SINGLE_PROCESS,
) -> tuple[ImageSource, dict[str, str], str | None]:
    """The images, their description for the run's params, and the training run they come from."""
    path = Path(images)
    if path.is_dir():
        return folder_images(path, batch_size), {"images": str(path.resolve())}, None
    if path.suffix == ".npz":
        return npz_images(path), {"images": str(path.resolve())}, None
    sampled, checkpoint, run_id = sampled_images(
        images, num_images, device, callback, context=context
    )
    return sampled, {"images": images, "checkpoint": str(checkpoint.resolve())}, run_id


def check_images(images: str) -> None:
    """The images to score are there and readable: a folder holding image files, an `.npz`,
    or the checkpoint of a model (a `.pt`, a run directory or a training run id)."""
    path = Path(images)
    if path.is_dir():
        if not image_files(path, recursive=True):
            raise DmstabError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
        return
    if path.suffix == ".npz":
        require_file(path, "images to score")
        read_npz_images(path)  # in full, checked: scoring reads it again after the reference
        return
    if not path.exists() and path.suffix != ".pt" and (path.suffix or len(path.parts) > 1):
        raise DmstabError(
            f"images to score not found: {path} (expected a folder, an .npz, a checkpoint .pt "
            "or a training run id)"
        )
    load_checkpoint(find_checkpoint(images, None, None), mmap=True)  # mapped: sampling reads it


def check_scoring(
    reference: Path | DataConfig, features: str, mode: str, weights: str | None
) -> None:
    """The reference is there and the feature network's weights are (Inception: a local file),
    checked before the network is built or any statistics are computed."""
    if isinstance(reference, Path) and not reference.exists():
        raise DmstabError(f"FID reference not found: {reference}")
    if features == "inception":
        inception_weights_path(mode, weights)


def check_fid_outputs(reference: Path | DataConfig) -> None:
    """What scoring writes: its MLflow run, and a dataset reference's cached statistics."""
    check_store_writable(None)
    if isinstance(reference, DataConfig) or reference.suffix in (".yaml", ".yml"):
        require_writable_directory(stats_cache(), "the statistics cache")


def _check_inputs(
    images: str,
    reference: Path | DataConfig,
    features: str,
    mode: str,
    weights: str | None,
    context: DistributedContext,
) -> None:
    """Every user input, before anything is computed, in the order a user fixes them: where
    the score goes, the images to score, the reference, the feature network's weights. Every
    rank samples, so each checks the images; the rest is rank 0's alone."""
    if context.is_main:
        check_fid_outputs(reference)
    check_images(images)
    if context.is_main:
        check_scoring(reference, features, mode, weights)


def _feature_reference(
    features: FeatureNetwork,
    mode: str,
    weights: str | None,
    device: torch.device,
    batch_size: int,
    reference: Path | DataConfig,
    with_kid: bool,
    progress: Progress | None,
) -> tuple[FeaturePipeline, Reference]:
    """The feature network and the reference's statistics (computed and cached for a recipe)."""
    pipeline = network_pipeline(features, mode, weights, device, batch_size)
    return pipeline, load_reference(reference, pipeline, with_features=with_kid, progress=progress)


def score(
    images: str | Path,
    reference: Path | DataConfig,
    *,
    mode: str = "clean",
    features: FeatureNetwork = "inception",
    inception_weights: str | None = None,
    with_kid: bool = False,
    with_is: bool = False,
    num_images: int = PAPER_NUM_IMAGES,
    batch_size: int = 250,
    experiment: str = "fid",
    parent_run: str | None = None,
    device: torch.device | None = None,
    callback: Callable[[int, int], None] | None = None,
    reference_progress: Progress | None = None,
    features_progress: Progress | None = None,
) -> tuple[Score, Path | None] | None:
    """FID of `images` (sampled first when a run or checkpoint) against `reference`;
    `callback` follows the sampling steps, the progresses the images through the network.

    Logged as a run of kind `fid`, a child of `parent_run` or of the sampled training run.
    Under `torchrun` the other ranks only help sample, and return None.
    """
    if with_is and features != "inception":
        raise DmstabError(f"the Inception Score needs --features inception, not {features}")
    device = device or pick_device("auto")
    context = init_distributed(device.type)
    device = rank_device(device, context)
    context.decide_together(  # every rank exits 2 at once when an input is wrong
        lambda: _check_inputs(str(images), reference, features, mode, inception_weights, context)
    )
    prepared = context.from_main(  # the other ranks wait here, and hear when it fails
        lambda: _feature_reference(
            features,
            mode,
            inception_weights,
            device,
            batch_size,
            reference,
            with_kid,
            reference_progress,
        )
    )
    source, params, sampled_run = _images_to_score(
        str(images), num_images, batch_size, device, callback, context
    )
    if prepared is None:  # a torchrun rank other than 0: it only helped sample
        return None
    pipeline, ref = prepared
    generated = pipeline.features(source, features_progress)
    names = [name for name, wanted in (("fid", True), ("kid", with_kid), ("is", with_is)) if wanted]
    metrics = image_metrics(generated, ref, pipeline, names)
    params |= {"reference": _describe(reference), "mode": mode, "features": features}
    run_id = _log(params, metrics, len(generated), experiment, parent_run or sampled_run)
    result = Score(metrics["fid"], metrics.get("kid"), metrics.get("is"), len(generated), run_id)
    return result, ref.cache


def _describe(reference: Path | DataConfig) -> str:
    if isinstance(reference, Path):
        return str(reference.resolve())
    return f"{reference.name} training set ({reference.resolution}px)"


def _model_recipe(images: str) -> Recipe | None:
    """The training recipe of the model to sample, or None for images (a folder or an .npz)."""
    path = Path(images)
    if path.is_dir() or path.suffix == ".npz":
        return None
    check_images(images)
    checkpoint = find_checkpoint(images, None, None)
    return stored_recipe(load_checkpoint(checkpoint, mmap=True), checkpoint)


def _log(
    params: dict[str, str],
    metrics: dict[str, float],
    count: int,
    experiment: str,
    parent_run: str | None,
) -> str:
    tags = {TAG_PARENT: parent_run} if parent_run else {}
    scored = Path(params.get("checkpoint") or params["images"]).name  # the .npz, .pt or run id
    tracker = MlflowTracker.create(
        experiment=experiment, kind="fid", params=params, tags=tags, run_name=f"fid·{scored}"
    )
    assert tracker.run_id is not None
    with tracked_run(tracker):
        tracker.log_metrics({**metrics, "num_images": float(count)}, 0)
    return tracker.run_id


def main(
    images: str | None,
    ref: Path | None,
    *,
    mode: str | None,
    features: str | None,
    inception_weights: str | None,
    with_kid: bool,
    with_is: bool,
    num_images: int | None,
    batch_size: int,
    experiment: str,
    parent: str | None,
) -> dict[str, Any] | None:
    """Score `images` against `ref` and print FID (KID, IS) on stdout; returned: the summary
    `--json` prints (None on torchrun ranks other than 0).

    A model (the latest run's checkpoint when `images` is None) is scored as its recipe's
    `eval:` block says where an option is not given: reference (the training set when
    `eval.reference` is null), feature network, mode, weights and number of images.
    """
    which = None  # said once the inputs are accepted: a refusal stays one line
    if images is None:
        checkpoint, which = latest_checkpoint(None, None)
        images = str(checkpoint)
    recipe = _model_recipe(images) if None in (ref, mode, features, num_images) else None
    if recipe is None and ref is None:
        raise DmstabError(f"give --ref to score {images}: only a model's recipe names one")
    ev = recipe.eval if recipe is not None else EvalConfig()
    reference: Path | DataConfig
    if ref is not None:
        reference = ref
    elif ev.reference:
        reference = Path(ev.reference).expanduser()
    else:
        assert recipe is not None
        reference = recipe.data
    scored = score(
        images,
        reference,
        mode=ev.mode if mode is None else mode,
        features=ev.features if features is None else features,  # type: ignore[arg-type]  # checked by `score`
        inception_weights=inception_weights or ev.inception_weights,
        with_kid=with_kid,
        with_is=with_is,
        num_images=ev.num_images if num_images is None else num_images,
        batch_size=batch_size,
        experiment=experiment,
        parent_run=parent,
        callback=SampleProgress("sample"),
        reference_progress=CountedProgress("reference features"),
        features_progress=CountedProgress("features"),
    )
    if scored is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    outcome, cache = scored
    if which is not None:
        console.print(f"scored {which}: {images}", highlight=False)
    if cache is not None:
        console.print(f"  reference statistics cached at {cache}")
    kid_text = f"  KID {outcome.kid:.5f}" if outcome.kid is not None else ""
    is_text = f"  IS {outcome.inception_score:.3f}" if outcome.inception_score is not None else ""
    result(
        f"FID {outcome.fid:.4f}{kid_text}{is_text}  ({outcome.num_images} images, "
        f"run {outcome.run_id})"
    )
    return {
        "run_id": outcome.run_id,
        "fid": outcome.fid,
        "kid": outcome.kid,
        "is": outcome.inception_score,
        "num_images": outcome.num_images,
        "reference_cache": None if cache is None else str(cache),
    }
