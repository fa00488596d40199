"""Loss-landscape geometry: 1D interpolation between checkpoints and 2D filter- or
layer-normalised surfaces (AAAI Figs. 2–3, after Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets").

Every landscape is a function of the weights only: the DM loss on a fixed batch with fixed
noise and fixed draws (`FixedBatchLoss`, built on the objective's own `terms`), evaluated with
the model in eval mode and without gradients.

- Interpolation (Goodfellow et al. 2015; AAAI Sec. "Analyze the Smoothness of Landscape"):
  θ(α) = α·θa + (1 − α)·θb over whole state dicts, one pass over α for every loss.
- Surface: L(θ + x·d1 + y·d2) over a grid, for random Gaussian directions d whose every filter
  (a slice along dim 0 of a weight with ≥ 2 dims) is rescaled to the norm of the matching filter
  of θ (Li et al. Eq. 1, `norm="filter"`), or whose every weight with ≥ 2 dims (a layer) is
  rescaled as a whole to the norm of θ's (`norm="layer"`, the reference code's
  `net_plotter.normalize_direction`). Parameters with ≤ 1 dims (biases, norm gains and
  shifts) get a zero direction (`ignore="biasbn"`, the reference default) or, with
  `ignore="none"`, the weight itself as their direction (as the reference code
  `net_plotter.normalize_directions_for_weights`).

Directions cover the trainable parameters (`requires_grad`) in `named_parameters` order, as the
Hessian analysis does; buffers (EDM2's Fourier features) stay fixed.

Under `torchrun` the points (α, or the grid's points in row order) are split over the ranks,
each evaluating its contiguous share on the whole batch, and gathered in order on every rank:
each value is the one a single process computes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from dmstab.analysis.hessian import Loss
from dmstab.analysis.progress import Progress, report
from dmstab.atomic import write_atomically
from dmstab.diffusion.objectives import DDPMObjective, Draws, Objective
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError
from dmstab.reading import not_a, read_npz

Direction = dict[str, Tensor]
"""One tensor per trainable parameter, keyed by its `named_parameters` name."""
Ignore = Literal["biasbn", "none"]
IGNORE_CHOICES: tuple[Ignore, ...] = ("biasbn", "none")
DirectionNorm = Literal["filter", "layer"]
NORM_CHOICES: tuple[DirectionNorm, ...] = ("filter", "layer")
LANDSCAPE_KIND = "landscape file"

# Guards the rescaling of a random filter against a zero norm, as the reference code does; the
# reference rescales a layer without it, a relative difference of 1e-10/‖d‖.
_NORM_EPS = 1e-10


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class FixedBatchLoss:
    """The mean DM loss `term` of a model on one fixed batch: fixed x0, labels and noise, and
    fixed per-sample draws (timesteps or σ); with several draws, the mean over them.

    The call puts the model in eval mode (no dropout; EDM2's forced weight normalisation leaves
    the weights alone) and back afterwards. It keeps gradients when they are enabled, so the
    same closure serves `HessianOperator`; the landscape functions call it under no_grad.
    """

    objective: Objective
    x0: Tensor
    labels: Tensor | None
    noise: Tensor
    draws: tuple[Draws, ...]
    step: int = 0  # the training iteration the loss weighting is taken at
    term: str = "loss"

    def __call__(self, model: nn.Module) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            means = [self._mean_term(model, draws) for draws in self.draws]
        finally:
            model.train(was_training)
        return torch.stack(means).mean()

    def _mean_term(self, model: nn.Module, draws: Draws) -> Tensor:
        terms = self.objective.terms(model, self.x0, self.labels, self.noise, draws, self.step)
        return terms[self.term].mean()


def at_timestep(batch: int, t: int) -> Draws:
    """DDPM draws that put every sample of a batch at timestep t (no importance weights)."""
    return {"t": torch.full((batch,), t, dtype=torch.long)}


def timestep_loss(
    objective: Objective,
    x0: Tensor,
    labels: Tensor | None,
    noise: Tensor,
    timesteps: Sequence[int],
    *,
    step: int = 0,
) -> FixedBatchLoss:
    """The fixed-batch DDPM loss with the whole batch at each of `timesteps`, averaged."""
    if not isinstance(objective, DDPMObjective):
        raise DmstabError("per-timestep landscapes need a DDPM recipe (EDM draws σ, not t)")
    steps = objective.diffusion.num_timesteps
    outside = [t for t in timesteps if not 0 <= t < steps]
    if outside or not timesteps:
        raise DmstabError(f"timesteps must be a non-empty list in 0..{steps - 1}; got {outside}")
    draws = tuple(at_timestep(x0.shape[0], t) for t in timesteps)
    return FixedBatchLoss(objective, x0, labels, noise, draws, step)


def per_timestep_losses(
    objective: Objective,
    x0: Tensor,
    labels: Tensor | None,
    noise: Tensor,
    timesteps: Sequence[int],
    *,
    step: int = 0,
) -> dict[str, FixedBatchLoss]:
    """One fixed-batch loss per timestep, named "t=<t>": the paper's per-t curves."""
    return {
        f"t={t}": timestep_loss(objective, x0, labels, noise, [t], step=step) for t in timesteps
    }


def evaluate(loss: Loss, model: nn.Module) -> float:
    """`loss(model)` as a Python float, without building a graph."""
    with torch.no_grad():
        return float(loss(model))


# ---------------------------------------------------------------------------- interpolation


def interpolate(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """θ(α) = α·θa + (1 − α)·θb (AAAI Fig. 3) for every floating tensor of two state dicts.

    Integer and boolean tensors (counters, masks) cannot be mixed: they come from the nearer
    end, θa's for α ≥ 0.5 and θb's otherwise, so α = 1 and α = 0 give θa and θb exactly.
    """
    _require_same_layout(state_a, state_b, "the two checkpoints")
    return {name: _mix(a, state_b[name], alpha) for name, a in state_a.items()}


def _mix(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    if a.is_floating_point() or a.is_complex():
        return alpha * a + (1.0 - alpha) * b
    return a if alpha >= 0.5 else b


def interpolation_curve(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    alphas: npt.ArrayLike,
    loss_fns: Mapping[str, Loss],
    progress: Progress | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> dict[str, np.ndarray]:
    """Every loss along θ(α) for each α (one load of θ(α) per α, then all losses): name →
    float64 array over `alphas`. The model's own state is restored afterwards.
    `progress(done, total)` runs after each α of this rank's share (`context.shard`)."""
    points = _axis(alphas, "alphas")
    _require_same_layout(model.state_dict(), state_a, "the model and the checkpoints")
    original = {name: value.detach().clone() for name, value in model.state_dict().items()}
    share = context.shard(len(points))
    values = np.empty((len(share), len(loss_fns)))  # this rank's αs × the losses
    report(progress, 0, len(share))
    try:
        for done, index in enumerate(share, start=1):
            model.load_state_dict(interpolate(state_a, state_b, float(points[index])))
            for column, loss in enumerate(loss_fns.values()):
                values[done - 1, column] = evaluate(loss, model)
            report(progress, done, len(share))
    finally:
        model.load_state_dict(original)
    gathered = _gathered(values, context, model)
    return {name: np.ascontiguousarray(gathered[:, column]) for column, name in enumerate(loss_fns)}


def _gathered(values: np.ndarray, context: DistributedContext, model: nn.Module) -> np.ndarray:
    """Every rank's rows of `values` in rank order (each rank holds a contiguous share), sent
    from the model's device (NCCL gathers CUDA tensors only) in float64."""
    if not context.active:
        return values
    device = next(model.parameters()).device
    return context.all_gather_cat(torch.from_numpy(values).to(device)).cpu().numpy()


def _require_same_layout(
    reference: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str
) -> None:
    """`what` must hold the same tensor names, shapes and dtypes."""
    missing = sorted(set(reference) ^ set(other))
    if missing:
        raise DmstabError(f"{what} hold different networks: {', '.join(missing[:5])} not in both")
    for name, value in reference.items():
        if value.shape != other[name].shape or value.dtype != other[name].dtype:
            raise DmstabError(
                f"{what} differ at {name}: {tuple(value.shape)} {value.dtype} vs "
                f"{tuple(other[name].shape)} {other[name].dtype}"
            )


def _axis(values: npt.ArrayLike, name: str) -> np.ndarray:
    points = np.asarray(values, dtype=np.float64)
    if points.ndim != 1 or points.size == 0 or not np.isfinite(points).all():
        raise DmstabError(f"{name} must be a non-empty list of finite numbers")
    return points


# ----------------------------------------------------------------------- normalised surface


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def random_direction(
    model: nn.Module,
    generator: torch.Generator,
    ignore: Ignore = "biasbn",
    norm: DirectionNorm = "filter",
) -> Direction:
    """A Gaussian direction shaped like the trainable parameters, filter- or layer-normalised.
    Drawn on the CPU from `generator` (one draw per parameter, 1-D ones included, so every
    `ignore` and `norm` choice rescales the same draw), then moved to each parameter's device."""
    if ignore not in IGNORE_CHOICES:
        raise DmstabError(f"ignore must be one of {', '.join(IGNORE_CHOICES)}; got {ignore!r}")
    if norm not in NORM_CHOICES:
        raise DmstabError(f"norm must be one of {', '.join(NORM_CHOICES)}; got {norm!r}")
    direction = {}
    for name, weight in trainable_parameters(model).items():
        draw = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
        direction[name] = normalized(draw.to(weight.device), weight.detach(), ignore, norm)
    return direction


def normalized(draw: Tensor, weight: Tensor, ignore: Ignore, norm: DirectionNorm) -> Tensor:
    """`draw` rescaled to the weight's scale. "filter" (Li et al. Eq. 1): each filter d_j
    (slice along dim 0) to ‖θ_j‖, d_j·‖θ_j‖/‖d_j‖ (a linear layer's filter is the weights of
    one output unit); "layer": the whole tensor, d·‖θ‖/‖d‖. A 1-D or scalar weight gets zero
    ("biasbn") or itself ("none") as its direction, whatever `norm` is (as the reference)."""
    if weight.dim() <= 1:
        return torch.zeros_like(weight) if ignore == "biasbn" else weight.clone()
    first = 1 if norm == "filter" else 0
    dims = tuple(range(first, weight.dim()))
    weight_norms = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    draw_norms = torch.linalg.vector_norm(draw, dim=dims, keepdim=True)
    return torch.mul(draw, weight_norms / (draw_norms + _NORM_EPS))


def surface(
    model: nn.Module,
    loss_fn: Loss,
    directions: tuple[Direction, Direction],
    xs: npt.ArrayLike,
    ys: npt.ArrayLike,
    progress: Progress | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> np.ndarray:
    """L(θ + x·d1 + y·d2) at every grid point: float64 values[i, j] at (xs[j], ys[i]) (the
    layout matplotlib's contour takes), one call of `loss_fn` per point. The trainable
    parameters are restored bit for bit afterwards, also when `loss_fn` raises.
    `progress(done, total)` runs after each grid point of this rank's share (`context.shard`
    of the points in row order)."""
    grid_x, grid_y = _axis(xs, "xs"), _axis(ys, "ys")
    params = trainable_parameters(model)
    for direction in directions:
        _require_same_layout(params, direction, "the model and the direction")
    origin = {name: p.detach().clone() for name, p in params.items()}
    share = context.shard(len(grid_y) * len(grid_x))
    values = np.empty((len(share), 1))
    report(progress, 0, len(share))
    try:
        for done, point in enumerate(share, start=1):
            i, j = divmod(point, len(grid_x))
            _move(params, origin, directions, float(grid_x[j]), float(grid_y[i]))
            values[done - 1, 0] = evaluate(loss_fn, model)
            report(progress, done, len(share))
    finally:
        _restore(params, origin)
    return _gathered(values, context, model).reshape(len(grid_y), len(grid_x))


def _move(
    params: Mapping[str, nn.Parameter],
    origin: Mapping[str, Tensor],
    directions: tuple[Direction, Direction],
    x: float,
    y: float,
) -> None:
    d1, d2 = directions
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(origin[name] + x * d1[name] + y * d2[name])


def _restore(params: Mapping[str, nn.Parameter], origin: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(origin[name])


# -------------------------------------------------------------------------------- raw grids


@dataclass(frozen=True)
class LandscapeGrid:
    """Raw landscape values, one array per loss (e.g. per timestep "t=100"): a 1D curve over
    `xs` (α; `ys` is None) with values of shape (len(xs),), or a surface over xs × ys with
    values of shape (len(ys), len(xs)). `metadata` is anything JSON can hold (timesteps,
    seed, checkpoints, ignore)."""

    xs: np.ndarray
    ys: np.ndarray | None
    values: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a landscape grid needs at least one array of values")
        shape = (len(self.xs),) if self.ys is None else (len(self.ys), len(self.xs))
        for name, array in self.values.items():
            if array.shape != shape:
                raise ValueError(f"values {name!r} have shape {array.shape}, expected {shape}")


def save_landscape(grid: LandscapeGrid, path: Path) -> Path:
    """Write `grid` to an .npz (atomically): xs, ys if 2D, values stacked in name order, and a
    JSON header with the names and metadata."""
    names = list(grid.values)
    header = json.dumps({"names": names, "metadata": grid.metadata})
    arrays: dict[str, Any] = {
        "xs": np.asarray(grid.xs, dtype=np.float64),
        "values": np.stack([np.asarray(grid.values[n], dtype=np.float64) for n in names]),
        "header": np.array(header),
    }
    if grid.ys is not None:
        arrays["ys"] = np.asarray(grid.ys, dtype=np.float64)
    write_atomically(path, lambda handle: np.savez(handle, **arrays))
    return path


def load_landscape(path: Path) -> LandscapeGrid:
    """The grid `save_landscape` wrote to `path`."""
    data = read_npz(path, LANDSCAPE_KIND, required=("xs", "values", "header"), optional=("ys",))
    try:
        header = json.loads(str(data["header"]))
        values = dict(zip(header["names"], data["values"], strict=True))
        return LandscapeGrid(data["xs"], data.get("ys"), values, header["metadata"])
    except (ValueError, KeyError, TypeError) as exc:
        raise not_a(path, LANDSCAPE_KIND, f"its header does not fit its arrays: {exc}") from None
