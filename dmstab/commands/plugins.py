"""Components from outside dmstab: `DMSTAB_PLUGINS=pkg.module[,other.module]` names modules
that register networks, prediction targets, timestep samplers, samplers or analyses when
imported (docs/architecture.md, "Adding things"). Every command imports them before it reads
a recipe, so their names work in recipes, overrides and `dmstab analyse`.
"""

from __future__ import annotations

import importlib
import os

from dmstab.errors import DmstabError

PLUGINS_VARIABLE = "DMSTAB_PLUGINS"


def load_plugins(spec: str | None = None) -> list[str]:
    """Import every module `spec` (default: $DMSTAB_PLUGINS) lists, comma-separated; the names."""
    text = os.environ.get(PLUGINS_VARIABLE, "") if spec is None else spec
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise DmstabError(
                f"{PLUGINS_VARIABLE} names module {name!r}, which cannot be imported: {exc}"
            ) from None
    return names
