"""Scoring images: feature pipelines (Inception, the random-conv proxy, the shape classifier),
reference statistics (a statistics `.npz`, images, or a dataset's, computed once and cached)
and FID / KID / IS of generated features. `dmstab fid` (dmstab.commands.fid) and evaluation
during training (dmstab.train.evaluate) are built from these pieces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmstab.analysis.features import (
    PreprocessedNetwork,
    PytorchFidInception,
    RandomConvFeatures,
    TorchscriptInception,
    extractor_for,
    load_inception,
)
from dmstab.analysis.fid import (
    CountedBatches,
    ImageSource,
    compute_features,
    fid_from_stats,
)
from dmstab.analysis.frechet import FeatureStats, inception_score, kid
from dmstab.analysis.progress import Progress
from dmstab.analysis.shape_classifier import ClassifierConfig, classifier_extractor, classifier_key
from dmstab.atomic import write_atomically
from dmstab.config import FEATURE_NETWORKS, DataConfig, FeatureNetwork, Recipe, load_recipe
from dmstab.data import build_dataset
from dmstab.data.images import IMAGE_SUFFIXES, image_files, nhwc_to_nchw, read_npz_images
from dmstab.errors import DmstabError
from dmstab.plots import to_uint8
from dmstab.reading import not_a, npz_names, read_image

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

    def features(self, images: ImageSource, progress: Progress | None = None) -> torch.Tensor:
        return compute_features(
            images,
            self.extractor,
            device=self.device,
            batch_size=self.batch_size,
            progress=progress,
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


def npz_images(path: Path) -> torch.Tensor:
    return nhwc_to_nchw(read_npz_images(path)[0])


def folder_images(path: Path, batch_size: int) -> CountedBatches:
    """Every image file under `path` (recursively, sorted), at its own size, in batches."""
    files = image_files(path, recursive=True)
    if not files:
        raise DmstabError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    return CountedBatches(_read_batches(path, files, batch_size), len(files))


def _read_batches(path: Path, files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(files), batch_size):
        arrays = [np.asarray(read_image(file)) for file in files[start : start + batch_size]]
        if len({a.shape for a in arrays}) > 1:
            raise DmstabError(f"images under {path} differ in size; FID needs one size")
        yield nhwc_to_nchw(np.stack(arrays))


def _stats_file(path: Path) -> FeatureStats | None:
    """A statistics file (`mu`, `sigma`), or None when the `.npz` holds images instead."""
    has_stats = {"mu", "sigma"} <= set(npz_names(path, "FID reference"))
    return FeatureStats.load(path) if has_stats else None


def dataset_images(data: DataConfig, batch_size: int) -> CountedBatches:
    """The dataset `data` describes, as uint8 (N, 3, H, W) batches in index order."""
    dataset = build_dataset(data)

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(dataset), batch_size):
            indices = torch.arange(start, min(start + batch_size, len(dataset)))
            yield to_uint8(dataset.get_batch(indices)[0])

    return CountedBatches(batches(), len(dataset))


def stats_cache_file(data: DataConfig, key: str) -> Path:
    """The cache file of `data`'s statistics under the feature pipeline named `key`."""
    digest = hashlib.sha256(repr((data, key)).encode()).hexdigest()[:12]
    return stats_cache() / f"{data.name}-{data.resolution}-{key}-{digest}.npz"


def features_cache_file(stats_file: Path) -> Path:
    """Where the features behind the cached statistics `stats_file` are kept (for KID)."""
    return stats_file.with_suffix(".features.npy")


def save_features(features: torch.Tensor, path: Path) -> Path:
    """(N, D) features as a `.npy`, written atomically: float32 when that loses nothing (the
    networks' own precision), else float64."""
    array = features.cpu().numpy()
    narrow = array.astype(np.float32)
    kept = narrow if np.array_equal(narrow, array) else array
    write_atomically(path, lambda handle: np.save(handle, kept, allow_pickle=False))
    return path


def load_features(path: Path, device: torch.device) -> torch.Tensor:
    """Features `save_features` wrote, as float64 on `device` (no pickled object is loaded)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise not_a(path, "features cache", str(error).splitlines()[0]) from None
    if array.ndim != 2:
        raise not_a(path, "features cache", f"shape {array.shape}, not (N, D)")
    return torch.from_numpy(array).to(device, torch.float64)


def _from_features(features: torch.Tensor, keep: bool, cache: Path | None) -> Reference:
    return Reference(FeatureStats.from_features(features), features if keep else None, cache)


def _dataset_reference(
    data: DataConfig, pipeline: FeaturePipeline, keep: bool, progress: Progress | None
) -> Reference:
    """Statistics of a dataset, computed once and cached; with `keep` its features too, cached
    beside them (`features_cache_file`), so KID featurises the dataset once."""
    if pipeline.dataset not in (None, data.name):
        raise DmstabError(
            f"{pipeline.key} features score {pipeline.dataset} data only, not {data.name}"
        )
    cache = stats_cache_file(data, pipeline.key)
    features_cache = features_cache_file(cache)
    if cache.is_file() and not keep:
        return Reference(FeatureStats.load(cache), None, cache)
    if cache.is_file() and features_cache.is_file():
        features = load_features(features_cache, pipeline.device)
        return Reference(FeatureStats.load(cache), features, cache)
    reference = _from_features(
        pipeline.features(dataset_images(data, pipeline.batch_size), progress), keep, cache
    )
    reference.stats.save(cache)
    if reference.features is not None:
        save_features(reference.features, features_cache)
    return reference


def load_reference(
    reference: Path | DataConfig,
    pipeline: FeaturePipeline,
    *,
    with_features: bool = False,
    progress: Progress | None = None,
) -> Reference:
    """Statistics of a stats file, images, a recipe's or a `DataConfig`'s dataset.

    `with_features` keeps the reference features as well (KID compares feature sets);
    `progress(done, total)` follows the reference images through the network.
    """
    if isinstance(reference, DataConfig):
        return _dataset_reference(reference, pipeline, with_features, progress)
    if not reference.exists():
        raise DmstabError(f"FID reference not found: {reference}")
    if reference.is_dir():
        features = pipeline.features(folder_images(reference, pipeline.batch_size), progress)
        return _from_features(features, with_features, None)
    if reference.suffix == ".npz":
        stats = _stats_file(reference)
        if stats is None:
            features = pipeline.features(npz_images(reference), progress)
            return _from_features(features, with_features, None)
        if with_features:
            raise DmstabError("KID needs reference images, not a statistics file")
        return Reference(stats, None, None)
    if reference.suffix in (".yaml", ".yml"):
        return _dataset_reference(load_recipe(reference).data, pipeline, with_features, progress)
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
    from dmstab.data.latents import require_vae

    require_vae(recipe.data, device)
