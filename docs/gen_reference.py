"""The recipe reference page, generated from dmstab's recipe schema when the site builds.

Nothing here is kept by hand: the sections are the fields of `dmstab.config.Recipe`, the
`model` keys those of every network in `MODELS`, the analysis sections those of every entry in
`ANALYSES`; each key's type and default come from its dataclass and its description from the
string literal under the field (or, failing that, the comment on the field's line). The
section text is the dataclass's docstring. `hooks.py` puts the page into the mkdocs build;
tests/docs/test_recipe_reference.py checks that every key of the schema is in it.

dmstab itself never imports this module (nor mkdocs).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dmstab.commands  # noqa: F401  (registers the built-in networks, samplers and analyses)
from dmstab.commands.recipes import BUNDLED, bundled_recipes
from dmstab.config import (
    ANALYSES,
    MODELS,
    SAMPLERS,
    TARGETS,
    TIMESTEP_SAMPLERS,
    Recipe,
)
from dmstab.config.registry import Component, Registry
from dmstab.config.schema import ModelConfig

PAGE = "recipe-reference.md"  # the generated page, relative to docs/


@dataclass(frozen=True)
class Row:
    key: str  # dotted, from the recipe's root: `model.edm2.clip_act`
    type: str
    default: str  # markdown: a YAML value in backticks, or words
    description: str


@dataclass(frozen=True)
class Section:
    title: str  # the heading: `data`, `model.name: adm_unet`, `hessian`
    description: str
    rows: tuple[Row, ...]


def _source_notes(cls: type) -> dict[str, str]:
    """Field name -> the string literal under it, else the comment on its line, for the
    fields `cls` itself defines (not inherited ones)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    notes: dict[str, str] = {}
    for statement, following in zip(body.body, [*body.body[1:], None], strict=True):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        name = statement.target.id
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            notes[name] = inspect.cleandoc(following.value.value)
        elif statement.end_lineno in comments:
            notes[name] = comments[statement.end_lineno]
    return notes


def field_notes(cls: type) -> dict[str, str]:
    """`_source_notes` over `cls` and its bases: a subclass's note wins."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            notes.update(_source_notes(klass))
    return notes


def type_name(hint: Any) -> str:
    """A recipe author's name for a type hint: `int`, `list of int`, one of `a`, `b`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or `null`" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if hint is str:
        return "string"
    return getattr(hint, "__name__", str(hint))


def yaml_value(value: Any) -> str:
    """A default as a recipe writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return repr(value)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def rows(cls: type, prefix: str, skip: frozenset[str] = frozenset()) -> list[Row]:
    """One row per key of the dataclass `cls` under `prefix`; a field that is itself a
    dataclass (`model.edm2`) gives its keys, dotted."""
    hints = typing.get_type_hints(cls)
    notes = field_notes(cls)
    out: list[Row] = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        key, hint = f"{prefix}.{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            assert isinstance(hint, type)
            out += rows(hint, key)
            continue
        default = f"`{yaml_value(_default(f))}`"
        out.append(Row(key, type_name(hint), default, notes.get(f.name, "")))
    return out


def _doc(cls: type) -> str:
    """The class's own docstring (not an inherited or the dataclass-made signature one)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def built_in(component: Component) -> bool:
    """Registered by dmstab itself, not by a plugin (whose keys this page does not list)."""
    owner = component.config or component.implementation
    return getattr(owner, "__module__", "").startswith("dmstab.")


def built_in_names(registry: Registry) -> list[str]:
    return sorted(c.name for c in registry if built_in(c))


def sections() -> list[Section]:
    """The reference, top to bottom: the recipe's own sections in schema order, `model` and
    one section per registered network after `model`, then the registered analyses."""
    out: list[Section] = []
    top = typing.get_type_hints(Recipe)
    out.append(
        Section(
            "name",
            "",
            (Row("name", "string", "the file's stem", field_notes(Recipe)["name"]),),
        )
    )
    for f in dataclasses.fields(Recipe):
        if f.name in ("name", "analyses"):  # `name` above; `analyses` are sections of their own
            continue
        cls = top[f.name]
        out.append(Section(f.name, _doc(cls), tuple(rows(cls, f.name))))
        if f.name == "model":
            out += network_sections()
    for component in filter(built_in, ANALYSES):
        assert component.config is not None
        cls = component.config
        out.append(Section(component.name, _doc(cls), tuple(rows(cls, component.name))))
    return out


def network_sections() -> list[Section]:
    """`model.name: NAME` for each registered network: the keys it adds to `ModelConfig`'s."""
    common = frozenset(f.name for f in dataclasses.fields(ModelConfig))
    out = []
    for component in sorted(filter(built_in, MODELS), key=lambda c: c.name):
        assert component.config is not None
        cls = component.config
        text = _doc(cls)
        formulations = "GAN" if cls.adversarial else ", ".join(cls.formulations)
        text += f"\n\nTrains with: {formulations}." if text else f"Trains with: {formulations}."
        out.append(
            Section(f"model.name: {component.name}", text, tuple(rows(cls, "model", common)))
        )
    return out


REGISTRIES: tuple[Registry, ...] = (MODELS, TARGETS, TIMESTEP_SAMPLERS, SAMPLERS, ANALYSES)


_DOCS_PATH = re.compile(r"docs/([\w./-]+\.md)(#[\w-]+)?")


def markdown_text(text: str) -> str:
    """A docstring as markdown: one paragraph per blank-line block, `docs/x.md` as a link."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    linked = [
        _DOCS_PATH.sub(lambda m: f"[{m.group(0)}]({m.group(1)}{m.group(2) or ''})", p)
        for p in paragraphs
    ]
    return "\n\n".join(linked)


def _cell(text: str) -> str:
    return markdown_text(text).replace("\n\n", "<br>").replace("|", "\\|")


def render() -> str:
    """The whole page, markdown."""
    lines = [
        "# Recipe reference",
        "",
        "Every key a recipe may set, generated from the schema (`dmstab.config` and the",
        "dataclasses the networks and analyses register) each time the site is built:",
        "type, default and description are the code's own. How recipes are written, merged",
        "and overridden: [Recipes](recipes.md).",
        "",
        "## Registered names",
        "",
        "| key | built-in names |",
        "| --- | --- |",
    ]
    lines += [
        f"| `{r.key}` | {', '.join(f'`{n}`' for n in built_in_names(r))} |" for r in REGISTRIES
    ]
    lines += [
        "",
        "A plugin (`DMSTAB_PLUGINS`) adds names of its own; its network's or analysis's keys",
        "are then read like these, but are not listed on this page.",
    ]
    for section in sections():
        lines += ["", f"## `{section.title}`", ""]
        if section.description:
            lines += [markdown_text(section.description), ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [
            f"| `{r.key}` | {_cell(r.type)} | {r.default} | {_cell(r.description)} |"
            for r in section.rows
        ]
    return "\n".join(lines) + "\n"


def paper_table(recipes: Path = BUNDLED) -> str:
    """A markdown table of the bundled recipes that carry a `paper:` block: what each
    reproduces, the published values `dmstab report` compares against, and the data it reads
    (`dmstab recipes`' listing: its `base:` chain merged; sweeps included)."""
    lines = [
        "| recipe | paper | table / figure | metric | published | data |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in bundled_recipes(recipes):
        paper, data = entry.paper, entry.data
        if not entry.reproduces:
            continue
        values = ", ".join(f"{k}: {v}" for k, v in (paper.get("values") or {}).items())
        where = data.get("name", "synthetic") + (f" `{data['root']}`" if data.get("root") else "")
        sweep = " (sweep)" if entry.sweep else ""
        cells = [
            f"`{entry.path.name}`{sweep}",
            paper.get("source", ""),
            entry.reproduces,
            f"`{paper['metric']}`" if paper.get("metric") else "",
            values,
            where,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
