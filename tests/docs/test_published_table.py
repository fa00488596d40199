"""The docs' table of released checkpoints (docs/gen_published.py) against the format registry
and the bundled recipes: every known file is listed once with its download address, and every
file a recipe lists under `consistency.published` or `fid_sweep` is one dmstab knows and the
table links to that recipe."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import yaml

from dmstab.published import FORMATS, known_file
from tests.helpers import RECIPES

GENERATOR = Path(__file__).resolve().parents[2] / "docs" / "gen_published.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_published", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_known_file_is_listed_once_with_its_url() -> None:
    table = load_generator().published_table()
    for published in FORMATS.values():
        for known in published.known_files:
            assert table.count(f"[`{known.name}`]({known.url})") == 1, known.name


def test_every_published_file_a_recipe_names_is_known_and_linked_to_the_recipe() -> None:
    table = load_generator().published_table().splitlines()
    named = 0
    for path in sorted(RECIPES.glob("*.yaml")):
        tree = yaml.safe_load(path.read_text()) or {}
        sweep = tree.get("fid_sweep") or {}
        entries = [*(tree.get("consistency") or {}).get("published", [])]
        entries += [*sweep.get("published", []), *([sweep["guide"]] if sweep.get("guide") else [])]
        for entry in entries:
            known = known_file(Path(entry.split()[0]))
            assert known is not None, f"{path.name}: {entry} is not a file dmstab knows"
            (row,) = [line for line in table if f"[`{known.name}`]" in line]
            assert f"`{path.name}`" in row
            named += 1
    assert named >= 13  # Fig. 1b/1c, the two Table 1 rows and EDM2 Fig. 6's seven files
