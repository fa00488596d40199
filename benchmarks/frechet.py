"""The Fréchet distance alone: dmstab's eigendecomposition route against clean-fid's own
`frechet_distance` (`scipy.linalg.sqrtm` of Σ1Σ2), on the same statistics.

Target (issue 17): at least 5× faster at 2048 features, equal to 1e-6 relative.
"""

from __future__ import annotations

import numpy as np
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

from benchmarks.harness import Comparison, Side, Size, describe_device, measure
from dmstab.analysis.frechet import frechet_distance

# Feature width (Inception pool3 is 2048), samples per statistics, timed rounds.
SIZES: dict[Size, tuple[int, int, int]] = {
    "toy": (64, 256, 2),
    "cpu": (2048, 4096, 3),
    "full": (2048, 50_000, 5),
}


def _statistics(width: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of correlated Gaussian features (a random mixing of white noise),
    full rank like Inception features of many images."""
    generator = np.random.default_rng(seed)
    mixing = generator.standard_normal((width, width)) / np.sqrt(width)
    features = generator.standard_normal((samples, width)) @ mixing + generator.standard_normal(
        width
    )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def run(size: Size, device: torch.device) -> list[Comparison]:
    width, samples, repeats = SIZES[size]
    mu1, sigma1 = _statistics(width, samples, seed=1)
    mu2, sigma2 = _statistics(width, samples, seed=2)
    sides = [
        Side("dmstab", lambda: frechet_distance(mu1, sigma1, mu2, sigma2, device=device)),
        Side("clean-fid (sqrtm)", lambda: cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2)),
    ]
    ours = frechet_distance(mu1, sigma1, mu2, sigma2, device=device)
    theirs = float(cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2))
    relative = abs(ours - theirs) / abs(theirs)
    comparison = Comparison(
        benchmark="frechet",
        title=f"Fréchet distance, {width} features",
        config={"features": width, "samples": samples},
        device=describe_device(device),
        sides=measure(sides, device=device, warmup=1, repeats=repeats),
        subject="dmstab",
        baseline="clean-fid (sqrtm)",
        target="≥ 5× faster, equal to 1e-6",
        checks={"dmstab": ours, "clean-fid": theirs, "relative_difference": relative},
    )
    comparison.met = comparison.ratio <= 1 / 5 and relative <= 1e-6
    return [comparison]
