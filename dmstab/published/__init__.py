"""Checkpoints released with papers, read into dmstab networks (`dmstab import`).

Each format's module registers it when imported (below).
"""

from dmstab.published import adm, edm2, uvit
from dmstab.published.format import (
    FORMATS,
    ImportedModel,
    KnownFile,
    PublishedFormat,
    known_file,
    published_format,
    register_format,
)

__all__ = [
    "FORMATS",
    "ImportedModel",
    "KnownFile",
    "PublishedFormat",
    "adm",
    "edm2",
    "known_file",
    "published_format",
    "register_format",
    "uvit",
]
