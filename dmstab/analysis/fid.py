"""The batched FID path: uint8 images -> features -> statistics -> Fréchet distance.

Batches move to `device` once; resizing, the network and the statistics run there, so images
generated on a GPU never leave it. The numbers are clean-fid's: the same preprocessing
(dmstab.analysis.resize), the same networks (dmstab.analysis.features), mean and covariance
as np.mean / np.cov, but float64 throughout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from dmstab.analysis.features import FeatureExtractor
from dmstab.analysis.frechet import FeatureStats, frechet_distance
from dmstab.analysis.progress import Progress, report
from dmstab.errors import DmstabError

DEFAULT_BATCH_SIZE = 250


@dataclass(frozen=True)
class CountedBatches:
    """Image batches read lazily (files, a dataset), and how many images they hold in all."""

    batches: Iterable[torch.Tensor]
    count: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


ImageSource = torch.Tensor | Iterable[torch.Tensor]


def image_count(images: ImageSource) -> int | None:
    """How many images `images` holds, when known before reading them."""
    if isinstance(images, torch.Tensor):
        return images.shape[0]
    return images.count if isinstance(images, CountedBatches) else None


def _checked_images(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DmstabError(
            f"FID scores uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    return images


def image_batches(images: ImageSource, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of at most `batch_size` from one (N, 3, H, W) uint8 tensor or an iterable of them."""
    if batch_size < 1:
        raise DmstabError(f"FID batch size must be >= 1, got {batch_size}")
    chunks = [images] if isinstance(images, torch.Tensor) else images
    for chunk in chunks:
        yield from torch.split(_checked_images(chunk), batch_size)


@torch.inference_mode()
def compute_features(
    images: ImageSource,
    extractor: FeatureExtractor,
    *,
    device: torch.device,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> torch.Tensor:
    """(N, D) float64 features on `device`, in image order; `progress` follows the images when
    their number is known beforehand (a tensor, `CountedBatches`)."""
    total = image_count(images)
    if total is None:
        progress = None
    report(progress, 0, total or 0)
    features, done = [], 0
    for batch in image_batches(images, batch_size):
        features.append(extractor(batch.to(device, non_blocking=True)).to(torch.float64))
        done += batch.shape[0]
        report(progress, done, total or 0)
    if not features:
        raise DmstabError("FID got no images to score")
    return torch.cat(features)


def compute_stats(
    images: ImageSource,
    extractor: FeatureExtractor,
    *,
    device: torch.device,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> FeatureStats:
    """Feature mean and covariance of `images`, as clean-fid computes them."""
    features = compute_features(images, extractor, device=device, batch_size=batch_size)
    return FeatureStats.from_features(features)


def fid_from_stats(
    first: FeatureStats, second: FeatureStats, *, device: torch.device | None = None
) -> float:
    """FID between two sets of images given their feature statistics (linear algebra on device)."""
    return frechet_distance(first.mu, first.sigma, second.mu, second.sigma, device=device)
