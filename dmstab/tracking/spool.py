"""A durable local spool of tracking records, kept while the MLflow server cannot be reached.

One directory per run holds `meta.json` (the tracking URI and the run's ids), `records.jsonl`
(one JSON record a line, appended in order and fsync'd), `files/` (copies of the artifacts and
stepped images logged while spooling) and `sent` (how many records the server already has). A
line torn by a kill -9 in mid-append is ignored on reading and cut off before the next append.
Pure file IO: replaying the records to a server is `dmstab.tracking`'s job.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from dmstab.atomic import fsync_directory, write_atomically

SPOOL_DIRNAME = ".mlflow-spool"
_RECORDS = "records.jsonl"
_FILES = "files"
_SENT = "sent"
_META = "meta.json"
_LEFTOVER = ".removed"  # a spool being deleted: `.RUN_ID.removed`

Record = dict[str, Any]


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda handle: handle.write(text.encode()))


def _copy_into(source: Path, handle: BinaryIO) -> None:
    with open(source, "rb") as original:
        shutil.copyfileobj(original, handle)


class Spool:
    """The spool directory of one run; nothing exists on disk until the first record."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._checked_tail = False

    @property
    def exists(self) -> bool:
        return (self.directory / _RECORDS).is_file()

    def meta(self) -> dict[str, str]:
        """`uri`, `run_id` (the directory's name) and, once the server has it, `server_run_id`."""
        data = json.loads((self.directory / _META).read_text())
        return {str(k): str(v) for k, v in data.items()}

    def create(self, meta: Mapping[str, str]) -> None:
        """Make the directory and its `meta.json` (kept when they already exist)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.directory / _META).is_file():
            _write_text(self.directory / _META, json.dumps(dict(meta)))
            (self.directory / _RECORDS).touch()
            fsync_directory(self.directory)

    def update_meta(self, **values: str) -> None:
        _write_text(self.directory / _META, json.dumps({**self.meta(), **values}))

    def append(self, record: Record) -> None:
        """Add one record at the end, on disk (fsync'd) before this returns."""
        path = self.directory / _RECORDS
        if not self._checked_tail:
            self._cut_torn_tail(path)
            self._checked_tail = True
        with open(path, "a") as handle:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add_file(self, source: Path, artifact_path: str | None) -> None:
        """Copy `source` into the spool (fsync'd), then record it as an artifact."""
        file = self._copy(source)
        self.append({"type": "artifact", "file": file, "artifact_path": artifact_path})

    def add_image(self, source: Path, key: str, step: int, timestamp: int) -> None:
        """Copy the image `source` into the spool, then record it as MLflow's image `key` at
        `step` (replayed with `log_image`, so it keeps its step)."""
        file = self._copy(source)
        self.append(
            {"type": "image", "file": file, "key": key, "step": step, "timestamp": timestamp}
        )

    def _copy(self, source: Path) -> str:
        """A copy of `source` in the spool (fsync'd), for the next record: its relative path."""
        target = self.directory / _FILES / f"{self._count():06d}" / source.name
        write_atomically(target, lambda handle: _copy_into(source, handle))
        return str(target.relative_to(self.directory))

    def add_text(self, text: str, artifact_file: str) -> None:
        """A text artifact (`log_text`), spooled as a file under its directory."""
        directory, _, name = artifact_file.rpartition("/")
        target = self.directory / _FILES / f"{self._count():06d}" / name
        _write_text(target, text)
        self.append(
            {
                "type": "artifact",
                "file": str(target.relative_to(self.directory)),
                "artifact_path": directory or None,
            }
        )

    def file(self, record: Record) -> Path:
        """The spooled copy an `artifact` or `image` record refers to."""
        return self.directory / str(record["file"])

    def records(self) -> list[Record]:
        """Every complete record, in order; a torn last line is not one."""
        path = self.directory / _RECORDS
        if not path.is_file():
            return []
        lines = path.read_bytes().split(b"\n")
        out: list[Record] = []
        for line in lines[:-1]:  # the part after the last newline is empty or torn
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # only the last line can be torn; nothing after it was acknowledged
        return out

    def pending(self) -> list[tuple[int, Record]]:
        """(index, record) of the records the server does not have yet."""
        sent = self.sent()
        return [(i, r) for i, r in enumerate(self.records()) if i >= sent]

    def sent(self) -> int:
        path = self.directory / _SENT
        return int(path.read_text()) if path.is_file() else 0

    def mark_sent(self, count: int) -> None:
        """The first `count` records are on the server (a re-send after a crash is harmless)."""
        _write_text(self.directory / _SENT, str(count))

    def remove(self) -> None:
        """Delete the spool once everything in it is on the server: renamed out of the way in
        one step first, so a kill -9 in mid-delete leaves a leftover, never a torn spool."""
        parent = self.directory.parent
        leftover = parent / f".{self.directory.name}{_LEFTOVER}"
        os.replace(self.directory, leftover)
        fsync_directory(parent)
        shutil.rmtree(leftover)
        if parent.name == SPOOL_DIRNAME and not any(parent.iterdir()):
            parent.rmdir()

    def _count(self) -> int:
        return len(self.records())

    @staticmethod
    def _cut_torn_tail(path: Path) -> None:
        """Drop a partial last line (a kill -9 during an append) so the next record starts clean."""
        if not path.is_file():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
                os.fsync(handle.fileno())


def find_spools(path: Path) -> list[Spool]:
    """The spool at `path`, or every run spool directly under it (a `.mlflow-spool` folder)."""
    if (path / _META).is_file():
        return [Spool(path)]
    if not path.is_dir():
        return []
    return [Spool(p) for p in sorted(path.iterdir()) if (p / _META).is_file() and p.name[0] != "."]


def remove_leftovers(folder: Path) -> None:
    """Finish deleting the spools in `folder` whose deletion a kill -9 cut short."""
    if folder.is_dir():
        for leftover in folder.glob(f".*{_LEFTOVER}"):
            shutil.rmtree(leftover)
