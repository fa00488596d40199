"""The loss the Hessian and landscape benchmarks analyse: the fixed-batch DM loss that `dmstab
hessian` and `dmstab landscape` build (dmstab.analysis.fixed_batch, its "mean" loss: one seeded
batch of the recipe's training data, seeded noise, one seeded timestep per sample), on a freshly
initialised network of the recipe, since timing does not depend on the weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import dmstab.commands  # noqa: F401  (registers every component and analysis a recipe names)
from dmstab.analysis.fixed_batch import MEAN_LOSS, diffusion_losses, fixed_batch
from dmstab.analysis.hessian import Loss
from dmstab.config import Recipe, load_recipe
from dmstab.data import build_dataset
from dmstab.models import build_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# What the sizes change of recipes/mini_stability_dm.yaml (the mini AAAI study's DM, 1.14 M
# parameters at 32x32): a small synthetic set to draw the batch from, fp32 as the analyses run.
CPU_OVERRIDES = ("data.synthetic_size=512", "train.precision=fp32")
# The papers' networks (the ID CIFAR-10 model, 52.5 M parameters) on synthetic 32x32 images,
# since nothing is downloaded.
FULL_OVERRIDES = ("data.name=synthetic", "data.synthetic_size=1024", "train.precision=fp32")
# One level of 32 channels with attention, on 8x8 images: the test suite's toy size.
TOY_OVERRIDES = (
    "data.synthetic_size=32",
    "data.resolution=8",
    "model.channels=32",
    "model.channel_mult=[1]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[8]",
    "model.num_heads=2",
    "diffusion.steps=100",
    "train.precision=fp32",
)


@dataclass(frozen=True)
class FixedBatchProblem:
    """A network and its fixed-batch mean loss, with what built them."""

    recipe: Recipe
    num_classes: int
    model: nn.Module
    loss: Loss
    batch_size: int
    seed: int

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def describe(self) -> dict[str, object]:
        return {"parameters": self.parameters, "batch": self.batch_size}


def fixed_batch_problem(
    recipe: str,
    overrides: Sequence[str],
    batch_size: int,
    device: torch.device,
    seed: int = 0,
) -> FixedBatchProblem:
    """`recipe` (a file under recipes/) with `overrides`: its network initialised from `seed`
    and the fixed-batch mean loss of `batch_size` images, on `device`."""
    loaded = load_recipe(RECIPES / recipe, list(overrides))
    num_classes = build_dataset(loaded.data).num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(loaded, num_classes).to(device)
    batch = fixed_batch(loaded, batch_size, seed, device)
    losses = diffusion_losses(loaded, num_classes, batch, (), seed=seed, step=0)
    return FixedBatchProblem(loaded, num_classes, model, losses[MEAN_LOSS], batch_size, seed)
