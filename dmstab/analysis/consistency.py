"""The consistency score of AAAI 2024 Table 1: how alike N models' images are for the same noise.

Eq. 1: C(q) = (1/M) Σ_i (1/(N−1)) Σ_{j≥2} PSNR(q_i1, q_ij), model 1 the reference and image
i of every model sampled from the same seed (the same x_T and per-step noise, see
dmstab.diffusion.sampling.NoiseSource). PSNR is in dB on 8-bit pixel values.

Identical images have MSE 0 and an infinite PSNR. It never enters a mean: PSNR is clamped at a
finite cap, by default the PSNR of one value off by one 8-bit level, 10·log10(255²·C·H·W), the
largest PSNR two different 8-bit images can have. Identical pairs are counted separately.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from dmstab.config import AnalysisSection, Recipe, check_sampler
from dmstab.errors import DmstabError


@dataclass(frozen=True)
class ConsistencyConfig(AnalysisSection):
    """`consistency:` (AAAI Eq. 1, Table 1): N models, `num_images` images each (M).

    `members` lists the group, one string of space-separated overrides of this recipe per model
    ("" = the recipe as it is; "train.seed=1"; "model.channels=64"). The command trains each
    member (or reuses its finished run) and samples all from the same noise (`sample.seed`).
    `published` adds released checkpoints to the group, one string per model: the file's path
    and the settings `dmstab import` needs that the file cannot tell ("models/128x128_diffusion.pt"
    or "tiny.pt data.resolution=16 model.num_heads=2"); each is imported once (or its earlier
    import reused) and sampled with this recipe's `sample` and `consistency` settings.
    `samplers` scores the group once per sampler (() = `sample.sampler` only).
    """

    section: ClassVar[str] = "consistency"

    members: tuple[str, ...] = ()
    """the group: one string of overrides per model, split as a shell would (`"train.seed=1
    model.channel_mult='[1, 2]'"`)"""
    published: tuple[str, ...] = ()
    """released checkpoints in the group: one string per model, the file's path and the
    settings `dmstab import` needs (`"models/128x128_diffusion.pt"`)"""
    num_images: int = 32
    """M, images per model"""
    samplers: tuple[str, ...] = ()
    """score once per sampler (`[]`: `sample.sampler`)"""


def check_consistency(recipe: Recipe) -> None:
    c = recipe.analysis(ConsistencyConfig)
    if c.published and len(c.members) + len(c.published) < 2:
        raise DmstabError(
            f"consistency lists {len(c.members) + len(c.published)} model(s) in members and "
            "published; a group needs at least 2"
        )
    if c.num_images < 1:
        raise DmstabError("consistency.num_images must be at least 1")
    for sampler in c.samplers:
        check_sampler(recipe, sampler, recipe.sample.steps, "consistency.samplers")


def one_level_cap(values_per_image: int) -> float:
    """PSNR (dB) of two 8-bit images that differ by one level in one of `values_per_image` values:
    MSE = 1/P in level², so 10·log10(255²·P); no two different 8-bit images score higher."""
    return 10.0 * math.log10(255.0**2 * values_per_image)


def mean_squared_error(a: Tensor, b: Tensor, *, peak: float = 255.0) -> Tensor:
    """Per-image MSE in float64 over all pixels and channels of two (N, C, H, W) batches.

    Values must lie in [0, peak]: uint8 images, or floats on the same scale (not [−1, 1]).
    """
    for name, batch in (("a", a), ("b", b)):
        if batch.ndim != 4 or batch.numel() == 0:
            raise DmstabError(
                f"images {name} must be a batch (N, C, H, W), got {tuple(batch.shape)}"
            )
        low, high = batch.min().item(), batch.max().item()
        if not 0 <= low <= high <= peak:  # also catches NaN
            raise DmstabError(f"images {name} range over [{low}, {high}]; PSNR needs [0, {peak}]")
    if a.shape != b.shape:
        raise DmstabError(
            f"images to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    difference = a.to(torch.float64) - b.to(torch.float64)
    return difference.square().mean(dim=(1, 2, 3))


def psnr_from_mse(
    mse: Tensor, *, values_per_image: int, peak: float = 255.0, cap: float | None = None
) -> Tensor:
    """10·log10(peak²/MSE) in float64, clamped at `cap` (default ``one_level_cap``); MSE 0 → cap."""
    limit = one_level_cap(values_per_image) if cap is None else cap
    decibels = 10.0 * torch.log10(peak**2 / mse)  # MSE 0 gives +inf, clamped to the cap
    return decibels.clamp(max=limit)


def psnr(a: Tensor, b: Tensor, *, peak: float = 255.0, cap: float | None = None) -> Tensor:
    """Per-image PSNR (N,) in dB, float64, of two (N, C, H, W) batches with values in [0, peak].

    Clamped at `cap`, by default ``one_level_cap(C·H·W)``: identical pairs score exactly the cap.
    Count them with ``(mean_squared_error(a, b) == 0).sum()``.
    """
    mse = mean_squared_error(a, b, peak=peak)
    return psnr_from_mse(mse, values_per_image=a[0].numel(), peak=peak, cap=cap)


@dataclass(frozen=True)
class ConsistencyResult:
    """Eq. 1 and its parts; every PSNR in dB, clamped at `cap`.

    per_pair[j−2, i−1] = PSNR(q_i1, q_ij) (N−1, M), in Eq. 1's 1-based indices; per_seed its
    mean over models (M,); score their mean. identical_pairs of the (N−1)·M pairs in Eq. 1
    have MSE 0 (and score `cap`).
    pairwise[j, k] is the mean over seeds of PSNR(q_ij, q_ik) for every pair of models (N, N),
    symmetric, with NaN on the diagonal (a model is not compared with itself).
    """

    score: float
    per_pair: np.ndarray
    per_seed: np.ndarray
    identical_pairs: int
    pairwise: np.ndarray
    cap: float

    @property
    def num_pairs(self) -> int:
        """(N−1)·M: the PSNRs that Eq. 1 averages."""
        return int(self.per_pair.size)


def consistency_score(
    images: Tensor, *, peak: float = 255.0, cap: float | None = None
) -> ConsistencyResult:
    """AAAI 2024 Eq. 1 for images (N models, M seeds, C, H, W); images[0] is the reference.

    Values as for ``psnr``: uint8, or floats in [0, peak].
    """
    if images.ndim != 5:
        raise DmstabError(
            f"consistency needs images (models, seeds, C, H, W), got {tuple(images.shape)}"
        )
    num_models, num_seeds = images.shape[:2]
    if num_models < 2 or num_seeds < 1:
        raise DmstabError(
            f"consistency needs at least 2 models and 1 seed, got {num_models} and {num_seeds}"
        )
    values_per_image = images[0, 0].numel()
    limit = one_level_cap(values_per_image) if cap is None else cap
    pairwise = np.full((num_models, num_models), np.nan)
    per_pair = np.empty((num_models - 1, num_seeds))
    identical = 0
    for j, k in itertools.combinations(range(num_models), 2):
        mse = mean_squared_error(images[j], images[k], peak=peak)
        scores = (
            psnr_from_mse(mse, values_per_image=values_per_image, peak=peak, cap=limit)
            .cpu()
            .numpy()
        )
        pairwise[j, k] = pairwise[k, j] = scores.mean()
        if j == 0:  # Eq. 1 compares every model with the reference only
            per_pair[k - 1] = scores
            identical += int((mse == 0).sum())
    per_seed = per_pair.mean(axis=0)
    return ConsistencyResult(
        score=float(per_seed.mean()),
        per_pair=per_pair,
        per_seed=per_seed,
        identical_pairs=identical,
        pairwise=pairwise,
        cap=limit,
    )
