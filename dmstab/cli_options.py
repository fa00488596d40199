"""What the `dmstab` commands share on the command line: argument types, the examples epilog,
the output options (`--json`, `--quiet`, `--progress-every`) with their plumbing, and the help's
usage line and option types as click writes them."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer
from typer.core import TyperCommand
from typer.models import CommandFunctionType

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides `section.key=value` (YAML-typed).", show_default=False),
]
FEATURES_HELP = (
    "FID feature network: inception; random_conv (a seeded proxy for toy data); or "
    "classifier (a small CNN trained on the synthetic shapes; synthetic data only, no IS)."
)
Features = Annotated[str, typer.Option(help=FEATURES_HELP)]
OptionalFeatures = Annotated[  # where a recipe may give it (its eval.features)
    str | None,
    typer.Option(
        help=f"{FEATURES_HELP} [default: inception, or eval.features]", show_default=False
    ),
]
Analyzed = Annotated[
    list[str] | None,
    typer.Argument(
        help="A recipe (trained, or its finished run reused), or trained models (run ids, run "
        "directories, checkpoints; default: the latest training run), and `section.key=value` "
        "overrides (for trained models: sample.*, tracking.*, train.device, analysis sections).",
        show_default=False,
    ),
]

_OUTPUT_OPTIONS = [
    inspect.Parameter(
        "json_output",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option(
                "--json",
                help="Print one JSON object on stdout (run ids, paths, numbers); everything "
                "else goes to stderr.",
            ),
        ],
    ),
    inspect.Parameter(
        "quiet",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool, typer.Option("--quiet", "-q", help="No progress or messages: results, errors.")
        ],
    ),
    inspect.Parameter(
        "progress_every",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            float | None,
            typer.Option(
                "--progress-every",
                min=0.0,
                help="Seconds between progress lines when stderr is not a terminal (a pipe, a "
                "log file); else $DMSTAB_PROGRESS_EVERY, else 20.",
                show_default=False,
            ),
        ],
    ),
]


def examples(*lines: str) -> str:
    """An epilog: "Examples:" and one command per paragraph."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def reports(
    command: Callable[..., Mapping[str, Any] | None],
) -> Callable[..., None]:
    """`command` with `--json`, `--quiet` and `--progress-every`. The command returns its summary
    (None on torchrun ranks other than 0); with `--json` it is stdout's one JSON object. Put it
    above `user_errors`, so the spinner runs while that imports the commands (and PyTorch)."""

    @functools.wraps(command)
    def wrapper(
        *args: Any, json_output: bool, quiet: bool, progress_every: float | None, **kwargs: Any
    ) -> None:
        from dmstab.console import configure, done_working, working

        configure(quiet=quiet, json=json_output, progress_every=progress_every)
        working("loading PyTorch")
        try:
            summary = command(*args, **kwargs)
        finally:
            done_working()
        if json_output and summary is not None:
            sys.stdout.write(json.dumps(dict(summary), default=str) + "\n")
            sys.stdout.flush()

    signature = inspect.signature(command, eval_str=True)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *_OUTPUT_OPTIONS],
        return_annotation=None,
    )
    wrapper.__annotations__ = {
        **{name: p.annotation for name, p in signature.parameters.items()},
        **{p.name: p.annotation for p in _OUTPUT_OPTIONS},
    }
    return wrapper


class UntypedFlags:
    """A command (or the group) whose help shows no `<bool>` beside a flag: a flag takes no
    value, so there is no type to show (typer 0.2x labels every option with its type)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # typer's help shows an option's metavar in place of its type
        return params


class PlainHelpCommand(UntypedFlags, TyperCommand):
    """A command whose usage line names its arguments as click does, `RECIPE
    [OVERRIDES]...`, rather than typer's `{recipe} [overrides]...`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = (param.metavar or param.name).upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class App(typer.Typer):
    """`typer.Typer` whose commands are `PlainHelpCommand`s unless they ask for another class."""

    def command(
        self, *args: Any, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        kwargs.setdefault("cls", PlainHelpCommand)
        return super().command(*args, **kwargs)
