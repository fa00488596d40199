"""dmstab's samplers against bare hand-written loops of the same math, on the same network and
the same noise: ancestral DDPM (Ho et al. 2020 Alg. 2), DDIM (Song et al. 2021 Eq. 12) and
EDM's Heun (Karras et al. 2022 Alg. 1).

dmstab's side is what `dmstab sample` runs per batch (dmstab.models.generate): the sampler the
registry names, walking the recipe's schedule, with the labels bound and every draw from a
`NoiseSource` (one numpy stream per image, so a seed fixes each image whatever the batch).
The bare side is the loop written out from the papers over tensors: the respaced ᾱ table, the
update, the clipping, with the same draws handed over as one stacked tensor made beforehand.
Its output must equal dmstab's to float tolerance (the comparison checks it), so the timing
compares the same work.

Target (issue 17): each sampler at most 1.05× its bare loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.harness import (
    Comparison,
    Side,
    Size,
    describe_device,
    measure,
    relative_difference,
    wake,
)
from dmstab.config import Recipe, load_recipe
from dmstab.data import build_dataset
from dmstab.diffusion import build_diffusion
from dmstab.diffusion.ddpm_sampling import DDIM_SPACING, DDPM_SPACING, space_timesteps
from dmstab.diffusion.samplers import find_sampler
from dmstab.diffusion.sampling import NoiseSource, with_labels
from dmstab.models import build_model
from dmstab.models.generate import class_labels, noise_shape, sampling_schedule

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOLERANCE = 1e-4  # relative L2 difference of the two sides' samples


@dataclass(frozen=True)
class Setup:
    recipe: str
    overrides: tuple[str, ...]
    images: int
    repeats: int


_TOY_DDPM = ("data.resolution=8", "data.synthetic_size=16", "model.channel_mult=[1]")
_TOY_EDM = (
    "data.resolution=8",
    "data.synthetic_size=16",
    "model.channels=16",
    "model.channel_mult=[1]",
    "model.edm2.channels_per_head=16",
    "model.edm2.logvar_channels=16",
)
_ID = ("data.name=synthetic", "model.learn_sigma=false")
# recipe, its overrides (sampler and steps), images per batch, timed repeats
SIZES: dict[Size, list[Setup]] = {
    "toy": [
        Setup(
            "quickstart.yaml",
            (*_TOY_DDPM, "sample.sampler=ddpm", "sample.steps=4", "sample.eta=0"),
            2,
            2,
        ),
        Setup("quickstart.yaml", (*_TOY_DDPM, "sample.steps=4"), 2, 2),
        Setup("edm2_mini.yaml", (*_TOY_EDM, "sample.steps=4"), 2, 2),
    ],
    # 8 timed calls a side: on a busy 2-core machine 4 left the ratio drifting by ±5%
    "cpu": [
        Setup("quickstart.yaml", ("sample.sampler=ddpm", "sample.steps=50", "sample.eta=0"), 8, 8),
        Setup("quickstart.yaml", (), 8, 8),  # DDIM, 50 steps, η = 1
        Setup("edm2_mini.yaml", ("sample.steps=16",), 8, 8),  # Heun, NFE 31
    ],
    # The ID network without its learned-Σ half: the bare loops use the fixed variance.
    "full": [
        Setup("cifar10_base.yaml", (*_ID, "sample.sampler=ddpm"), 250, 3),  # DDPM 250 steps
        Setup("cifar10_base.yaml", (*_ID, "sample.sampler=ddim", "sample.steps=50"), 250, 3),
        Setup("edm2_img64_s.yaml", ("data.name=synthetic",), 64, 3),  # Heun 32 steps, NFE 63
    ],
}


def _at(table: Tensor, index: int, like: Tensor) -> Tensor:
    """table[index] (float64) as a float32 scalar on x's device."""
    return table[index].to(torch.float32).to(like.device)


def bare_ddpm(
    network: nn.Module, recipe: Recipe, draws: Tensor, labels: Tensor | None, ddim: bool
) -> Tensor:
    """Ancestral DDPM (Ho et al. Alg. 2, σ_t² = β_t "fixedlarge") or DDIM (Song et al. Eq. 12,
    σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√β_t), x̂0 clipped to [−1, 1], over the respaced chain."""
    cfg, T = recipe.sample, recipe.diffusion.steps
    kept = space_timesteps(T, cfg.steps, DDIM_SPACING if ddim else DDPM_SPACING)
    alpha_bar = build_diffusion(recipe).alphas_cumprod[kept]  # float64, the recipe's schedule
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta = 1 - alpha_bar / previous
    posterior_x0 = beta * previous.sqrt() / (1 - alpha_bar)
    posterior_xt = (1 - previous) * (1 - beta).sqrt() / (1 - alpha_bar)
    posterior_var = beta * (1 - previous) / (1 - alpha_bar)
    fixed_large = torch.cat([posterior_var[1:2], beta[1:]])
    sigma = cfg.eta * torch.sqrt((1 - previous) / (1 - alpha_bar) * beta)
    direction = torch.sqrt((1 - previous - sigma**2).clamp(min=0.0))
    times = torch.tensor(kept, dtype=torch.float32) * (1000.0 / T)
    x, later = draws[0], iter(draws[1:])
    with torch.no_grad():
        for i in reversed(range(len(kept))):
            level = times[i].expand(x.shape[0]).to(x.device)
            eps = network(x, level, labels).float()
            a, s = _at(alpha_bar.sqrt(), i, x), _at((1 - alpha_bar).sqrt(), i, x)
            x0 = ((x - s * eps) / a).clamp(-1.0, 1.0)
            if ddim:
                eps = (x - a * x0) / s
                x = _at(previous.sqrt(), i, x) * x0 + _at(direction, i, x) * eps
                if cfg.eta > 0 and i > 0:
                    x = x + _at(sigma, i, x) * next(later)
            else:
                x = _at(posterior_x0, i, x) * x0 + _at(posterior_xt, i, x) * x
                if i > 0:
                    x = x + torch.exp(0.5 * _at(fixed_large.log(), i, x)) * next(later)
    return x.clamp(-1.0, 1.0)


def bare_heun(network: nn.Module, recipe: Recipe, draws: Tensor, labels: Tensor | None) -> Tensor:
    """EDM Alg. 1: σ_i = (σmax^(1/ρ) + i/(N−1)(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, then 0; an Euler
    step of dx/dσ = (x − D(x, σ))/σ and, but for the last, its trapezoidal correction."""
    cfg = recipe.sample
    top, bottom = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    levels = [(top + i / (cfg.steps - 1) * (bottom - top)) ** cfg.rho for i in range(cfg.steps)]
    levels.append(0.0)
    x = draws[0] * levels[0]
    batch = x.shape[0]
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(levels):
            slope = (x - network(x, torch.full((batch,), sigma, device=x.device), labels)) / sigma
            euler = x + (sigma_next - sigma) * slope
            if sigma_next == 0:
                x = euler
                continue
            level = torch.full((batch,), sigma_next, device=x.device)
            slope_next = (euler - network(euler, level, labels)) / sigma_next
            x = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
    return x


def _draw_count(recipe: Recipe) -> int:
    """x_T plus one draw per step but the last (DDPM, DDIM with η > 0), else x_T alone."""
    cfg = recipe.sample
    stochastic = cfg.sampler == "ddpm" or (cfg.sampler == "ddim" and cfg.eta > 0)
    return cfg.steps if stochastic else 1


def compare(setup: Setup, device: torch.device) -> Comparison:
    # a few synthetic images: the network needs only their class count
    recipe = load_recipe(RECIPES / setup.recipe, [*setup.overrides, "data.synthetic_size=16"])
    cfg = recipe.sample
    num_classes = build_dataset(recipe.data).num_classes if recipe.model.class_cond else 0
    torch.manual_seed(0)
    network = wake(build_model(recipe, num_classes)).to(device).eval()
    labels = class_labels(0, setup.images, num_classes)
    edm = recipe.diffusion.formulation == "edm"
    if labels is not None:
        labels = (nn.functional.one_hot(labels, num_classes).float() if edm else labels).to(device)
    shape = noise_shape(recipe)
    sampler, schedule = find_sampler(cfg.sampler), sampling_schedule(recipe, cfg)

    def dmstab_side() -> Tensor:
        noise = NoiseSource(cfg.seed, 0, setup.images, shape, device)
        return sampler(with_labels(network, labels), noise, schedule)

    source = NoiseSource(cfg.seed, 0, setup.images, shape, device)
    draws = torch.stack([source.next() for _ in range(_draw_count(recipe))])
    bare: Callable[[], Tensor] = (
        (lambda: bare_heun(network, recipe, draws, labels))
        if edm
        else (lambda: bare_ddpm(network, recipe, draws, labels, ddim=cfg.sampler == "ddim"))
    )
    difference = relative_difference(dmstab_side(), bare())
    name = f"{cfg.sampler}{cfg.steps}" + (f" η={cfg.eta:g}" if cfg.sampler == "ddim" else "")
    sides = [Side(f"dmstab {cfg.sampler}", dmstab_side), Side(f"bare {cfg.sampler}", bare)]
    comparison = Comparison(
        benchmark="sampling",
        title=f"{name}, {recipe.name}, {setup.images} images",
        config={
            "recipe": setup.recipe,
            "overrides": list(setup.overrides),
            "sampler": cfg.sampler,
            "steps": cfg.steps,
            "eta": cfg.eta,
            "images": setup.images,
            "network_evaluations": 2 * cfg.steps - 1 if edm else cfg.steps,
        },
        device=describe_device(device),
        sides=measure(sides, device=device, warmup=0, repeats=setup.repeats),  # warmed by the check
        subject=sides[0].name,
        baseline=sides[1].name,
        target="≤ 1.05× bare, equal to 1e-4",
        checks={"relative_difference": difference},
    )
    comparison.met = comparison.ratio <= 1.05 and difference <= TOLERANCE
    return comparison


def run(size: Size, device: torch.device) -> list[Comparison]:
    return [compare(setup, device) for setup in SIZES[size]]
