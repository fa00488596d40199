"""How an analysis loop reports progress: a plain `progress(done, total)` callable, called with
done = 0 before the first item and after each one. The command line passes
`dmstab.console.CountedProgress` (a bar, or plain lines off a terminal); the analyses never
print, and what they compute does not depend on whether anyone listens."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]


def report(progress: Progress | None, done: int, total: int) -> None:
    """`progress(done, total)`, when someone listens."""
    if progress is not None:
        progress(done, total)
