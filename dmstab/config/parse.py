"""Plain YAML data -> typed sections: every key checked against its annotation.

Loading never guesses: an unknown key or a value of the wrong type is a `DmstabError` whose
one line names the key and what is allowed (with the closest key when one is near).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from dmstab.config.registry import Registry
from dmstab.config.schema import ANALYSES, MODELS, ModelConfig, Recipe
from dmstab.errors import DmstabError

T = TypeVar("T")

_INT_LIST = re.compile(r"^\s*-?\d+\s*(,\s*-?\d+\s*)+$")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in canonical form."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise DmstabError(f"recipe key '{key}' must be a mapping of {_field_list(tp)}")
        return build(tp, value, key + ".")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise DmstabError(f"recipe key '{key}' is {value!r}; allowed: {_type_name(tp)}")
    if origin in (types.UnionType, typing.Union):
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except DmstabError:
                continue
        raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")
    if origin is tuple:
        # A list of ints may also be improved-diffusion's comma string ("10,15,20"): YAML
        # reads the override `sample.sections=10,15,20` as that string.
        if get_args(tp) == (int, Ellipsis) and isinstance(value, str) and _INT_LIST.match(value):
            value = [int(part) for part in value.split(",")]
        if not isinstance(value, list | tuple):
            raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")
        return tuple(
            _convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise DmstabError(f"recipe key '{key}' must be a mapping")
        value_type = get_args(tp)[1]
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise DmstabError(f"recipe key '{key}' must be null")
    if tp is bool and isinstance(value, bool):
        return value
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int and is_number and float(value).is_integer():
        return int(value)
    if tp is float and is_number:
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")


def _field_list(cls: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _unknown_key(cls: Any, key: str, prefix: str, where: str = "") -> DmstabError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    where = where or (f"section '{prefix[:-1]}'" if prefix else "a recipe")
    return DmstabError(
        f"unknown recipe key '{prefix}{key}'; {hint}{where} allows: {', '.join(names)}"
    )


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "", where: str = "") -> T:
    """`cls` from `data`, every key checked (`where` names the section in errors)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), prefix, where)
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def build_variant(registry: Registry, data: Any, section: str, selector: str, default: str) -> Any:
    """Section `section` as the dataclass its `selector` key names in `registry` (`default`
    when unset): the section's shared keys plus the registered component's own."""
    if not isinstance(data, Mapping):
        raise DmstabError(f"recipe key '{section}' must be a mapping")
    name = data.get(selector, default)
    if not isinstance(name, str):
        raise DmstabError(f"recipe key '{section}.{selector}' is {name!r}; expected a name")
    config = registry.get(name).config or registry.base
    assert config is not None, f"{registry.key} {name} has no config and the registry no base"
    built: Any = build(config, data, f"{section}.", where=f"{section}.{selector} {name}")
    return dataclasses.replace(built, **{selector: name})


def build_recipe(tree: Mapping[str, Any]) -> Recipe:
    """The typed recipe of a merged YAML tree: fixed sections by their annotation, `model` by
    the dataclass `model.name` registered, and each registered analysis's section by its own."""
    fixed = {f.name for f in dataclasses.fields(Recipe)} - {"analyses"}
    sections: dict[str, Any] = {}
    analyses: dict[str, Any] = {}
    for key, value in tree.items():
        key = str(key)
        if key in ANALYSES:
            config = ANALYSES.get(key).config
            assert config is not None, f"analysis {key} registered without a config"
            analyses[key] = _convert(value, config, key)
        elif key not in fixed:
            raise _unknown_key_in_recipe(key, sorted(fixed) + ANALYSES.names())
        elif key != "model":
            sections[key] = value
    model = build_variant(MODELS, tree.get("model", {}), "model", "name", ModelConfig.name)
    return dataclasses.replace(build(Recipe, sections), model=model, analyses=analyses)


def _unknown_key_in_recipe(key: str, allowed: list[str]) -> DmstabError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return DmstabError(f"unknown recipe key '{key}'; {hint}a recipe allows: {', '.join(allowed)}")
