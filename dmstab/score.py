"""`dmstab fid`: FID (KID, IS) of generated images against a reference, logged to MLflow.

Images come from an `.npz` (uint8 NHWC under `arr_0`), a folder of image files, or a training
run / checkpoint (sampled with its recipe's sampler, kept in memory). The reference is a
statistics `.npz` (`mu`, `sigma`), images (`.npz` or folder), a recipe or a `DataConfig`, whose
dataset's statistics are computed once and cached. The Inception weights file is checked
before anything else runs. Evaluation during training (dmstab.evaluate) reuses these pieces.
Under `torchrun` the ranks share the sampling; rank 0 alone scores and logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmstab.analysis.features import (
    PreprocessedNetwork,
    PytorchFidInception,
    RandomConvFeatures,
    TorchscriptInception,
    extractor_for,
    load_inception,
)
from dmstab.analysis.fid import ImageSource, compute_features, fid_from_stats
from dmstab.analysis.frechet import FeatureStats, inception_score, kid
from dmstab.analysis.shape_classifier import ClassifierConfig, classifier_extractor, classifier_key
from dmstab.data import build_dataset
from dmstab.data.images import IMAGE_SUFFIXES, image_files, nhwc_to_nchw, read_npz_images
from dmstab.devices import pick_device
from dmstab.errors import DmstabError
from dmstab.generate import generate_for_recipe
from dmstab.networks import (
    find_checkpoint,
    load_guide,
    network_from_state,
    stored_recipe,
)
from dmstab.plots import to_uint8
from dmstab.recipe import FEATURE_NETWORKS, DataConfig, FeatureNetwork, Recipe, load_recipe
from dmstab.tracking import TAG_PARENT, MlflowTracker, tracked_run
from dmstab.train.checkpoint import load_checkpoint
from dmstab.train.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    init_distributed,
    rank_device,
)

PAPER_NUM_IMAGES = 50_000  # both papers score 50k generated images


def stats_cache() -> Path:
    """Where dataset statistics are cached (read at call time, so HOME can move)."""
    return Path.home() / ".cache" / "dmstab" / "stats"


@dataclass(frozen=True)
class FeaturePipeline:
    """A feature extractor on a device; `key` names it in the statistics cache; `dataset`, when
    set, is the only dataset whose images the network was trained to understand."""

    extractor: PreprocessedNetwork
    device: torch.device
    batch_size: int
    key: str
    dataset: str | None = None

    def features(self, images: ImageSource) -> torch.Tensor:
        return compute_features(
            images, self.extractor, device=self.device, batch_size=self.batch_size
        )

    def inception_score(self, features: torch.Tensor) -> float:
        """Mean IS over the usual ten splits (Salimans et al.), from the Inception classifier."""
        network = self.extractor.network
        if not isinstance(network, PytorchFidInception | TorchscriptInception):
            raise DmstabError("Inception Score needs the Inception network, not a stand-in")
        return inception_score(network.class_logits(features))[0]


def inception_pipeline(
    mode: str, weights: str | None, device: torch.device, batch_size: int
) -> FeaturePipeline:
    """clean-fid's Inception for `mode`; the one-line missing-weights error comes from here."""
    network = load_inception(mode, weights, device)
    return FeaturePipeline(extractor_for(network, mode), device, batch_size, mode)


def network_pipeline(
    features: FeatureNetwork, mode: str, weights: str | None, device: torch.device, batch_size: int
) -> FeaturePipeline:
    """Inception from its local file per `mode`, the seeded random-conv stand-in (resized as
    `mode` resizes), or the synthetic-shape classifier (native resolution, `mode` unused)."""
    if features == "inception":
        return inception_pipeline(mode, weights, device, batch_size)
    if features == "random_conv":
        extractor = extractor_for(RandomConvFeatures().to(device), mode)
        return FeaturePipeline(extractor, device, batch_size, f"random_conv-{mode}")
    if features == "classifier":
        config = ClassifierConfig()
        extractor = classifier_extractor(config)
        key = classifier_key(config)
        return FeaturePipeline(extractor, device, batch_size, key, dataset="synthetic")
    raise DmstabError(f"features {features!r}: choose one of {', '.join(FEATURE_NETWORKS)}")


@dataclass(frozen=True)
class Reference:
    """Reference statistics, its features when KID needs them, and the cache file if any."""

    stats: FeatureStats
    features: torch.Tensor | None
    cache: Path | None


@dataclass(frozen=True)
class Score:
    fid: float
    kid: float | None
    inception_score: float | None
    num_images: int
    run_id: str


def _npz_images(path: Path) -> torch.Tensor:
    return nhwc_to_nchw(read_npz_images(path)[0])


def _folder_images(path: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """Every image file under `path` (recursively, sorted), at its own size, in batches."""
    files = image_files(path, recursive=True)
    if not files:
        raise DmstabError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    for start in range(0, len(files), batch_size):
        arrays = []
        for file in files[start : start + batch_size]:
            try:
                with Image.open(file) as image:
                    arrays.append(np.asarray(image.convert("RGB")))
            except OSError:
                raise DmstabError(f"cannot read image {file}") from None
        if len({a.shape for a in arrays}) > 1:
            raise DmstabError(f"images under {path} differ in size; FID needs one size")
        yield nhwc_to_nchw(np.stack(arrays))


def _stats_file(path: Path) -> FeatureStats | None:
    """A statistics file (`mu`, `sigma`), or None when the `.npz` holds images instead."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            has_stats = "mu" in archive and "sigma" in archive
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # ValueError: pickled data
        raise DmstabError(f"{path} is not a readable .npz of statistics or images") from None
    return FeatureStats.load(path) if has_stats else None


def dataset_images(data: DataConfig, batch_size: int) -> Iterator[torch.Tensor]:
    """The dataset `data` describes, as uint8 (N, 3, H, W) batches in index order."""
    dataset = build_dataset(data)
    for start in range(0, len(dataset), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(dataset)))
        yield to_uint8(dataset.get_batch(indices)[0])


def stats_cache_file(data: DataConfig, key: str) -> Path:
    """The cache file of `data`'s statistics under the feature pipeline named `key`."""
    digest = hashlib.sha256(repr((data, key)).encode()).hexdigest()[:12]
    return stats_cache() / f"{data.name}-{data.resolution}-{key}-{digest}.npz"


def _from_features(features: torch.Tensor, keep: bool, cache: Path | None) -> Reference:
    return Reference(FeatureStats.from_features(features), features if keep else None, cache)


def _dataset_reference(data: DataConfig, pipeline: FeaturePipeline, keep: bool) -> Reference:
    """Statistics of a dataset, computed once and cached; its features only when `keep`."""
    if pipeline.dataset not in (None, data.name):
        raise DmstabError(
            f"{pipeline.key} features score {pipeline.dataset} data only, not {data.name}"
        )
    cache = stats_cache_file(data, pipeline.key)
    if cache.is_file() and not keep:
        return Reference(FeatureStats.load(cache), None, cache)
    reference = _from_features(
        pipeline.features(dataset_images(data, pipeline.batch_size)), keep, cache
    )
    reference.stats.save(cache)
    return reference


def load_reference(
    reference: Path | DataConfig, pipeline: FeaturePipeline, *, with_features: bool = False
) -> Reference:
    """Statistics of a stats file, images, a recipe's or a `DataConfig`'s dataset.

    `with_features` keeps the reference features as well (KID compares feature sets).
    """
    if isinstance(reference, DataConfig):
        return _dataset_reference(reference, pipeline, with_features)
    if not reference.exists():
        raise DmstabError(f"FID reference not found: {reference}")
    if reference.is_dir():
        features = pipeline.features(_folder_images(reference, pipeline.batch_size))
        return _from_features(features, with_features, None)
    if reference.suffix == ".npz":
        stats = _stats_file(reference)
        if stats is None:
            return _from_features(pipeline.features(_npz_images(reference)), with_features, None)
        if with_features:
            raise DmstabError("KID needs reference images, not a statistics file")
        return Reference(stats, None, None)
    if reference.suffix in (".yaml", ".yml"):
        return _dataset_reference(load_recipe(reference).data, pipeline, with_features)
    raise DmstabError(f"FID reference {reference}: expected a folder, an .npz or a recipe .yaml")


def image_metrics(
    features: torch.Tensor,
    reference: Reference,
    pipeline: FeaturePipeline,
    names: Collection[str],
) -> dict[str, float]:
    """`fid`, `kid` and `is` (those in `names`) of generated images' features."""
    metrics: dict[str, float] = {}
    if "fid" in names:
        own = FeatureStats.from_features(features)
        metrics["fid"] = fid_from_stats(own, reference.stats, device=pipeline.device)
    if "kid" in names:
        assert reference.features is not None, "load_reference(with_features=True) for KID"
        metrics["kid"] = kid(features, reference.features)
    if "is" in names:
        metrics["is"] = pipeline.inception_score(features)
    return metrics


def require_images(recipe: Recipe, device: torch.device) -> None:
    """FID scores RGB images: a latent-space model's samples go through the SD VAE decoder,
    so its absence (optional extra, local weights) stops scoring before any sampling."""
    if recipe.data.name == "latents":
        from dmstab.data.latents import load_vae

        load_vae(device)


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
        return _folder_images(path, batch_size), {"images": str(path.resolve())}, None
    if path.suffix == ".npz":
        if not path.is_file():
            raise DmstabError(f"images to score not found: {path}")
        return _npz_images(path), {"images": str(path.resolve())}, None
    if not path.exists() and path.suffix != ".pt" and (path.suffix or len(path.parts) > 1):
        raise DmstabError(
            f"images to score not found: {path} (expected a folder, an .npz, a checkpoint .pt "
            "or a training run id)"
        )
    sampled, checkpoint, run_id = sampled_images(
        images, num_images, device, callback, context=context
    )
    return sampled, {"images": images, "checkpoint": str(checkpoint.resolve())}, run_id


def score(
    images: str | Path,
    reference: Path,
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
) -> tuple[Score, Path | None] | None:
    """FID of `images` (sampled first when a run or checkpoint) against `reference`.

    Logged as a run of kind `fid`, a child of `parent_run` or of the sampled training run.
    Under `torchrun` the other ranks only help sample, and return None.
    """
    if with_is and features != "inception":
        raise DmstabError(f"the Inception Score needs --features inception, not {features}")
    device = device or pick_device("auto")
    context = init_distributed(device.type)
    device = rank_device(device, context)
    if not context.is_main:
        _images_to_score(str(images), num_images, batch_size, device, None, context)
        return None
    pipeline = network_pipeline(features, mode, inception_weights, device, batch_size)  # first
    ref = load_reference(reference, pipeline, with_features=with_kid)  # before any sampling
    source, params, sampled_run = _images_to_score(
        str(images), num_images, batch_size, device, callback, context
    )
    generated = pipeline.features(source)
    names = [name for name, wanted in (("fid", True), ("kid", with_kid), ("is", with_is)) if wanted]
    metrics = image_metrics(generated, ref, pipeline, names)
    params |= {"reference": str(reference.resolve()), "mode": mode, "features": features}
    run_id = _log(params, metrics, len(generated), experiment, parent_run or sampled_run)
    result = Score(metrics["fid"], metrics.get("kid"), metrics.get("is"), len(generated), run_id)
    return result, ref.cache


def _log(
    params: dict[str, str],
    metrics: dict[str, float],
    count: int,
    experiment: str,
    parent_run: str | None,
) -> str:
    tags = {TAG_PARENT: parent_run} if parent_run else {}
    tracker = MlflowTracker.create(experiment=experiment, kind="fid", params=params, tags=tags)
    assert tracker.run_id is not None
    with tracked_run(tracker):
        tracker.log_metrics({**metrics, "num_images": float(count)}, 0)
    return tracker.run_id
