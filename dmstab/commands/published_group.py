"""Released checkpoints as members of a consistency group (`consistency.published`).

AAAI Fig. 1b/1c and Table 1's ImageNet rows compare models that were published, not trained
here. A recipe names each file with the settings `dmstab import` needs; the group imports each
once (a later run reuses the import of the same file with the same settings, found by the
`dmstab.import.key` tag) and samples it with the recipe's `sample` and `consistency` settings.
A missing file is one line naming it and where to download it, before anything is computed.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from dmstab.analysis.consistency import ConsistencyConfig
from dmstab.checkpoint import CHECKPOINT_NAME, load_checkpoint
from dmstab.commands.import_model import KIND, import_checkpoint, sha256_of
from dmstab.commands.subjects import Subject
from dmstab.config import Recipe, from_written, to_written
from dmstab.errors import DmstabError
from dmstab.published import known_file
from dmstab.tracking import TAG_KIND, find_runs, run_directory
from dmstab.train.restore import stored_recipe

TAG_IMPORT_KEY = "dmstab.import.key"  # the source file's SHA-256 and the import settings


def import_entries(
    entries: Sequence[str], recipe: Recipe, key: str
) -> list[tuple[Path, list[str]]]:
    """(file, import settings) of each of the recipe's released files (`key` lists them: the
    file's path and the settings `dmstab import` needs, split as a shell would); the recipe's
    tracking store and experiment go with each import."""
    tracking = [
        f"tracking.experiment={recipe.tracking.experiment}",
        *([f"tracking.uri={recipe.tracking.uri}"] if recipe.tracking.uri else []),
    ]
    return [
        (path, [*settings, *tracking])
        for path, settings in (split_entry(entry, key) for entry in entries)
    ]


def split_entry(entry: str, key: str) -> tuple[Path, list[str]]:
    """A released-file entry (`"models/tiny.pt data.resolution=16"`) as its path and settings."""
    try:
        path, *settings = shlex.split(entry)
    except ValueError as error:
        raise DmstabError(f"{key} entry {entry!r}: {error}") from None
    return Path(path).expanduser(), settings


def published_entries(recipe: Recipe) -> list[tuple[Path, list[str]]]:
    """(file, import settings) for each `consistency.published` entry."""
    published = recipe.analysis(ConsistencyConfig).published
    return import_entries(published, recipe, "consistency.published")


def require_downloaded(imports: Sequence[tuple[Path, list[str]]]) -> None:
    """Each released file is there; else one line naming the first missing one and, for a
    file dmstab knows, where to download it."""
    for path, _ in imports:
        if path.is_file():
            continue
        known = known_file(path)
        where = (
            f"download it from {known.url} ({known.paper}) to {path}"
            if known
            else "give the path of the downloaded file"
        )
        raise DmstabError(
            f"published model {path} not found: {where}; "
            "docs/reproducing.md lists every released model dmstab reads"
        )


def import_key(sha256: str, settings: Sequence[str]) -> str:
    """What makes two imports the same: the file's bytes and the settings given."""
    text = json.dumps([sha256, list(settings)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def imported_checkpoint(path: Path, settings: list[str], uri: str | None) -> Path:
    """The checkpoint of an earlier finished import of `path` with `settings`, or a new one."""
    digest = sha256_of(path)
    key = import_key(digest, settings)
    for run in find_runs({TAG_KIND: KIND, TAG_IMPORT_KEY: key}, uri=uri):
        checkpoint = run_directory(run.run_id, uri) / CHECKPOINT_NAME
        if run.status == "FINISHED" and checkpoint.is_file():
            return checkpoint
    imported = import_checkpoint(path, settings, extra_tags={TAG_IMPORT_KEY: key}, sha256=digest)
    return imported.checkpoint


def _member(checkpoint: Path, group: Recipe, label: str) -> Subject:
    """The imported model under the group recipe's `sample` and `consistency` sections (and
    store), so every member samples alike; validated as any recipe."""
    state = load_checkpoint(checkpoint)
    tree = to_written(stored_recipe(state, checkpoint))
    written = to_written(group)
    for section in ("sample", "consistency", "tracking"):
        tree[section] = written[section]
    return Subject(checkpoint, state, from_written(tree), label)


def published_subjects(recipe: Recipe) -> list[Subject]:
    """Each `consistency.published` model, imported (or reused), as a group member."""
    entries = published_entries(recipe)
    require_downloaded(entries)
    subjects = []
    for path, import_settings in entries:
        checkpoint = imported_checkpoint(path, import_settings, recipe.tracking.uri)
        subjects.append(_member(checkpoint, recipe, path.stem))
    return subjects
