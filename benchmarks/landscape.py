"""Loss-surface grid points: dmstab's `surface` (the weights moved in place to θ + x·d1 + y·d2,
the fixed batch, noise and timesteps resident on the device) against (a) as many bare
evaluations of the same loss, the floor, and (b) the way Li et al.'s loss-landscape code
evaluates a point (tomgoldstein/loss-landscape, read for what it does).

At every grid point the reference `net_plotter.set_weights` assigns each parameter a new tensor
`w + change` built from the origin's weights, and `evaluation.eval_loss` runs the loss over the
data loader `dataloader.load_dataset` made: a `DataLoader` with `num_workers=threads` (2 by
default) that is iterated afresh at every point, so its worker processes start again each time,
and every batch is moved to the device. For a diffusion loss the point also needs its noise and
timesteps, drawn again from the same seeds. Two details follow dmstab instead, so that both
sides compute the same numbers and the values can be compared exactly: the images come in the
fixed batch's order (the reference samples its subset in random order), and the step is summed
as origin + x·d1 + y·d2 (the reference adds x·d1 + y·d2 first), the same work in another order.

Targets (issue 17): a grid point at most 1.1× a bare evaluation, and at least 3× faster than
the reference approach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmarks.fixed_batch import (
    CPU_OVERRIDES,
    FULL_OVERRIDES,
    TOY_OVERRIDES,
    FixedBatchProblem,
    fixed_batch_problem,
)
from benchmarks.harness import Comparison, Side, SideResult, Size, describe_device, measure
from dmstab.analysis.landscape import (
    Direction,
    FixedBatchLoss,
    evaluate,
    random_direction,
    surface,
    trainable_parameters,
)
from dmstab.data import ImageDataset, build_dataset
from dmstab.diffusion.objectives import DDPMObjective, build_objective

REFERENCE_WORKERS = 2  # loss-landscape's --threads default: the DataLoader's num_workers
DIRECTION_SEED = 1
SPAN = 1.0  # the reference default grid -1:1

# recipe, overrides, fixed batch, grid points per axis, untimed and timed rounds
SIZES: dict[Size, tuple[str, tuple[str, ...], int, int, int, int]] = {
    "toy": ("mini_stability_dm.yaml", TOY_OVERRIDES, 4, 2, 0, 1),
    "cpu": ("mini_stability_dm.yaml", CPU_OVERRIDES, 32, 3, 1, 3),
    "full": ("fig2_landscape_cifar10_dm.yaml", FULL_OVERRIDES, 128, 5, 1, 3),
}


class _FixedBatchImages(Dataset[tuple[Tensor, Tensor]]):
    """The fixed batch's images one at a time, as a map-style dataset for a DataLoader."""

    def __init__(self, dataset: ImageDataset, indices: Tensor) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self.dataset.get_batch(self.indices[index : index + 1])
        return images[0], labels[0]


@dataclass
class ReferenceLandscape:
    """Li et al.'s per-point evaluation of the fixed-batch mean loss (see the module's
    docstring): weights rebuilt from the origin, the batch through a fresh DataLoader pass,
    noise and timesteps drawn again, one loss value per point."""

    problem: FixedBatchProblem
    directions: tuple[Direction, Direction]
    device: torch.device

    def __post_init__(self) -> None:
        recipe, seed = self.problem.recipe, self.problem.seed
        dataset = build_dataset(recipe.data)
        # The images, noise and timesteps `dmstab.analysis.fixed_batch` draws from the seeds.
        images = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=images)[: self.problem.batch_size]
        self.noise_state = images.get_state()  # the noise is drawn next from this generator
        self.loader = DataLoader(
            _FixedBatchImages(dataset, indices),
            batch_size=self.problem.batch_size,
            shuffle=False,
            num_workers=REFERENCE_WORKERS,
        )
        objective = build_objective(recipe, self.problem.num_classes)
        assert isinstance(objective, DDPMObjective)  # the mean loss draws timesteps
        self.objective, self.timesteps = objective, objective.diffusion.num_timesteps
        self.model = self.problem.model
        self.origin = [p.detach().clone() for p in trainable_parameters(self.model).values()]

    def _set_weights(self, x: float, y: float) -> None:
        d1, d2 = (list(direction.values()) for direction in self.directions)
        params = trainable_parameters(self.model).values()
        for p, w, step_x, step_y in zip(params, self.origin, d1, d2, strict=True):
            p.data = w + x * step_x + y * step_y

    def _loss(self) -> float:
        total, count = 0.0, 0
        for images, labels in self.loader:
            x0 = images.to(self.device)
            noise_draw = torch.Generator()
            noise_draw.set_state(self.noise_state)
            noise = torch.randn(images.shape, generator=noise_draw).to(self.device)
            timesteps = torch.Generator().manual_seed(self.problem.seed + 1)
            draws = {"t": torch.randint(0, self.timesteps, (len(images),), generator=timesteps)}
            conditioning = labels.to(self.device) if self.problem.recipe.model.class_cond else None
            loss = FixedBatchLoss(self.objective, x0, conditioning, noise, (draws,), step=0)
            total += evaluate(loss, self.model) * len(images)
            count += len(images)
        return total / count

    def grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        values = np.empty((len(ys), len(xs)))
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                self._set_weights(float(x), float(y))
                values[i, j] = self._loss()
        with torch.no_grad():  # back to the origin, as `surface` leaves the model
            for p, w in zip(trainable_parameters(self.model).values(), self.origin, strict=True):
                p.data = w.clone()
        return values


def run(size: Size, device: torch.device) -> list[Comparison]:
    recipe, overrides, batch, points, warmup, repeats = SIZES[size]
    problem = fixed_batch_problem(recipe, overrides, batch, device)
    generator = torch.Generator().manual_seed(DIRECTION_SEED)
    directions = (
        random_direction(problem.model, generator),
        random_direction(problem.model, generator),
    )
    axis = np.linspace(-SPAN, SPAN, points)
    reference = ReferenceLandscape(problem, directions, device)
    grids: dict[str, np.ndarray] = {}

    def dmstab_grid() -> np.ndarray:
        grids["dmstab"] = surface(problem.model, problem.loss, directions, axis, axis)
        return grids["dmstab"]

    def reference_grid() -> np.ndarray:
        grids["reference"] = reference.grid(axis, axis)
        return grids["reference"]

    def bare_evaluations() -> list[float]:
        return [evaluate(problem.loss, problem.model) for _ in range(points * points)]

    names = ("dmstab surface", "bare loss evaluations", "Li et al. per-point reload")
    sides = [
        Side(names[0], dmstab_grid),
        Side(names[1], bare_evaluations),
        Side(names[2], reference_grid),
    ]
    results = measure(sides, device=device, warmup=warmup, repeats=repeats)
    difference = float(np.abs(grids["dmstab"] - grids["reference"]).max())
    config = {"recipe": recipe, **problem.describe(), "grid": f"{points}×{points}"}
    checks = {
        "points": points * points,
        "max_abs_difference": difference,
        "identical": difference == 0.0,
        **{f"{r.name}: s per point": r.median / (points * points) for r in results},
    }

    def comparison(baseline: SideResult, title: str, target: str) -> Comparison:
        return Comparison(
            benchmark="landscape",
            title=title,
            config=config,
            device=describe_device(device),
            sides=[results[0], baseline],
            subject=names[0],
            baseline=baseline.name,
            target=target,
            checks=checks,
        )

    floor = comparison(results[1], f"{points}×{points} surface vs bare loss", "≤ 1.1×")
    floor.met = floor.ratio <= 1.1
    li = comparison(
        results[2], f"{points}×{points} surface vs Li et al.", "≥ 3× faster, same values"
    )
    li.met = li.ratio <= 1 / 3 and difference == 0.0
    return [floor, li]
