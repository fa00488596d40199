"""dmstab's whole training step against a bare hand-written loop on the same network, data,
optimiser and precision.

dmstab's side is `dmstab.train.loop.train` itself, as `dmstab train` runs it: seeded data
draws, the recipe's timestep sampler (CLTS for the quickstart), the loss guard, the EMA and the
power EMAs with their snapshots, metrics logged to a real MLflow SQLite store in a temporary
folder. The loop calls `Progress.advance` every `train.log_every` steps;
`_Alternating` is that progress: it times the stretch between two calls (that many real steps
with their logging) and, inside each call, runs as many steps of the bare loop and times those.
So the two sides alternate in one process, on the same machine state.

The bare side is the loop a researcher writes in a screen (nanoGPT style): a random batch of the
same dataset tensor, a uniform timestep (a log-normal σ for EDM), the loss written out (AAAI
Eq. 4's ε-MSE or EDM2's Eq. 21 with learned uncertainty), backward, Adam. Its network starts
from the same weights, its Adam has the recipe's lr and betas, it runs under the same autocast.
Before timing, the bare loss is checked against dmstab's objective on the same draws.

Both sides are reported per step (img/s = batch / median); on a GPU, MFU from torch's count of
the bare step's FLOPs. The checks add the mean ratio (the median hides a step that flushes
metrics or writes a snapshot) and the time of one power-EMA update, alone.

Target (issue 17): dmstab's step at most 1.05× the bare one, tracking on.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import Comparison, SideTimer, Size, describe_device, tracked_overrides, wake
from dmstab.config import Recipe, load_recipe
from dmstab.data import build_dataset
from dmstab.diffusion import build_diffusion
from dmstab.diffusion.edm import EDMPrecond
from dmstab.diffusion.objectives import build_objective
from dmstab.models import build_model, count_parameters
from dmstab.train.common import autocast
from dmstab.train.loop import train
from dmstab.train.power_ema import PowerEMA

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# What a run needs besides the recipe: no checkpoint or sample grid while timing, and a final
# sample grid that costs next to nothing (the loop always draws one at the end).
QUIET = [
    "train.checkpoint_every=1000000000",
    "train.sample_every=0",
    "sample.num_images=2",
    "sample.batch_size=2",
    "eval.every=0",
    "eval.at=[]",
]


@dataclass(frozen=True)
class Setup:
    recipe: str
    overrides: tuple[str, ...]
    warmup: int  # untimed windows of `train.log_every` steps
    windows: int  # timed windows


SIZES: dict[Size, list[Setup]] = {
    "toy": [
        Setup(
            "quickstart.yaml",
            (
                "data.synthetic_size=64",
                "data.resolution=8",
                "model.channels=32",
                "model.channel_mult=[1]",
                "train.batch_size=4",
                "ema.snapshot_every=16",
                "sample.steps=2",
                "train.log_every=2",
            ),
            warmup=1,
            windows=4,
        )
    ],
    "cpu": [Setup("quickstart.yaml", ("sample.steps=2",), warmup=10, windows=60)],
    "full": [
        # The ID network without its learned Σ half (3 output channels fewer): the bare loop
        # writes out the ε-MSE only, not the hybrid loss's VB term.
        Setup(
            "cifar10_clts.yaml",
            (
                "data.name=synthetic",
                "model.learn_sigma=false",
                "sample.steps=2",
                "train.log_every=10",
            ),
            warmup=3,
            windows=20,
        ),
        Setup(
            "edm2_img64_s.yaml",
            (
                "data.name=synthetic",
                "train.kimg=0",
                "sample.steps=2",
                "train.log_every=8",
                "train.batch_size=256",  # a share of the 2048 that fits one GPU
            ),
            warmup=3,
            windows=20,
        ),
    ],
}


BareLoss = Callable[[nn.Module, Tensor, Tensor | None, Tensor, Tensor], Tensor]


def _ddpm_loss(
    recipe: Recipe, device: torch.device
) -> tuple[BareLoss, Callable[[int, torch.Generator], Tensor]]:
    """AAAI Eq. 4: ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖², t uniform; the model sees t·1000/T."""
    alpha_bar = build_diffusion(recipe).alphas_cumprod.float().to(device)  # the recipe's β
    steps = recipe.diffusion.steps

    def loss(
        model: nn.Module, x0: Tensor, labels: Tensor | None, noise: Tensor, t: Tensor
    ) -> Tensor:
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = model(x_t, t.float() * (1000.0 / steps), labels).float()
        return ((noise - prediction) ** 2).mean(dim=(1, 2, 3))

    def draw(batch: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, steps, (batch,), generator=generator)

    return loss, draw


def _edm_loss(recipe: Recipe) -> tuple[BareLoss, Callable[[int, torch.Generator], Tensor]]:
    """EDM2 Eq. 21: (λ(σ)/e^u)·‖D(x0 + σn, σ) − x0‖² + u, λ = (σ² + σd²)/(σσd)², ln σ normal."""
    sigma_data, p_mean, p_std = (
        recipe.diffusion.sigma_data,
        recipe.diffusion.p_mean,
        recipe.diffusion.p_std,
    )

    def loss(
        model: nn.Module, x0: Tensor, labels: Tensor | None, noise: Tensor, sigma: Tensor
    ) -> Tensor:
        assert isinstance(model, EDMPrecond)
        sigma = sigma.to(x0.device)
        denoised = model(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, labels).float()
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        u = model.logvar(sigma).reshape(-1)
        return weight / u.exp() * ((denoised - x0) ** 2).mean(dim=(1, 2, 3)) + u

    def draw(batch: int, generator: torch.Generator) -> Tensor:
        return torch.exp(p_mean + p_std * torch.randn(batch, generator=generator))

    return loss, draw


class BareLoop:
    """The hand-written training loop: batch, loss, backward, Adam step. Nothing else."""

    def __init__(self, recipe: Recipe, device: torch.device) -> None:
        self.recipe, self.device = recipe, device
        self.dataset = build_dataset(recipe.data)
        self.num_classes = self.dataset.num_classes if recipe.model.class_cond else 0
        torch.manual_seed(recipe.train.seed)  # the weights dmstab's run starts from
        self.model = build_model(recipe, self.dataset.num_classes).to(device)
        edm = recipe.diffusion.formulation == "edm"
        self.loss, self.draw = _edm_loss(recipe) if edm else _ddpm_loss(recipe, device)
        self.one_hot = edm
        optim = recipe.optim
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=optim.lr, betas=optim.betas)
        self.generator = torch.Generator().manual_seed(recipe.train.seed + 1)

    def batch(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        size = self.recipe.train.batch_size
        indices = torch.randint(0, len(self.dataset), (size,), generator=self.generator)
        x0, labels = self.dataset.get_batch(indices)
        x0 = x0.to(self.device)
        if self.num_classes:
            labels = labels.to(self.device)
            if self.one_hot:
                labels = nn.functional.one_hot(labels.long(), self.num_classes).float()
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        return x0, labels if self.num_classes else None, noise, self.draw(size, self.generator)

    def step(self) -> None:
        x0, labels, noise, level = self.batch()
        with autocast(self.device, self.recipe.train.precision):
            loss = self.loss(self.model, x0, labels, noise, level.to(self.device)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def step_flops(self) -> float:
        """FLOPs of one step (forward and backward), counted by torch."""
        with FlopCounterMode(display=False) as counter:
            self.step()
        return float(counter.get_total_flops())

    def loss_difference(self) -> float:
        """|bare loss − dmstab objective's loss| / |dmstab's| on one batch with the same draws."""
        x0, labels, noise, level = self.batch()
        key = "sigma" if self.one_hot else "t"
        draws = {key: level, "keep": torch.ones(len(level), dtype=torch.bool)}
        objective = build_objective(self.recipe, self.dataset.num_classes)
        model = wake(copy.deepcopy(self.model))  # its output depends on x_t, t and labels
        with torch.no_grad():
            mine = self.loss(model, x0, labels, noise, level.to(self.device)).mean()
            if self.one_hot:  # dmstab's objective makes the one-hot vectors itself
                labels = None if labels is None else labels.argmax(dim=1)
            theirs = objective.terms(model, x0, labels, noise, draws, 1)["loss"].mean()
        return float((mine - theirs).abs() / theirs.abs())


class _Alternating:
    """The loop's progress display: between two `advance` calls dmstab trained `every` steps;
    inside each call the bare loop trains as many, so both sides alternate."""

    def __init__(self, bare: BareLoop, every: int, warmup: int, device: torch.device) -> None:
        self.bare, self.every, self.warmup = bare, every, warmup
        self.dmstab = SideTimer("dmstab train loop", device)
        self.baseline = SideTimer("bare loop", device)
        self.windows = 0

    def start(self, total: int, completed: int) -> None:
        self.dmstab.begin()

    def advance(self, step: int, loss: float, images_per_s: float) -> None:
        record = self.windows >= self.warmup
        self.dmstab.end(calls=self.every, record=record)
        self.baseline.begin()
        for _ in range(self.every):
            self.bare.step()
        self.baseline.end(calls=self.every, record=record)
        self.windows += 1
        self.dmstab.begin()

    def stop(self) -> None:
        return None


def power_ema_update_seconds(
    model: nn.Module, sigma_rels: tuple[float, ...], device: torch.device, updates: int = 20
) -> float:
    """Median time of one update of the recipe's power EMAs (EDM2 Eq. 2, every step): what
    they add to dmstab's step."""
    power_ema = PowerEMA(model, sigma_rels)
    timer = SideTimer("power EMA update", device)
    for step in range(1, updates + 1):
        timer.begin()
        power_ema.update(model, step)
        timer.end()
    return timer.result().median


def compare(setup: Setup, device: torch.device) -> Comparison:
    with tempfile.TemporaryDirectory() as folder:
        steps = setup.warmup + setup.windows
        overrides = [*QUIET, *setup.overrides, *tracked_overrides(Path(folder), device)]
        recipe = load_recipe(RECIPES / setup.recipe, overrides)
        every = recipe.train.log_every
        recipe = load_recipe(RECIPES / setup.recipe, [*overrides, f"train.steps={steps * every}"])
        bare = BareLoop(recipe, device)
        loss_difference = bare.loss_difference()
        flops = bare.step_flops()
        progress = _Alternating(bare, every, setup.warmup, device)
        progress.dmstab.flops = progress.baseline.flops = flops
        train(recipe, progress=progress)
    comparison = Comparison(
        benchmark="train_step",
        title=f"training step, {recipe.name}",
        config={
            "recipe": setup.recipe,
            "overrides": list(setup.overrides),
            "parameters": count_parameters(bare.model),
            "batch_size": recipe.train.batch_size,
            "precision": recipe.train.precision,
            "log_every": every,
            "timed_steps": setup.windows * every,
            "unit": "seconds per step",
        },
        device=describe_device(device),
        sides=[progress.dmstab.result(), progress.baseline.result()],
        subject=progress.dmstab.name,
        baseline=progress.baseline.name,
        target="≤ 1.05× the bare loop",
        checks={"bare_loss_relative_difference": loss_difference},
    )
    dmstab_mean, bare_mean = (sum(s.seconds) / len(s.seconds) for s in comparison.sides)
    comparison.checks["mean_ratio"] = dmstab_mean / bare_mean
    if recipe.ema.power_sigma_rels:
        update = power_ema_update_seconds(bare.model, recipe.ema.power_sigma_rels, device)
        comparison.checks["power_ema_update_s"] = update
        comparison.checks["power_ema_update_fraction"] = (
            update / comparison.side(comparison.baseline).median
        )
    comparison.met = comparison.ratio <= 1.05
    return comparison


def run(size: Size, device: torch.device) -> list[Comparison]:
    return [compare(setup, device) for setup in SIZES[size]]
