"""Terminal output shared by commands: result tables, the progress bars and error lines (rich)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)


def result(text: str, end: str = "\n") -> None:
    """What a command prints on stdout: its results, for scripts and pipes."""
    sys.stdout.write(text + end)
    sys.stdout.flush()


@dataclass(frozen=True)
class TextTable:
    """A rendered table, printed with rich and written as Markdown."""

    title: str
    header: tuple[str, ...]
    body: Sequence[tuple[str, ...]]
    caption: str = ""


def rich_table(table: TextTable) -> Table:
    """The table for the terminal: first column left-aligned, the others right-aligned."""
    rendered = Table(title=table.title, caption=table.caption or None)
    for index, column in enumerate(table.header):
        rendered.add_column(column, justify="left" if index == 0 else "right")
    for cells in table.body:
        rendered.add_row(*cells)
    return rendered


def error(message: str) -> None:
    """One line on stderr, no traceback."""
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]error:[/] {escape(message)}")


def announce_child(index: int, total: int, label: str, action: str) -> None:
    """The line a sweep prints before each child: `child 2/6 clts (resumed)`."""
    console.print(f"[bold]child {index}/{total}[/] {escape(label)} ({action})")


class TrainProgress:
    """step, loss, img/s and ETA; quiet (no live bar) when stderr is not a terminal."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not sys.stderr.isatty(),
        )
        self._task = self._progress.add_task("train", total=1, loss=float("nan"), ips=0.0)

    def start(self, total: int, completed: int) -> None:
        self._progress.update(self._task, total=total, completed=completed)
        self._progress.start()

    def advance(self, step: int, loss: float, images_per_s: float) -> None:
        self._progress.update(self._task, completed=step, loss=loss, ips=images_per_s)

    def stop(self) -> None:
        self._progress.stop()


class SampleProgress:
    """Denoising steps of the current batch."""

    def __init__(self, label: str) -> None:
        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not sys.stderr.isatty(),
        )
        self._task = self._progress.add_task(label, total=1)

    def __call__(self, done: int, total: int) -> None:
        if not self._progress.live.is_started:
            self._progress.start()
        self._progress.update(self._task, completed=done, total=total)
        if done >= total:
            self._progress.stop()
