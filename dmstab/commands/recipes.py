"""`dmstab recipes`: the bundled recipes, what each one is for and the paper table or figure it
reproduces (its `paper:` block, with the `base:` chain merged). The docs' table of paper recipes
(docs/gen_reference.py) is built from the same listing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from dmstab.config import load_tree
from dmstab.console import result_table
from dmstab.errors import DmstabError

BUNDLED = Path(__file__).resolve().parents[2] / "recipes"  # the repository's recipes/ folder
# A sentence ends at a full stop and a capital, not after an abbreviation ("App. B.1").
_ABBREVIATIONS = ("App", "Sec", "Fig", "Figs", "Eq", "Eqs", "Tab", "al", "e.g", "i.e", "cf", "vs")
_SENTENCE_END = re.compile(
    "".join(f"(?<!\\b{re.escape(a)}\\.)" for a in _ABBREVIATIONS) + r"(?<=[.!?])\s+(?=[A-Z`(\"])"
)


@dataclass(frozen=True)
class RecipeEntry:
    """One bundled recipe: its file, what its opening comment says it is, and what its merged
    tree says it reproduces."""

    path: Path
    description: str
    paper: Mapping[str, Any]  # the merged `paper:` block ({} when it has none)
    data: Mapping[str, Any]  # the merged `data:` section
    sweep: bool  # it trains every point of a `sweep:`

    @property
    def reproduces(self) -> str:
        """The paper's table or figure, e.g. "Table 3, ID+Ours" ("" when none)."""
        return str(self.paper.get("table") or "")


def opening_comment(path: Path) -> str:
    """The first sentence of the comment block a recipe file opens with ("" when none)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(" ".join(lines).split())
    return _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""


def bundled_recipes(folder: Path = BUNDLED) -> list[RecipeEntry]:
    """The recipes of `folder` by name, leaving out the `*_base.yaml` files the others build on.
    A recipe without an opening comment is described by its paper table."""
    if not folder.is_dir():
        raise DmstabError(f"no recipes folder at {folder}")
    entries = []
    for path in sorted(folder.glob("*.yaml")):
        if path.stem.endswith("_base"):
            continue
        tree = load_tree(path)
        paper = tree.get("paper") or {}
        entries.append(
            RecipeEntry(
                path=path,
                description=opening_comment(path) or str(paper.get("table") or ""),
                paper=paper,
                data=tree.get("data") or {},
                sweep="sweep" in tree,
            )
        )
    return entries


def main(folder: Path = BUNDLED) -> dict[str, Any]:
    """Print the recipes as a table; their names, paths, descriptions and papers as the summary."""
    entries = bundled_recipes(folder)
    table = Table(
        title=f"{len(entries)} recipes in {folder}",
        caption="dmstab train recipes/NAME; the published values: docs/reproducing.md",
    )
    table.add_column("recipe", no_wrap=True)
    table.add_column("reproduces", max_width=28)
    table.add_column("description", min_width=24)
    for e in entries:  # one line each on a terminal: the description cut with … to fit
        description = Text(e.description, no_wrap=True, overflow="ellipsis")
        table.add_row(e.path.name, e.reproduces, description)
    result_table(table)
    return {
        "folder": str(folder),
        "recipes": [
            {
                "name": e.path.name,
                "path": str(e.path),
                "description": e.description,
                "reproduces": e.reproduces,
                "paper": dict(e.paper),
                "sweep": e.sweep,
            }
            for e in entries
        ],
    }
