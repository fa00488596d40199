"""Every figure dmstab draws: image grids, timestep histograms, magnitudes, loss landscapes,
report curves and sweeps. Each takes plain numbers and labels, never a command's types."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N,C,H,W) -> uint8 with the usual round((x+1)·127.5) quantisation."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N,3,H,W) -> one HWC uint8 array with `nrow` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8
    )
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def save_grid(images: torch.Tensor, path: Path, scale: int = 2) -> Path:
    """Write a PNG grid, upscaled with nearest neighbour so small images stay legible."""
    grid = Image.fromarray(image_grid(images))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def consistency_grid(
    images: torch.Tensor, labels: Sequence[str], psnr: np.ndarray | None = None
) -> Any:
    """AAAI Fig. 1: uint8 images (N models, M seeds, 3, H, W), one row per model named by its
    label, one column per image index (one noise stream, see NoiseSource). `psnr` (N−1, M), if
    given, captions each image of models 2…N with its PSNR against model 1's (Eq. 1's terms)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    num_models, num_seeds = images.shape[:2]
    size = (0.9 * num_seeds + 1.2, 1.0 * num_models + 0.3)
    fig, axes = plt.subplots(num_models, num_seeds, figsize=size, squeeze=False)
    pixels = images.permute(0, 1, 3, 4, 2).cpu().numpy()
    for (row, column), ax in np.ndenumerate(axes):
        ax.imshow(pixels[row, column], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if column == 0:
            ax.set_ylabel(labels[row], fontsize="small")
        if row == 0:
            ax.set_title(f"image {column}", fontsize="x-small")
        elif psnr is not None:
            ax.set_xlabel(f"{psnr[row - 1, column]:.1f} dB", fontsize="x-small")
    fig.tight_layout(pad=0.3)
    return fig


def timestep_histogram(
    counts: torch.Tensor, probabilities: torch.Tensor, step: int, title: str
) -> Any:
    """Histogram of the timesteps drawn since the last figure, against P(t) (AAAI Eq. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    num_timesteps = counts.numel()
    bins = min(50, num_timesteps)
    edges = np.linspace(0, num_timesteps, bins + 1).astype(int)
    observed = np.add.reduceat(counts.double().numpy(), edges[:-1])
    expected = np.add.reduceat(probabilities.double().numpy(), edges[:-1])
    total = max(observed.sum(), 1.0)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.stairs(observed / total, edges, fill=True, alpha=0.5, label="sampled")
    ax.stairs(expected, edges, color="black", label="P(t)")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("fraction per bin")
    ax.set_title(f"{title} — step {step}")
    ax.legend()
    fig.tight_layout()
    return fig


def magnitude_figure(
    activations: Mapping[str, Sequence[tuple[int, float]]],
    weights: Mapping[str, Sequence[tuple[int, float]]],
) -> Any:
    """EDM2 Fig. 3 for one run: one line per block over training steps, activations left and
    weights right. Blocks are named `enc|mid|dec.<R>x<R>.block<k>`; a resolution has one
    colour, the encoder solid, the middle dotted, the decoder dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(dict.fromkeys([*activations, *weights]))
    sizes = list(dict.fromkeys(name.split(".")[1] for name in names))
    colours = {size: f"C{i % 10}" for i, size in enumerate(sizes)}
    styles = {"enc": "-", "mid": ":", "dec": "--"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = (("activations", activations), ("weights", weights))
    for ax, (title, series) in zip(axes, panels, strict=True):
        for name, points in series.items():
            flavor, size, block = name.split(".")
            steps, values = zip(*points, strict=True)
            label = f"{flavor} {size}" if block == "block0" else None
            ax.plot(steps, values, styles[flavor], color=colours[size], label=label, lw=1.2)
        ax.set_xlabel("training step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("RMS")
        ax.set_title(f"{title} per block")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.tight_layout()
    return fig


def interpolation_figure(alphas: np.ndarray, curves: Mapping[str, np.ndarray], title: str) -> Any:
    """AAAI Fig. 3: the loss along θ(α) = α·θa + (1 − α)·θb, one line per curve (timestep)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, values in curves.items():
        ax.plot(alphas, values, marker=".", lw=1.2, label=name)
    ax.set_xlabel("α  (θ = α·θa + (1 − α)·θb)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def surface_figure(xs: np.ndarray, ys: np.ndarray, values: np.ndarray, title: str) -> Any:
    """AAAI Fig. 2 (Li et al. 2018): a loss surface values[i, j] at (xs[j], ys[i]) as a contour
    map (left) and a 3D surface (right)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    grid_x, grid_y = np.meshgrid(xs, ys)
    fig = plt.figure(figsize=(11, 4.4))
    contour_ax = fig.add_subplot(1, 2, 1)
    levels = contour_ax.contour(grid_x, grid_y, values, levels=20, cmap="viridis")
    contour_ax.clabel(levels, fontsize="x-small")
    contour_ax.set_xlabel("x  (direction 1)")
    contour_ax.set_ylabel("y  (direction 2)")
    contour_ax.set_title(f"{title} — contours")
    surface_ax = fig.add_subplot(1, 2, 2, projection="3d")
    surface_ax.plot_surface(grid_x, grid_y, values, cmap="viridis", linewidth=0)
    surface_ax.set_xlabel("x")
    surface_ax.set_ylabel("y")
    surface_ax.set_zlabel("loss")
    surface_ax.set_title(f"{title} — surface")
    fig.tight_layout()
    return fig


def spectral_density_figure(
    densities: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str
) -> Any:
    """AAAI Fig. 4: Hessian eigenvalue densities, each given as (grid, density at the grid),
    on a log density axis (as PyHessian)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (grid, density) in densities.items():
        ax.semilogy(grid, np.maximum(density, 1e-12), lw=1.2, label=name)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


class Curve(NamedTuple):
    """One colour of `curves_figure`: a measured line with its ± band, and published markers."""

    label: str  # legend entry of the measured line
    points: Sequence[tuple[int, float]]  # (iteration, value), by iteration; empty for no line
    spread: Mapping[int, float]  # iteration -> standard deviation; empty for no band
    paper_label: str  # legend entry of the published markers
    paper: Sequence[tuple[int, float]]  # (iteration, published value); empty for no markers


def curves_figure(
    curves: Sequence[Curve], ylabel: str, *, iteration_label: Callable[[int], str]
) -> Any:
    """Metric vs iteration: measured curves solid, the paper's numbers as markers; the x ticks
    are spelled by `iteration_label` (e.g. 100k)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for index, curve in enumerate(curves):
        color = f"C{index % 10}"
        if curve.points:
            steps, values = zip(*curve.points, strict=True)
            ax.plot(steps, values, "-", marker=".", ms=4, color=color, label=curve.label)
            if curve.spread:
                std = [curve.spread[step] for step in steps]
                low = [v - s for v, s in zip(values, std, strict=True)]
                high = [v + s for v, s in zip(values, std, strict=True)]
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
        if curve.paper:
            steps, values = zip(*curve.paper, strict=True)
            ax.plot(steps, values, "o", color=color, mfc="none", label=curve.paper_label)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: iteration_label(round(x))))
    ax.set_xlabel("training iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no run logged the metric
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def sweep_figure(
    lines: Sequence[tuple[str, Sequence[tuple[float, float, float | None]]]],
    xlabel: str,
    ylabel: str,
) -> Any:
    """Metric vs the swept value (AAAI Fig. 6's layout): one line per (label, points), each
    point (x, y, standard deviation or None), by x; error bars where any point has one."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for index, (label, points) in enumerate(lines):
        xs, ys, spreads = zip(*points, strict=True)
        errors = [e or 0.0 for e in spreads] if any(e is not None for e in spreads) else None
        ax.errorbar(
            xs,
            ys,
            yerr=errors,
            marker="o",
            ms=4,
            capsize=3,
            color=f"C{index % 10}",
            label=label,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def fid_figure(
    curves: Sequence[tuple[str, Sequence[tuple[float, float]], tuple[float, float]]], title: str
) -> Any:
    """FID vs σrel (EDM2 Figs. 5a, 6): per (label, (σrel, FID) points by σrel, optimum), one
    curve with its optimum starred and annotated."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, curve, (best_sigma_rel, best_fid) in curves:
        (line,) = axes.plot(*zip(*curve, strict=True), marker="o", markersize=3, label=label)
        axes.plot(best_sigma_rel, best_fid, marker="*", markersize=14, color=line.get_color())
        axes.annotate(
            f"{best_fid:.2f} at σrel {best_sigma_rel:.3f}",
            (best_sigma_rel, best_fid),
            textcoords="offset points",
            xytext=(6, 8),
            fontsize=8,
        )
    axes.set_xlabel("EMA length σrel")
    axes.set_ylabel("FID")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure
