"""Recipe files: YAML with `base:` inheritance, `a.b=value` overrides, then validation."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dmstab.config.parse import build_recipe
from dmstab.config.schema import Recipe
from dmstab.config.validation import check_written_length, validate
from dmstab.errors import DmstabError
from dmstab.reading import read_text

_MAX_BASE_DEPTH = 16


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` as a string, recipes mean a number."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    text = read_text(path, "recipe file")
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        # PyYAML marks where it gave up, often the line after the mistake; its context mark
        # says where the construct it was parsing began (an unclosed bracket, say).
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            problem += f" ({context} that starts on line {start.line + 1})"
        raise DmstabError(f"recipe {path}{where} is not valid YAML: {problem}") from None
    if data is None:
        raise DmstabError(f"recipe {path} is empty; it needs at least one section or `base:`")
    if not isinstance(data, dict):
        raise DmstabError(f"recipe {path} must be a YAML mapping of sections")
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_tree(path: Path, depth: int = 0) -> dict[str, Any]:
    """Raw recipe mapping with `base:` files merged underneath (paths relative to the file)."""
    if depth > _MAX_BASE_DEPTH:
        raise DmstabError(f"recipe {path}: `base:` chain deeper than {_MAX_BASE_DEPTH} (a cycle?)")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise DmstabError(f"recipe {path}: `base:` must be a file path, got {base!r}")
    return _merge(load_tree((path.parent / base).resolve(), depth + 1), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], YAML-typed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise DmstabError(f"override {text!r} must look like section.key=value")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise DmstabError(f"override {text!r}: value {raw!r} is not valid YAML") from None
    return key.split("."), value


def set_key(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    """`tree` with the key at `path` (["a", "b"] for a.b) set to `value`, as an override sets it."""
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return _merge(dict(tree), nested)


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    result = dict(tree)
    for text in overrides:
        result = set_key(result, *parse_override(text))
    return result


def from_mapping(tree: Mapping[str, Any]) -> Recipe:
    """The validated recipe of a resolved tree (a stored one, or `from_written`'s)."""
    return validate(build_recipe(tree))


def from_written(tree: Mapping[str, Any]) -> Recipe:
    """`from_mapping` for a tree the user wrote (files and overrides), with the rules that
    only a written tree can check (`check_written_length`)."""
    recipe = from_mapping(tree)
    check_written_length(tree, recipe)
    return recipe


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file, merge its `base:` chain, apply overrides, validate."""
    path = Path(path)
    tree = load_tree(path)
    if "sweep" in tree:
        raise DmstabError(
            f"recipe {path} is a sweep (it has a `sweep:` section): run it with "
            f"`dmstab train {path}`; this command takes a plain recipe or a run id"
        )
    tree.setdefault("name", path.stem)
    return from_written(apply_overrides(tree, overrides))
