"""Registering a network: its recipe keys, its recipe check and how to build it.

A network module defines a dataclass extending `ModelConfig` with the keys it reads, a
`check(recipe)` that names the key to change when a layout cannot be built, and a
`build(recipe, num_classes)`; `register_network` makes it selectable as `model.name`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from dmstab.config import MODELS, ModelConfig, Recipe
from dmstab.config.registry import RecipeCheck
from dmstab.errors import DmstabError

ConfigT = TypeVar("ConfigT", bound=ModelConfig)
Build = Callable[[Recipe, int], nn.Module]


@dataclass(frozen=True)
class Network:
    """How to build a registered network (and, for a GAN, its discriminator)."""

    build: Build
    build_discriminator: Build | None = None


def register_network(
    name: str,
    config: type[ModelConfig],
    build: Build,
    check: RecipeCheck | None = None,
    *,
    build_discriminator: Build | None = None,
) -> None:
    """`model.name: name` selects `config`'s keys, runs `check` and builds with `build`."""
    MODELS.register(name, Network(build, build_discriminator), config=config, check=check)


def network(name: str) -> Network:
    implementation = MODELS.get(name).implementation
    assert isinstance(implementation, Network), f"model.name {name} is not a Network"
    return implementation


def model_config(recipe: Recipe, config: type[ConfigT]) -> ConfigT:
    """`recipe.model` as the network's own dataclass (what its `model.name` registered)."""
    model = recipe.model
    if not isinstance(model, config):
        raise TypeError(
            f"model.name {model.name} has keys {type(model).__name__}, not {config.__name__}"
        )
    return model


def check_dropout(rate: float) -> None:
    """`model.dropout` is a probability below 1."""
    if not 0.0 <= rate < 1.0:
        raise DmstabError(f"model.dropout is {rate}; must be in [0, 1)")
