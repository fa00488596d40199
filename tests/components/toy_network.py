"""A toy network for `model.name: toy_convnet`: conv → + time embedding → SiLU → conv.

Its keys are `model.width`; its check refuses a width below 1. It is what a user's own
network module looks like: a dataclass, a check, a build and one registration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dmstab.config import ModelConfig, Recipe
from dmstab.errors import DmstabError
from dmstab.models.network import model_config, register_network


@dataclass(frozen=True)
class ToyConvConfig(ModelConfig):
    width: int = 8


class ToyConvNet(nn.Module):
    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.inner = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.outer = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        time = self.time(t.float().reshape(-1, 1) / 1000.0)[:, :, None, None]
        return self.outer(torch.nn.functional.silu(self.inner(x) + time))


def parameter_count(channels: int, width: int) -> int:
    """Two 3×3 convolutions and a 1→width linear layer, each with biases."""
    return (9 * channels * width + width) + (2 * width) + (9 * width * channels + channels)


def check(recipe: Recipe) -> None:
    width = model_config(recipe, ToyConvConfig).width
    if width < 1:
        raise DmstabError(f"model.width is {width}; must be at least 1")


def build(recipe: Recipe, num_classes: int) -> nn.Module:
    return ToyConvNet(recipe.data.channels, model_config(recipe, ToyConvConfig).width)


register_network("toy_convnet", ToyConvConfig, build, check)
