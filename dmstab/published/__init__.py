"""Checkpoints released with papers, read into dmstab networks (`dmstab import`)."""

from dmstab.published import uvit  # noqa: F401  (registers the `uvit` format)
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
    "known_file",
    "published_format",
    "register_format",
]
