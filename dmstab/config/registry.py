"""Named components a recipe selects: networks, prediction targets, timestep samplers,
samplers and analyses.

A registry maps a name to a `Component`: the implementation, registered by the layer that owns
it (this layer never imports one), the dataclass of the recipe keys the component brings, and
a check of the whole recipe. Loading a recipe looks the name up to parse those keys, so a new
component is one module and one `register` call, and its keys come with it.

The `model` section takes the dataclass `model.name` registered, a subclass of `ModelConfig`.
An analysis's dataclass is a top-level section of its own (`hessian:`), present in a recipe
only when the recipe sets it. Targets, timestep samplers and samplers bring no keys: they read
the `diffusion`, `timesteps` and `sample` sections, and say which of those keys are theirs alone
(`reads`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dmstab.errors import DmstabError

RecipeCheck = Callable[..., None]
"""check(recipe): what the component needs of the whole recipe. Samplers, which the recipe may
name under several keys, get that key too: check(recipe, key)."""


@dataclass(frozen=True)
class Component:
    """One registered name: what implements it, its recipe keys and its recipe check."""

    name: str
    implementation: Any
    config: type | None = None
    check: RecipeCheck | None = None
    reads: tuple[str, ...] = ()  # recipe keys only this kind of component reads ("sample.eta")


class Registry:
    """Components selected by the recipe key `key` (e.g. "model.name")."""

    def __init__(self, key: str, base: type | None = None) -> None:
        self.key = key
        self.base = base  # the section's base dataclass a variant's `config` must extend
        self._components: dict[str, Component] = {}

    def register(
        self,
        name: str,
        implementation: Any = None,
        *,
        config: type | None = None,
        check: RecipeCheck | None = None,
        reads: tuple[str, ...] = (),
    ) -> Component:
        """Make `name` selectable; a name is registered once. `reads`: the recipe keys of the
        shared section that this component reads and others of its kind may not (`sample.eta`
        for DDIM): a run logs them only when the component that reads them is selected."""
        if name in self._components:
            raise DmstabError(f"{self.key} {name!r} is already registered")
        if config is not None and not dataclasses.is_dataclass(config):
            raise DmstabError(f"{self.key} {name!r}: config must be a dataclass, got {config!r}")
        if config is not None and self.base is not None and not issubclass(config, self.base):
            raise DmstabError(
                f"{self.key} {name!r}: config {config.__name__} must extend {self.base.__name__}"
            )
        component = Component(name, implementation, config, check, reads)
        self._components[name] = component
        return component

    def get(self, name: str, key: str | None = None) -> Component:
        """The component `name`; unknown, a one-line error under `key` (default: the registry's)."""
        component = self._components.get(name)
        if component is None:
            raise DmstabError(
                f"{key or self.key} {name!r} is not registered; registered: "
                f"{', '.join(self.names())} (DMSTAB_PLUGINS imports a plugin's own)"
            )
        return component

    def names(self) -> list[str]:
        return sorted(self._components)

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def __iter__(self) -> Iterator[Component]:
        return iter(self._components.values())
