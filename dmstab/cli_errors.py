"""How the command line reports mistakes: a usage mistake or a bad input is one `error:` line
and exit code 2, a diverged training one line and exit 1 (docs/architecture.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, ParamSpec, TypeVar, cast

import typer
from typer.core import TyperGroup

from dmstab.errors import ChildrenFailed, DmstabError

P = ParamSpec("P")
R = TypeVar("R")


# click's UsageError, the base of every usage mistake (from typer 0.2x on, typer's vendored copy
# of click raises its own; typer.BadParameter derives from whichever one typer uses).
USAGE_ERROR = cast(type[Exception], typer.BadParameter.__mro__[1])


class OneLineUsageErrors(TyperGroup):
    """A usage mistake (unknown command or option, missing argument, bad option value) -> one
    line `error: ...; see 'dmstab COMMAND --help'` and exit 2, like every other bad input,
    instead of click's usage box. `dmstab` alone still prints the help."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors(None):
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors(ctx):
            return super().invoke(ctx)


@contextmanager
def _one_line_usage_errors(group: Any) -> Iterator[None]:
    """A usage error raised inside -> the one `error:` line, then typer.Exit(2). `group` is the
    context of `dmstab` once it is parsed: it names the command being parsed when click's parser
    raises an error without a context (an option missing its value)."""
    try:
        yield
    except USAGE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2, bare `dmstab`: the help
            raise
        from dmstab.console import error

        names = " ".join(["dmstab", *_command_names(exc, group)])
        error(f"{_message(exc)}; see '{names} --help'")
        raise typer.Exit(2) from None


def _command_names(exc: Exception, group: Any) -> list[str]:
    """The names of the command that `exc` is about, after `dmstab` (none for `dmstab`)."""
    context = getattr(exc, "ctx", None)
    if context is None:
        command = getattr(group, "invoked_subcommand", None)
        return [] if command is None else [command]
    names: list[str] = []
    while context.parent is not None:
        names.insert(0, context.info_name)
        context = context.parent
    return names


def _message(exc: Exception) -> str:
    """click's message on one line, without its final full stop."""
    return " ".join(exc.format_message().split()).removesuffix(".")  # type: ignore[attr-defined]


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Bad input -> one line on stderr, exit 2; divergence or failed sweep children -> one line,
    exit 1; under torchrun, the process group is left however the command ends."""

    @wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from dmstab.commands.plugins import load_plugins
        from dmstab.console import error
        from dmstab.train.loss_guard import TrainingDiverged

        try:
            load_plugins()
            return command(*args, **kwargs)
        except DmstabError as exc:
            error(str(exc))
            raise typer.Exit(2) from None
        except (TrainingDiverged, ChildrenFailed) as exc:
            error(str(exc))
            raise typer.Exit(1) from None
        finally:  # leave a torchrun process group; none exists unless its module was imported
            if "dmstab.distributed" in sys.modules:
                sys.modules["dmstab.distributed"].shutdown_distributed()

    return wrapper
