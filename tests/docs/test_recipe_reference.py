"""The recipe reference the docs site generates (docs/gen_reference.py) against the schema.

The keys expected here come from `dmstab.config.flatten` of a recipe built with every
registered network and analysis, not from the generator's own walk of the dataclasses, so a
key the generator skips, or a section it files under the wrong heading, fails. No mkdocs
needed: the generator is plain Python.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest

import dmstab.commands  # noqa: F401  (registers the built-in networks and analyses)
from dmstab.config import ANALYSES, MODELS, Component, Recipe, flatten

GENERATOR = Path(__file__).resolve().parents[2] / "docs" / "gen_reference.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page() -> str:
    return str(load_generator().render())


def sections_of(page: str) -> dict[str, str]:
    """Heading title -> the text under it, for the page's `## ` headings."""
    parts = re.split(r"^## `?([^`\n]+)`?$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def key_rows(text: str) -> dict[str, list[str]]:
    """The table rows under a heading: key -> its cells (type, default, description)."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([\w.]+)` \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = re.split(r"(?<!\\) \| ", match.group(2))
    return rows


def built_in(registry: Iterable[Component]) -> list[Component]:
    """What dmstab registers itself: another test of this session may have registered a plugin
    network (tests/components), whose keys the page does not list."""
    return [c for c in registry if (c.config or c.implementation).__module__.startswith("dmstab.")]


def analyses() -> dict[str, object]:
    return {c.name: c.config() for c in built_in(ANALYSES) if c.config is not None}


def test_every_network_key_is_in_its_network_section(page: str) -> None:
    sections = sections_of(page)
    for component in built_in(MODELS):
        assert component.config is not None
        recipe = Recipe(model=component.config(name=component.name))
        model_keys = {k for k in flatten(recipe) if k.startswith("model.")}
        documented = key_rows(sections[f"model.name: {component.name}"])
        documented |= key_rows(sections["model"])
        assert model_keys <= documented.keys(), component.name


def test_every_other_key_is_in_its_section(page: str) -> None:
    sections = sections_of(page)
    flat = flatten(Recipe(analyses=analyses()))
    assert len(flat) > 100  # the whole schema, not an empty recipe
    for key in flat:
        section = key.split(".")[0]
        if section == "model":
            continue
        assert key in key_rows(sections[section]), key


def test_every_key_has_type_default_and_description_and_every_name_is_listed(page: str) -> None:
    sections = sections_of(page)
    names = sections.pop("Registered names")
    for component in [*built_in(MODELS), *built_in(ANALYSES)]:
        assert f"`{component.name}`" in names
    rows = [row for text in sections.values() for row in key_rows(text).values()]
    assert rows
    for cells in rows:
        assert len(cells) == 3 and all(cell.strip() for cell in cells), cells


def test_defaults_are_the_schema_defaults(page: str) -> None:
    """A spot check that the default column is read from the dataclasses."""
    rows = key_rows(sections_of(page)["optim"])
    assert rows["optim.lr"][1] == f"`{Recipe().optim.lr!r}`"
    assert rows["optim.betas"][1] == "`[0.9, 0.999]`"
    assert key_rows(sections_of(page)["sample"])["sample.s_max"][1] == "`inf`"
