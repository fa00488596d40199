"""Terminal output shared by commands: result tables, the progress bars and error lines (rich).

Human output goes to stderr; stdout carries a command's result alone (a run id, a path, a
score), or with `--json` one JSON object the command line prints (docs/cli.md). On a terminal,
loops draw a live bar; elsewhere (a pipe, a log file, nohup, CI) they print a plain line every
`progress_every` seconds ($DMSTAB_PROGRESS_EVERY, `--progress-every`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)

PROGRESS_EVERY_ENV = "DMSTAB_PROGRESS_EVERY"
DEFAULT_PROGRESS_EVERY_S = 20.0


@dataclass
class OutputSettings:
    """How this process prints: set once by the command line (`configure`)."""

    json: bool = False  # stdout is the command line's one JSON object: results go to stderr
    progress_every: float = DEFAULT_PROGRESS_EVERY_S  # seconds between plain progress lines
    started: float = time.monotonic()  # when the command began (its wall time's start)


settings = OutputSettings()


def configure(*, quiet: bool, json: bool, progress_every: float | None) -> None:
    """`--quiet` (errors and results only), `--json`, and the plain progress lines' interval
    (else $DMSTAB_PROGRESS_EVERY, else 20 s)."""
    console.quiet = quiet
    settings.json = json
    if progress_every is None:
        progress_every = float(os.environ.get(PROGRESS_EVERY_ENV) or DEFAULT_PROGRESS_EVERY_S)
    settings.progress_every = progress_every
    settings.started = time.monotonic()


def wall_time() -> float:
    """Seconds since the command began."""
    return time.monotonic() - settings.started


def live() -> bool:
    """Whether bars and spinners are drawn: stderr is a terminal and not `--quiet`."""
    return sys.stderr.isatty() and not console.quiet


def result(text: str, end: str = "\n") -> None:
    """What a command prints on stdout: its results, for scripts and pipes (on stderr with
    `--json`, whose object is then stdout's only content)."""
    if settings.json:
        console.print(text, end=end, markup=False, highlight=False)
        return
    sys.stdout.write(text + end)
    sys.stdout.flush()


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Working:
    """A transient spinner on a terminal for the quiet stretches before the first bar (imports,
    building the model, opening the store); nothing elsewhere, and gone before any bar."""

    def __init__(self) -> None:
        self._status: Any = None

    def show(self, text: str) -> None:
        if not live():
            return
        if self._status is None:
            self._status = console.status(escape(text), spinner="dots")
            self._status.start()
        else:
            self._status.update(escape(text))

    def done(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


_working = _Working()
working = _working.show
done_working = _working.done


class _Every:
    """True at the first call, then once `settings.progress_every` seconds have passed."""

    def __init__(self) -> None:
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < settings.progress_every:
            return False
        self._last = now
        return True


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


PIPED_TABLE_WIDTH = 160  # columns of a table written to a pipe or a file


def result_table(table: TextTable | Table) -> None:
    """A table of results on stdout (on stderr with `--json`)."""
    rendered = rich_table(table) if isinstance(table, TextTable) else table
    stdout = Console(soft_wrap=True)
    if not stdout.is_terminal:  # a pipe or a file: no terminal width to fit, keep every column
        stdout = Console(soft_wrap=True, width=max(stdout.width, PIPED_TABLE_WIDTH))
    (console if settings.json else stdout).print(rendered)


def error(message: str) -> None:
    """One line on stderr, no traceback."""
    done_working()
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}"
    )


def announce_child(index: int, total: int, label: str, action: str) -> None:
    """The line a sweep prints before each child: `child 2/6 clts (resumed)`."""
    console.print(f"[bold]child {index}/{total}[/] {escape(label)} ({action})")


class TrainProgress:
    """step, loss, img/s and ETA: a live bar on a terminal, else a plain line every
    `settings.progress_every` seconds (and at the first logged step)."""

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
            disable=not live(),
        )
        self._task = self._progress.add_task("train", total=1, loss=float("nan"), ips=0.0)
        self._every = _Every()
        self._total, self._first, self._started = 1, 0, time.monotonic()

    def start(self, total: int, completed: int) -> None:
        done_working()
        self._total, self._first, self._started = total, completed, time.monotonic()
        self._progress.update(self._task, total=total, completed=completed)
        self._progress.start()

    def advance(self, step: int, loss: float, images_per_s: float) -> None:
        self._progress.update(self._task, completed=step, loss=loss, ips=images_per_s)
        if self._progress.disable and self._every.due():
            elapsed = time.monotonic() - self._started
            rate = (step - self._first) / max(elapsed, 1e-9)
            eta = duration((self._total - step) / rate) if rate > 0 else "?"
            console.print(
                f"train {step}/{self._total} ({100 * step / self._total:.0f}%)  loss {loss:.4f}"
                f"  {images_per_s:.0f} img/s  elapsed {duration(elapsed)}  eta {eta}",
                highlight=False,
            )

    def stop(self) -> None:
        self._progress.stop()


def _advance(progress: Progress, task: TaskID, done: int, total: int) -> None:
    """Show a live bar at `done` of `total`: started at its first update, stopped at the end."""
    if not progress.live.is_started:
        done_working()
        progress.start()
    progress.update(task, completed=done, total=total)
    if done >= total:
        progress.stop()


class SampleProgress:
    """Denoising steps of the current batch: a transient bar on a terminal, else a plain line
    every `settings.progress_every` seconds."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not live(),
        )
        self._task = self._progress.add_task(label, total=1)
        self._every = _Every()
        self._batches = 0

    def __call__(self, done: int, total: int) -> None:
        if self._progress.disable:
            self._plain(done, total)
            return
        _advance(self._progress, self._task, done, total)

    def _plain(self, done: int, total: int) -> None:
        if done >= total:
            self._batches += 1
        elif done and self._every.due():
            console.print(
                f"{self._label}: batch {self._batches + 1}, step {done}/{total}", highlight=False
            )


class CountedProgress:
    """A counted loop's `callback(done, total)` (feature batches, grid points, Hessian-vector
    products, snapshots, sweep children): a bar with `label`, done/total, elapsed and ETA on a
    terminal, else a plain line `LABEL done/total (pct)  elapsed  eta` every
    `settings.progress_every` seconds and at the end. `bar=False` prints the lines on a terminal
    too: for a loop whose items draw bars of their own (a sweep's children train), as rich
    draws one live display at a time. A call with done = 0 (re)starts the clock, so one object
    can follow several loops in turn."""

    def __init__(self, label: str, *, bar: bool = True) -> None:
        self._label = label
        self._progress = Progress(
            TextColumn(f"[bold]{escape(label)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not (bar and live()),
        )
        self._task = self._progress.add_task(label, total=1)
        self._every = _Every()
        self._first: int | None = None  # `done` when the clock started; None before any call
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self._first is None or done == 0:
            self._first, self._started = done, time.monotonic()
            self._progress.reset(self._task, total=total, completed=done)
        if self._progress.disable:
            self._plain(done, total)
            return
        _advance(self._progress, self._task, done, total)

    def _plain(self, done: int, total: int) -> None:
        if not done or (done < total and not self._every.due()):
            return
        elapsed = time.monotonic() - self._started
        rate = (done - (self._first or 0)) / max(elapsed, 1e-9)
        eta = duration((total - done) / rate) if rate > 0 else "?"
        console.print(
            f"{self._label} {done}/{total} ({100 * done / max(total, 1):.0f}%)"
            f"  elapsed {duration(elapsed)}  eta {eta}",
            highlight=False,
            markup=False,
        )
