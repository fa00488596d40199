"""The table of released checkpoints `dmstab import` knows by name, from the format registry
(`dmstab.published.FORMATS`), with the bundled recipes that use each file: the docs page
"Reproducing the papers" shows it, generated when the site is built, never kept by hand."""

from __future__ import annotations

from pathlib import Path

from dmstab.published import FORMATS, KnownFile

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipes_using(known: KnownFile, recipes: Path = RECIPES) -> list[str]:
    """The bundled recipes whose text names the released file."""
    return sorted(p.name for p in recipes.glob("*.yaml") if known.name in p.read_text())


def published_table(recipes: Path = RECIPES) -> str:
    """One row per released file: format, what it is, paper, download, import command and the
    recipes that read it."""
    lines = [
        "| file | format | model | paper | import | recipes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for published in FORMATS.values():
        for known in published.known_files:
            using = ", ".join(f"`{name}`" for name in recipes_using(known, recipes))
            cells = [
                f"[`{known.name}`]({known.url})",
                f"`{published.name}`",
                known.description,
                known.paper,
                f"`dmstab import models/{known.name}`",
                using,
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(published_table())
