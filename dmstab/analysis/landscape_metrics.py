"""Numbers that describe a loss landscape (AAAI Figs. 2–3): how a 2D surface rises around the
trained weights and how rugged it is, and the barrier along a 1D interpolation."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dmstab.analysis.fixed_batch import metric_name
from dmstab.analysis.landscape import LandscapeGrid


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
