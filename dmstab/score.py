"""`dmstab fid`: FID (and KID) of generated images against a reference, logged to MLflow.

Images come from an `.npz` (uint8 NHWC under `arr_0`), a folder of image files, or a training
run / checkpoint (sampled with its recipe's sampler). The reference is a statistics `.npz`
(`mu`, `sigma`), images (`.npz` or folder) or a recipe, whose dataset's statistics are computed
once and cached. The Inception weights file is checked before anything else runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmstab.analysis.features import extractor_for, inception_weights_path, load_inception
from dmstab.analysis.fid import compute_features, compute_stats, fid_from_stats
from dmstab.analysis.frechet import FeatureStats, kid
from dmstab.data import build_dataset
from dmstab.data.images import IMAGE_SUFFIXES, image_files, nhwc_to_nchw, read_npz_images
from dmstab.errors import DmstabError
from dmstab.plots import to_uint8
from dmstab.recipe import load_recipe
from dmstab.tracking import TAG_PARENT, MlflowTracker, tracked_run

STATS_CACHE = Path.home() / ".cache" / "dmstab" / "stats"


@dataclass(frozen=True)
class Score:
    fid: float
    kid: float | None
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
    with np.load(path, allow_pickle=False) as archive:
        has_stats = "mu" in archive and "sigma" in archive
    return FeatureStats.load(path) if has_stats else None


def _recipe_images(path: Path, batch_size: int) -> Iterator[torch.Tensor]:
    dataset = build_dataset(load_recipe(path).data)
    for start in range(0, len(dataset), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(dataset)))
        yield to_uint8(dataset.get_batch(indices)[0])


def reference_stats(
    reference: Path,
    stats_of: Callable[[torch.Tensor | Iterator[torch.Tensor]], FeatureStats],
    mode: str,
    batch_size: int,
) -> tuple[FeatureStats, Path | None]:
    """Statistics of the reference; a recipe's are cached (and the cache path returned)."""
    if not reference.exists():
        raise DmstabError(f"FID reference not found: {reference}")
    if reference.is_dir():
        return stats_of(_folder_images(reference, batch_size)), None
    if reference.suffix == ".npz":
        stats = _stats_file(reference)
        return (stats, None) if stats is not None else (stats_of(_npz_images(reference)), None)
    if reference.suffix in (".yaml", ".yml"):
        data = load_recipe(reference).data
        key = hashlib.sha256(repr((data, mode)).encode()).hexdigest()[:12]
        cache = STATS_CACHE / f"{data.name}-{data.resolution}-{mode}-{key}.npz"
        if cache.is_file():
            return FeatureStats.load(cache), cache
        stats = stats_of(_recipe_images(reference, batch_size))
        return stats, stats.save(cache)
    raise DmstabError(f"FID reference {reference}: expected a folder, an .npz or a recipe .yaml")


def image_source(images: Path, batch_size: int) -> torch.Tensor | Iterator[torch.Tensor]:
    if images.is_dir():
        return _folder_images(images, batch_size)
    if images.suffix == ".npz" and images.is_file():
        return _npz_images(images)
    raise DmstabError(f"images to score not found or not a folder/.npz: {images}")


def score(
    images: Path,
    reference: Path,
    *,
    mode: str = "clean",
    inception_weights: str | None = None,
    with_kid: bool = False,
    batch_size: int = 250,
    experiment: str = "fid",
    parent_run: str | None = None,
    device: torch.device | None = None,
) -> tuple[Score, Path | None]:
    """FID of `images` against `reference`; logged as a run of kind `fid`."""
    inception_weights_path(mode, inception_weights)  # fail before any work if weights are absent
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = extractor_for(load_inception(mode, inception_weights, device), mode)

    def features(source: torch.Tensor | Iterator[torch.Tensor]) -> torch.Tensor:
        return compute_features(source, extractor, device=device, batch_size=batch_size)

    def stats_of(source: torch.Tensor | Iterator[torch.Tensor]) -> FeatureStats:
        return compute_stats(source, extractor, device=device, batch_size=batch_size)

    generated = features(image_source(images, batch_size))
    ref_stats, cache = reference_stats(reference, stats_of, mode, batch_size)
    fid = fid_from_stats(FeatureStats.from_features(generated), ref_stats, device=device)
    kid_value = None
    if with_kid:
        if reference.suffix == ".npz" and _stats_file(reference) is not None:
            raise DmstabError("KID needs reference images, not a statistics file")
        ref_source = (
            _recipe_images(reference, batch_size)
            if reference.suffix in (".yaml", ".yml")
            else image_source(reference, batch_size)
        )
        kid_value = kid(generated, features(ref_source))
    return _log(
        images, reference, mode, fid, kid_value, len(generated), experiment, parent_run
    ), cache


def _log(
    images: Path,
    reference: Path,
    mode: str,
    fid: float,
    kid_value: float | None,
    count: int,
    experiment: str,
    parent_run: str | None,
) -> Score:
    params = {"images": str(images.resolve()), "reference": str(reference.resolve()), "mode": mode}
    tags = {TAG_PARENT: parent_run} if parent_run else {}
    tracker = MlflowTracker.create(experiment=experiment, kind="fid", params=params, tags=tags)
    assert tracker.run_id is not None
    with tracked_run(tracker):
        metrics = {"fid": fid, "num_images": float(count)}
        if kid_value is not None:
            metrics["kid"] = kid_value
        tracker.log_metrics(metrics, 0)
    return Score(fid, kid_value, count, tracker.run_id)
