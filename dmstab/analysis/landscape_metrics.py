"""Numbers that describe a loss landscape (AAAI Figs. 2–3): how a 2D surface rises around the
trained weights and how rugged it is, and the barrier along a 1D interpolation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dmstab.analysis.fixed_batch import GanNetwork, check_fixed_batch_keys, metric_name
from dmstab.analysis.landscape import DirectionNorm, LandscapeGrid
from dmstab.config import AnalysisSection, Recipe
from dmstab.errors import DmstabError


@dataclass(frozen=True)
class LandscapeConfig(AnalysisSection):
    """`landscape:` (AAAI Figs 2–3) on one fixed batch with fixed noise and timesteps.

    2D: random directions normalised per filter (Li et al. 2018) or per layer (`norm`), biases
    and norm layers zeroed (biasbn), on a `points`×`points` grid over [−`span`, `span`]².
    1D: θ = α·θa + (1−α)·θb for `alphas` values of α on [`alpha_min`, `alpha_max`] between the
    run's checkpoints kept at `interpolate` = (step b, step a).
    `timesteps` are the DDPM t of the per-timestep curves and surfaces (the t-averaged loss is
    always computed). For GANs, `network` is the one whose weights move.
    """

    section: ClassVar[str] = "landscape"

    batch_size: int = 64
    """the fixed batch"""
    timesteps: tuple[int, ...] = ()
    """DDPM timesteps with a loss of their own (the t-averaged loss is always computed)"""
    points: int = 51
    """the 2D grid: points per axis over [−span, span]²"""
    span: float = 1.0
    """the 2D grid's half-width in units of the directions"""
    norm: DirectionNorm = "filter"
    """the 2D directions' scale: `filter` gives each filter of d the norm of θ's filter (Li et al.
    Eq. 1), `layer` each weight tensor the norm of θ's; biases and norm layers get zero either
    way"""
    alphas: int = 21
    """the 1D interpolation's number of α values"""
    alpha_min: float = 0.0
    """the 1D interpolation's smallest α"""
    alpha_max: float = 1.0
    """the 1D interpolation's largest α"""
    interpolate: tuple[int, ...] = ()
    """`[b, a]`: interpolate between the run's checkpoints kept at steps b and a
    (`train.keep_checkpoints`)"""
    network: GanNetwork = "generator"
    """GANs: the network whose weights move (the other is fixed)"""
    seed: int = 0
    """seeds the batch, noise, timesteps and directions"""


def check_landscape(recipe: Recipe) -> None:
    land = recipe.analysis(LandscapeConfig)
    check_fixed_batch_keys(recipe, "landscape", land.batch_size, land.timesteps)
    rules = (
        (land.points >= 2, f"landscape.points is {land.points}; must be at least 2"),
        (land.span > 0, f"landscape.span is {land.span}; must be positive"),
        (land.alphas >= 2, f"landscape.alphas is {land.alphas}; must be at least 2"),
        (land.alpha_min < land.alpha_max, "landscape.alpha_min must be below alpha_max"),
        (
            len(land.interpolate) in (0, 2),
            f"landscape.interpolate is {list(land.interpolate)}; give two steps (b, a) or none",
        ),
    )
    for ok, message in rules:
        if not ok:
            raise DmstabError(message)


def surface_metrics(grid: LandscapeGrid) -> dict[str, float]:
    """Per loss: the value at θ; the grid's mean and maximum rise above it, and the mean rise
    relative to the value at θ (scale-free, for comparing models with different losses); how
    far the grid's minimum lies below θ's value (0 when θ is the lowest point); and the share
    of interior grid points where the surface is locally non-convex (a negative five-point
    Laplacian): 0 for a bowl, Fig. 2's smooth DM surface, and large for a rugged one."""
    assert grid.ys is not None
    centre = (int(np.argmin(np.abs(grid.ys))), int(np.argmin(np.abs(grid.xs))))
    metrics = {}
    for name, values in grid.values.items():
        at_theta = float(values[centre])
        prefix = f"landscape/{metric_name(name)}"
        metrics[f"{prefix}/center"] = at_theta
        metrics[f"{prefix}/mean_rise"] = float(values.mean()) - at_theta
        metrics[f"{prefix}/max_rise"] = float(values.max()) - at_theta
        metrics[f"{prefix}/relative_rise"] = (float(values.mean()) - at_theta) / abs(at_theta)
        metrics[f"{prefix}/below_center"] = at_theta - float(values.min())
        metrics[f"{prefix}/nonconvex_fraction"] = nonconvex_fraction(values)
    return metrics


def nonconvex_fraction(values: np.ndarray) -> float:
    """The share of interior points of a 2D grid with a negative five-point Laplacian
    (the grid spacing is uniform, so its scale does not change the sign)."""
    interior = values[1:-1, 1:-1]
    laplacian = (
        values[:-2, 1:-1] + values[2:, 1:-1] + values[1:-1, :-2] + values[1:-1, 2:] - 4 * interior
    )
    return float((laplacian < 0).mean())


def curve_metrics(alphas: np.ndarray, curves: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per loss: the values at α = 0 and 1 (when on the grid) and the largest rise above the
    straight line between the two ends (a barrier; 0 for a convex path)."""
    metrics = {}
    for name, values in curves.items():
        prefix = f"landscape/{metric_name(name)}"
        line = np.interp(alphas, [alphas[0], alphas[-1]], [values[0], values[-1]])
        metrics[f"{prefix}/barrier"] = float((values - line).max())
        metrics[f"{prefix}/start"] = float(values[0])
        metrics[f"{prefix}/end"] = float(values[-1])
    return metrics
