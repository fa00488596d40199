"""Files that are always either the old or the new complete version, even after a kill -9.

A write goes to a temporary file beside its target (`.NAME.XXXX.tmp`), is fsync'd, then renamed
over the target. A process killed mid-write leaves only the temporary file, which
`remove_interrupted_writes` clears on the next start.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dmstab.errors import DmstabError


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Run `write` on a temporary file beside `path`, fsync it, then rename it over `path`,
    so `path` is always either the old or the new complete file.

    A failed write (disk full, file too large, no permission) removes the temporary file and
    is a one-line `DmstabError` naming `path`; the file already there is left as it was.
    """
    try:
        _write_then_rename(path, write)
    except Exception as exc:
        failure = _os_error(exc)
        if failure is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise DmstabError(f"cannot write {path}: {failure.strerror or failure}; {kept}") from None


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: itself, or the one torch's C++ writer wrapped in a
    RuntimeError (kept as its context)."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _write_then_rename(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def require_writable_directory(path: Path, what: str) -> None:
    """Refuse, in one line naming `what`, a directory this process cannot create files in.

    `path` need not exist yet: it is judged at its nearest existing ancestor, where `mkdir`
    would create it. Asked before a command creates its run or computes anything, so a
    read-only working directory or output folder is an error at once, not after the work.
    `os.access` answers for the mode bits, but root passes every mode check while a read-only
    mount or a regular file in the path still stops it, so a temporary file is also created
    and removed there: what a write will really meet.
    """
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = "it" if existing == path.absolute() else str(existing)
    if not existing.is_dir():
        raise DmstabError(f"cannot write {what} {path}: {where} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DmstabError(f"cannot write {what} {path}: {where} is a read-only directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dmstab-probe.", dir=existing)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DmstabError(f"cannot write {what} {path}: {reason} ({existing})") from None
    os.close(fd)
    os.unlink(probe)


def remove_interrupted_writes(directory: Path) -> list[Path]:
    """Delete the temporary files `write_atomically` leaves in `directory` when its process is
    killed mid-write (never a complete file: a finished write is renamed); the removed paths."""
    stale = sorted(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (POSIX: fsync the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
