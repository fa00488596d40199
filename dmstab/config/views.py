"""Views of a resolved recipe: plain data, YAML, MLflow params, and its training fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import yaml

from dmstab.config.applicable import applicable
from dmstab.config.schema import ANALYSES, AnalysisSection, Recipe


def _plain(value: Any) -> Any:
    """Dataclasses become mappings and tuples lists, all the way down."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain YAML/JSON-ready mapping (tuples become lists)."""
    tree: dict[str, Any] = _plain(recipe)
    analyses = tree.pop("analyses")
    return {**tree, **analyses}  # each analysis's section at the top level


def to_written(recipe: Recipe) -> dict[str, Any]:
    """`to_dict` as a user would write it: of `train.steps` and `train.kimg` only the one that
    sets the run's length (kimg when positive), so the tree reloads under the rule that a
    written recipe sets one of them (`check_written_length`) and overrides of either apply."""
    tree = to_dict(recipe)
    tree["train"].pop("steps" if recipe.train.kimg > 0 else "kimg")
    return tree


class _RecipeDumper(yaml.SafeDumper):
    """Short lists of numbers on one line (`betas: [0.8, 0.999]`), as recipes are written."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, list | dict) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as a recipe file (`to_written`): `--dry-run` prints it, runs log it."""
    return yaml.dump(to_written(recipe), Dumper=_RecipeDumper, sort_keys=False)


def flatten(recipe: Recipe) -> dict[str, str]:
    """`section.key` -> string value, the form MLflow params take."""
    return _flat(to_dict(recipe))


def run_params(recipe: Recipe, kind: str) -> dict[str, str]:
    """The MLflow params of a run of `kind`: the keys that shaped it and that it uses
    (`dmstab.config.applicable`). Analysis sections are left out, except the run's own
    analysis (`kind` a registered analysis), whose section is logged with its defaults."""
    tree = to_dict(dataclasses.replace(recipe, analyses={}))
    if kind in ANALYSES:
        config = ANALYSES.get(kind).config
        assert config is not None and issubclass(config, AnalysisSection)
        tree[kind] = _plain(recipe.analysis(config))
    return {key: _param(value) for key, value in applicable(recipe, _leaves(tree)).items()}


def _leaves(tree: dict[str, Any]) -> dict[str, Any]:
    """`section.key` -> value for every leaf of `tree`; a nested mapping is walked into, and an
    empty one (a paper without values) is no leaf."""
    leaves: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            leaves[prefix] = value

    walk("", tree)
    return leaves


def _param(value: Any) -> str:
    """A value as an MLflow param (a string): lists as JSON, the rest as Python prints them."""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _flat(tree: dict[str, Any]) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = _param(value)

    walk("", tree)
    return flat


# How a run executes, not what it computes: a run may resume with other values of these.
EXECUTION_KEYS = (
    "train.device",
    "train.compile",
    "train.fused",
    "train.micro_batch_size",
    "train.keep_checkpoints",
    "tracking.offline",
)


def result_dict(recipe: Recipe) -> dict[str, Any]:
    """`to_dict(recipe)` without what does not change the trained weights: the name, the
    paper block, the run name, the execution keys and the analysis sections. Equal for runs
    that train the same model, whatever the recipe file is called (so the analysis recipes
    reuse the run of the recipe they build on)."""
    data = to_dict(dataclasses.replace(recipe, analyses={}))
    for section in ("name", "paper"):
        data.pop(section)
    data["tracking"].pop("run_name")
    for key in EXECUTION_KEYS:
        section, name = key.split(".")
        data[section].pop(name)
    return data


def fingerprint(recipe: Recipe) -> str:
    """Stable hash of everything that determines a training run's result."""
    text = json.dumps(result_dict(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(a: Recipe, b: Recipe) -> list[str]:
    """Keys whose values differ, as `key: a -> b`."""
    fa, fb = flatten(a), flatten(b)
    return [
        f"{k}: {fa.get(k)} -> {fb.get(k)}"
        for k in sorted(fa.keys() | fb.keys())
        if fa.get(k) != fb.get(k)
    ]
