"""What the `dmstab` commands share on the command line: argument types, the examples epilog,
and the output options (`--json`, `--quiet`, `--progress-every`) with their plumbing."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

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
