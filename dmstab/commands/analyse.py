"""`dmstab analyse NAME ...`: any registered analysis by its section name.

The built-in analyses have verbs of their own (`dmstab hessian` is `dmstab analyse hessian`);
this verb also runs the ones a plugin registers (`DMSTAB_PLUGINS`, dmstab.commands.plugins).
An analysis registers `main(arguments)` with `ANALYSES.register(section, main, config=…)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dmstab.config import ANALYSES

# An analysis returns its summary (what `--json` prints), or None (a plugin's may).
AnalysisMain = Callable[[Sequence[str]], Mapping[str, Any] | None]


def main(name: str, arguments: Sequence[str]) -> Mapping[str, Any] | None:
    """Run the analysis registered as `name` on `arguments` (a recipe or trained models, and
    overrides); an unknown name is one line listing the registered ones."""
    run: AnalysisMain = ANALYSES.get(name, "analysis").implementation
    return run(arguments)
