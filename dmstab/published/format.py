"""What reading a published checkpoint gives, and the registry of the formats dmstab reads.

A format turns a file released with a paper (improved-/guided-diffusion `.pt`, U-ViT `.pth`,
EDM2 `.pkl`) into an `ImportedModel`: a dmstab recipe tree whose network has the file's
architecture, and the file's weights under that network's parameter names. `dmstab import`
applies the user's overrides to the tree, builds the network, loads the weights (every one
matched) and writes a dmstab checkpoint that every command reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from dmstab.errors import DmstabError


@dataclass(frozen=True)
class KnownFile:
    """A released checkpoint dmstab knows by file name: where to download it, the settings
    the file cannot tell (as `a.b=v` overrides), and the paper it comes from."""

    name: str
    url: str
    overrides: tuple[str, ...]
    paper: str
    description: str


@dataclass(frozen=True)
class ImportedModel:
    """A published checkpoint read into dmstab's terms.

    `recipe`: a recipe tree (as a recipe YAML holds it) with the network, data and diffusion
    settings; `weights`: the state dict of the network that tree builds, under its names, in
    float32; `num_classes`: 0 for an unconditional network; `inferred`: the architecture
    settings read from the file (flat `a.b` keys), which the import run logs; `sigma_rel`: the
    post-hoc EMA length σrel the weights are (EDM2 Sec. 3), where the file tells it, which the
    checkpoint carries as `ema-reconstruct`'s outputs do (so `fid-sweep` scores it).
    """

    recipe: dict[str, Any]
    weights: dict[str, Tensor]
    num_classes: int
    inferred: dict[str, Any] = field(default_factory=dict)
    known: KnownFile | None = None
    sigma_rel: float | None = None


@dataclass(frozen=True)
class PublishedFormat:
    """One format: its name (`dmstab import --format NAME`), the file suffixes it reads, the
    reader, and the released files it knows.

    `read(path, given)` reads the file; `given` holds the settings the user (or the file's
    `KnownFile`) wrote, flat `a.b` keys to YAML-typed values (e.g. {"data.resolution": 128,
    "model.num_heads": 4}), for what the file cannot tell; the reader fails with one line
    naming the key when it needs one that is not given."""

    name: str
    suffixes: tuple[str, ...]
    read: Callable[[Path, Mapping[str, Any]], ImportedModel]
    known_files: tuple[KnownFile, ...] = ()
    summary: str = ""


FORMATS: dict[str, PublishedFormat] = {}


def register_format(published: PublishedFormat) -> None:
    if published.name in FORMATS:
        raise ValueError(f"published format {published.name!r} is registered twice")
    FORMATS[published.name] = published


def published_format(name: str) -> PublishedFormat:
    if name not in FORMATS:
        raise DmstabError(f"unknown --format {name!r}; one of: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def known_file(path: Path) -> KnownFile | None:
    """The released file of any format named as `path` is, if dmstab knows it."""
    for published in FORMATS.values():
        for known in published.known_files:
            if known.name == path.name:
                return known
    return None
