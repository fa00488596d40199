"""Scores computed from image features: Fréchet distance (FID), KID and Inception Score.

`FeatureStats` (feature mean and covariance) are what FID needs of a set of images; they are
saved as `.npz` with keys `mu` and `sigma`, the layout clean-fid's custom statistics, EDM's
reference statistics and guided-diffusion's reference batches share.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dmstab.atomic import write_atomically
from dmstab.errors import DmstabError
from dmstab.reading import read_npz

STATS_KIND = "FID statistics file"

Array = npt.NDArray[np.float64]

KID_SUBSETS = 100  # clean-fid's kernel_distance defaults
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3  # polynomial kernel (x·y / d + 1)^3, as clean-fid and Bińkowski et al.
IS_SPLITS = 10  # the Inception Score's usual ten splits (Salimans et al.)


def _checked_moments(mu: Array, sigma: Array, source: str) -> tuple[Array, Array]:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise DmstabError(
            f"{source}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DmstabError(f"{source}: mu and sigma must be finite")
    return mu, sigma


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of N images' features, in float64."""

    mu: Array
    sigma: Array
    num_images: int | None = None  # files written by other tools do not record it

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStats:
        """Mean and unbiased covariance (np.cov's, as clean-fid uses) of (N, D) features."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise DmstabError(
                f"statistics need at least 2 feature rows, got {tuple(features.shape)}"
            )
        values = features.to(torch.float64)
        mu = values.mean(dim=0)
        centred = values - mu
        sigma = centred.T @ centred / (values.shape[0] - 1)
        return cls(mu.cpu().numpy(), sigma.cpu().numpy(), int(values.shape[0]))

    def save(self, path: Path) -> Path:
        """Write `mu`, `sigma` (and `num_images` when known) to an uncompressed `.npz`,
        atomically: a failed or killed write leaves the file that was there."""
        arrays: dict[str, Any] = {"mu": self.mu, "sigma": self.sigma}
        if self.num_images is not None:
            arrays["num_images"] = np.int64(self.num_images)
        write_atomically(path, lambda handle: np.savez(handle, **arrays))
        return path

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        """Statistics from dmstab, clean-fid custom stats, EDM or guided-diffusion `.npz` files."""
        arrays = read_npz(path, STATS_KIND, required=("mu", "sigma"), optional=("num_images",))
        mu, sigma = _checked_moments(arrays["mu"], arrays["sigma"], str(path))
        count = arrays.get("num_images")
        return cls(mu, sigma, None if count is None else int(count))


def _above_rounding(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Whether each eigenvalue exceeds numpy's matrix_rank tolerance, max |λ| · D · eps."""
    scale = eigenvalues.abs().max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return eigenvalues > scale


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> float:
    """tr √(Σ1 Σ2) = Σ √λ_i over the eigenvalues λ of Σ1 Σ2.

    With Σ1 = A Aᵀ (A = V √w from Σ1's eigendecomposition), the nonzero eigenvalues of Σ1 Σ2 are
    those of the symmetric PSD Aᵀ Σ2 A, so `eigvalsh` applies; this replaces clean-fid's
    `scipy.linalg.sqrtm(Σ1 Σ2, disp=False)`, which scipy 1.18 removed. Eigenvalues at rounding
    level count as zero: their square roots would add up to noise (a 6-image covariance of
    2048-D features scored against itself is off by 0.5 otherwise).
    """
    variances, directions = torch.linalg.eigh(sigma1)
    kept = _above_rounding(variances)
    if not kept.any():
        return 0.0
    factor = directions[:, kept] * variances[kept].sqrt()
    middle = factor.T @ sigma2 @ factor
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(eigenvalues[_above_rounding(eigenvalues)].sqrt().sum())


def frechet_distance(
    mu1: Array, sigma1: Array, mu2: Array, sigma2: Array, *, device: torch.device | None = None
) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 √(Σ1 Σ2)) in float64 (FID), the linear algebra on `device`."""
    mu1, sigma1 = _checked_moments(mu1, sigma1, "first statistics")
    mu2, sigma2 = _checked_moments(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise DmstabError(
            f"statistics of different feature sizes ({mu1.size} vs {mu2.size}): "
            "they come from different feature extractors"
        )
    diff = mu1 - mu2
    first, second = (torch.from_numpy(sigma).to(device) for sigma in (sigma1, sigma2))
    traces = np.trace(sigma1) + np.trace(sigma2)
    return float(diff @ diff + traces - 2.0 * trace_sqrt_product(first, second))


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / d + 1)^3, d the feature size (KID's kernel)."""
    return (a @ b.T / a.shape[1] + 1.0) ** KID_DEGREE


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of two equal-size samples under the polynomial kernel (Bińkowski et al.)."""
    m = x.shape[0]
    within = polynomial_kernel(x, x) + polynomial_kernel(y, y)
    off_diagonal = within.sum() - within.diagonal().sum()
    return float(off_diagonal / (m * (m - 1)) - 2.0 * polynomial_kernel(x, y).sum() / m**2)


def kid(
    features1: torch.Tensor,
    features2: torch.Tensor,
    *,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance: unbiased MMD² averaged over random equal-size subsets.

    Subsets are drawn as clean-fid's `kernel_distance` draws them (without replacement, from
    features2 then features1) from `np.random.RandomState(seed)`, so after `np.random.seed(seed)`
    clean-fid draws the same subsets.
    """
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise DmstabError(
            f"KID needs two (N, D) feature sets of one D, got {tuple(features1.shape)} "
            f"and {tuple(features2.shape)}"
        )
    subset_size = min(features1.shape[0], features2.shape[0], max_subset_size)
    if subset_size < 2 or num_subsets < 1:
        raise DmstabError(
            f"KID needs subsets of at least 2 images and num_subsets >= 1, "
            f"got {subset_size} and {num_subsets}"
        )
    draws = np.random.RandomState(seed)
    first, second = features1.to(torch.float64), features2.to(torch.float64)
    total = 0.0
    for _ in range(num_subsets):
        x = second[torch.from_numpy(draws.choice(second.shape[0], subset_size, replace=False))]
        y = first[torch.from_numpy(draws.choice(first.shape[0], subset_size, replace=False))]
        total += unbiased_mmd2(x, y)
    return total / num_subsets


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and std over `splits` parts of exp(E_x KL(p(y|x) ‖ p(y))) (Salimans et al. 2016).

    `logits` are (N, K) class logits; parts are rows [i·N/splits, (i+1)·N/splits) as in the
    original code, and the std is the population std (np.std) it reports.
    """
    count = logits.shape[0]
    if logits.ndim != 2 or splits < 1 or count < splits:
        raise DmstabError(
            f"Inception Score needs (N, K) logits with N >= splits >= 1, "
            f"got {tuple(logits.shape)} and splits={splits}"
        )
    log_probs = torch.log_softmax(logits.to(torch.float64), dim=1)
    bounds = [i * count // splits for i in range(splits + 1)]
    scores = []
    for start, stop in itertools.pairwise(bounds):
        part = log_probs[start:stop]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(stop - start)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))
