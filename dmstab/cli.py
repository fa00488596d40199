"""The `dmstab` command line: parse -> recipe -> library call. No numerical work here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from dmstab import __version__, cli_scoring
from dmstab.cli_errors import OneLineUsageErrors, user_errors
from dmstab.cli_options import Analyzed, App, Overrides, UntypedFlags, examples, reports


class Group(UntypedFlags, OneLineUsageErrors):
    """`dmstab`: one-line usage errors, and no `<bool>` beside its flags in the help."""


app = App(
    name="dmstab",
    cls=Group,
    help=(
        "Study and speed up diffusion-model training; every number goes to MLflow.\n\n"
        "Examples:\n\n"
        "  dmstab train recipes/quickstart.yaml\n\n"
        "  dmstab train recipes/cifar10_clts.yaml data.root=~/data optim.lr=2e-4\n\n"
        "  dmstab train recipes/cifar10_clts.yaml --dry-run\n\n"
        "  dmstab train recipes/cifar10_clts.yaml --resume auto\n\n"
        "  dmstab sample RUN_ID sample.steps=50 sample.sampler=ddim\n\n"
        "Browse runs with `mlflow ui` (it opens ./mlflow.db)."
    ),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dmstab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """dmstab command line."""


@app.command(
    epilog=examples(
        "dmstab train recipes/quickstart.yaml",
        "dmstab train recipes/cifar10_clts.yaml data.root=~/data train.batch_size=64",
        "dmstab train recipes/cifar10_clts.yaml --dry-run",
        "dmstab train recipes/quickstart.yaml --resume auto",
        "torchrun --nproc_per_node 4 -m dmstab train recipes/edm2_mini.yaml",
        "dmstab train recipes/ablation_clts_mu.yaml --launcher submitit --parallel 4 "
        "--launcher-option slurm_partition=gpu --launcher-option gpus_per_node=4 "
        "--launcher-option timeout_min=1440",
    )
)
@reports
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Overrides = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="`auto`: continue the latest unfinished run of this recipe (or sweep); "
            "or a run id (a sweep's parent run id).",
            show_default=False,
        ),
    ] = None,
    launcher: Annotated[
        str | None,
        typer.Option(
            "--launcher",
            help="`submitit`: each child of the sweep a submitit job (SLURM where `sbatch` is "
            "found, else processes here), collected under the parent run "
            "(default: the children train here, one after the other).",
            show_default=False,
        ),
    ] = None,
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            help="With --launcher submitit: children running at once (default: all).",
            show_default=False,
        ),
    ] = None,
    launcher_options: Annotated[
        list[str] | None,
        typer.Option(
            "--launcher-option",
            help="With --launcher submitit: KEY=VALUE, one of submitit's parameters "
            "(timeout_min, gpus_per_node, cpus_per_task, mem_gb, slurm_partition, "
            "slurm_account, slurm_additional_parameters, ...) or cluster=slurm|local.",
            show_default=False,
        ),
    ] = None,
) -> Mapping[str, Any] | None:
    """Train a diffusion model from a recipe (every child of its `sweep:`), logging to MLflow."""
    from dmstab.commands.train import main

    return main(
        recipe,
        overrides or [],
        dry_run=dry_run,
        resume=resume,
        launcher=launcher,
        parallel=parallel,
        launcher_options=launcher_options or [],
    )


@app.command(
    epilog=examples(
        "dmstab sample                       # latest training run (any experiment), EMA",
        "dmstab sample RUN_ID sample.num_images=256 sample.seed=1",
        "dmstab sample runs/RUN_ID/checkpoint.pt sample.sampler=ddim sample.steps=50",
    )
)
@reports
@user_errors
def sample(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Training run id or checkpoint path (default: the checkpoint of the latest run "
            "that wrote one, training or ema-reconstruct).",
            show_default=False,
        ),
    ] = None,
    overrides: Overrides = None,
    experiment: Annotated[
        str | None,
        typer.Option(help="Look for the latest run only in this MLflow experiment."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default samples/RUN_ID).")
    ] = None,
) -> Mapping[str, Any] | None:
    """Sample images (DDPM, DDIM or Heun, fixed seeds) and write an .npz and a PNG grid."""
    from dmstab.commands.sample import main

    return main(source, overrides or [], experiment=experiment, out=out)


@app.command(
    "import",
    epilog=examples(
        "dmstab import 128x128_diffusion.pt          # a released file: its flags are known",
        "dmstab import model.pt data.resolution=32 model.num_heads=4 model.attention_order=legacy "
        "model.dropout=0.1 diffusion.schedule=cosine diffusion.steps=4000",
        "dmstab import 64x64_diffusion.pt --out models/adm64.pt",
    ),
)
@reports
@user_errors
def import_(
    file: Annotated[Path, typer.Argument(help="The published checkpoint.", show_default=False)],
    overrides: Overrides = None,
    format_name: Annotated[
        str | None,
        typer.Option("--format", help="Its format (default: by suffix).", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Also write the dmstab checkpoint here.", show_default=False),
    ] = None,
) -> Mapping[str, Any] | None:
    """Import a checkpoint released with a paper (improved-/guided-diffusion .pt, U-ViT .pth,
    EDM2 .pkl): a dmstab checkpoint and an MLflow run that every command reads by its run id."""
    from dmstab.commands.import_model import main

    return main(file, overrides or [], format_name=format_name, out=out)


@app.command(
    "ema-reconstruct",
    epilog=examples(
        "dmstab ema-reconstruct --sigma-rel 0.13   # latest training run, last snapshot",
        "dmstab ema-reconstruct --run RUN_ID --sigma-rel 0.05 --sigma-rel 0.2 --at 4000",
        "dmstab ema-reconstruct --sweep 0.03:0.20:0.01      # one checkpoint per σrel",
        "dmstab ema-reconstruct --sigma-rel 0.13 --dry-run  # coefficients and profile error",
    ),
)
@reports
@user_errors
def ema_reconstruct(
    sigma_rel: Annotated[
        list[float] | None,
        typer.Option("--sigma-rel", help="EMA length(s) σrel to reconstruct.", show_default=False),
    ] = None,
    gamma: Annotated[
        list[float] | None,
        typer.Option("--gamma", help="EMA exponent(s) γ instead of σrel.", show_default=False),
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(help="start:stop:step range of σrel (stop included).", show_default=False),
    ] = None,
    at: Annotated[
        int | None,
        typer.Option(
            help="Training step to reconstruct at (default: last snapshot).", show_default=False
        ),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option("--run", help="Training run id (default: latest).", show_default=False),
    ] = None,
    snapshots: Annotated[
        Path | None,
        typer.Option(help="Snapshot directory instead of a run.", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (default RUN_DIR/reconstructed).", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print coefficients and errors, write nothing.")
    ] = False,
) -> Mapping[str, Any] | None:
    """Post-hoc EMA (EDM2 Sec. 3): a checkpoint for any σrel from power-EMA snapshots."""
    from dmstab.commands.ema_reconstruct import main

    return main(
        sigma_rel or [],
        gamma or [],
        sweep,
        at=at,
        run=run,
        snapshots=snapshots,
        out=out,
        dry_run=dry_run,
    )


app.command(epilog=cli_scoring.FID_EXAMPLES)(reports(user_errors(cli_scoring.fid)))
app.command("fid-sweep", epilog=cli_scoring.FID_SWEEP_EXAMPLES)(
    reports(user_errors(cli_scoring.fid_sweep))
)


@app.command(
    epilog=examples(
        "dmstab report recipes/cifar10_baseline.yaml recipes/cifar10_clts.yaml "
        "--baseline recipes/cifar10_baseline.yaml",
        "dmstab report RUN_ID --metric kid",
        "dmstab report --experiment dmstab",
    )
)
@user_errors
def report(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="Recipe files (their latest training run) or run ids (a sweep parent: its "
            "children).",
            show_default=False,
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            help="Report every training run in this MLflow experiment.", show_default=False
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="Metric to report (default: the paper block's; fid, kid, is mean eval/<name>).",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Baseline for the Fig. 5 speed-up of each method: a recipe, a run id, or the "
            "label of a reported method (e.g. a sweep point: uniform).",
            show_default=False,
        ),
    ] = None,
    log_experiment: Annotated[
        str, typer.Option(help="MLflow experiment of the report run.")
    ] = "report",
) -> None:
    """Paper vs measured (AAAI Tables 2-3, Fig. 5 speed-up) from MLflow; logged as a report run."""
    from dmstab.commands.report import main

    main(
        sources or [],
        experiment=experiment,
        metric=metric,
        baseline=baseline,
        log_experiment=log_experiment,
    )


@app.command(
    epilog=examples(
        "dmstab sync                                  # every spool in runs/.mlflow-spool",
        "dmstab sync runs/.mlflow-spool/RUN_ID",
        "dmstab sync --uri http://mlflow.lab:5000     # the server moved",
    )
)
@user_errors
def sync(
    spool: Annotated[
        Path,
        typer.Argument(help="A run's spool, or a .mlflow-spool folder of them."),
    ] = Path("runs/.mlflow-spool"),
    uri: Annotated[
        str | None,
        typer.Option(help="Tracking URI to upload to (default: the spool's).", show_default=False),
    ] = None,
) -> None:
    """Upload runs spooled while the MLflow server was unreachable, then delete the spools."""
    from dmstab.commands.sync import main

    main(spool, uri)


@app.command(
    epilog=examples(
        "dmstab recipes",
        "dmstab recipes --json | jq -r '.recipes[] | select(.reproduces != \"\") | .name'",
    )
)
@reports
@user_errors
def recipes(
    folder: Annotated[
        Path | None,
        typer.Argument(
            help="A folder of recipes (default: the bundled recipes/).", show_default=False
        ),
    ] = None,
) -> Mapping[str, Any] | None:
    """The bundled recipes: what each is for and the paper table or figure it reproduces."""
    from dmstab.commands.recipes import BUNDLED, main

    return main(folder or BUNDLED)


@app.command(
    epilog=examples(
        "dmstab runs                                  # the 20 latest runs in ./mlflow.db",
        "dmstab runs --experiment tests --kind train --limit 5",
        "MLFLOW_TRACKING_URI=http://mlflow.lab:5000 dmstab runs --json",
    )
)
@reports
@user_errors
def runs(
    experiment: Annotated[
        str | None,
        typer.Option(help="Only this MLflow experiment's runs.", show_default=False),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="Only runs of this kind: train, sweep, sample, fid, fid-sweep, "
            "ema-reconstruct, report, imported, or an analysis (consistency, ...).",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
) -> Mapping[str, Any] | None:
    """Recent runs of the MLflow store (./mlflow.db or $MLFLOW_TRACKING_URI): kind, status,
    last step, final loss and FID."""
    from dmstab.commands.runs import main

    return main(experiment=experiment, kind=kind, limit=limit)


def _analysis_verb(name: str, summary: str, *lines: str) -> None:
    """`dmstab NAME ARGS…`, the same as `dmstab analyse NAME ARGS…`."""

    @app.command(name, help=summary, epilog=examples(*lines))
    @reports
    @user_errors
    def verb(arguments: Analyzed = None) -> Mapping[str, Any] | None:
        from dmstab.commands.analyse import main

        return main(name, arguments or [])


_analysis_verb(
    "consistency",
    "Same noise, N models: PSNR of their images, AAAI Eq. 1 (Table 1, Fig. 1).",
    "dmstab consistency recipes/mini_table1_dm_consistency.yaml   # trains the group",
    "dmstab consistency RUN_A RUN_B RUN_C consistency.num_images=32",
    "dmstab consistency a.pt b.pt consistency.samplers=[ddpm,ddim] sample.steps=100",
)


@app.command(
    epilog=examples(
        "dmstab hessian recipes/mini_fig4_hessian_dm.yaml     # trains it first if needed",
        "dmstab hessian RUN_ID hessian.top_k=5 hessian.timesteps=[10,500]",
        "dmstab hessian runs/RUN_ID/checkpoint.pt hessian.method=double_backward",
        "dmstab hessian recipes/fig4_hessian_cifar10_dm.yaml --dry-run   # memory estimate",
    )
)
@reports
@user_errors
def hessian(
    arguments: Analyzed = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the memory estimate and exit: trains and computes nothing."
        ),
    ] = False,
) -> Mapping[str, Any] | None:
    """Hessian of the loss on a fixed batch: top eigenvalues, trace, density (AAAI Fig. 4)."""
    if dry_run:
        from dmstab.commands.hessian import memory_plan

        return memory_plan(arguments or [])
    from dmstab.commands.analyse import main

    return main("hessian", arguments or [])


_analysis_verb(
    "landscape",
    "Loss surface around a model (AAAI Fig. 2) or the loss between two checkpoints (Fig. 3).",
    "dmstab landscape recipes/mini_fig2_landscape_dm.yaml      # 2D surfaces",
    "dmstab landscape recipes/mini_fig3_interpolation_dm.yaml  # 1D, kept checkpoints",
    "dmstab landscape RUN_ID landscape.points=21 landscape.timesteps=[10,900]",
    "dmstab landscape early.pt late.pt                         # 1D from θb to θa",
)


@app.command(
    epilog=examples(
        "dmstab analyse hessian RUN_ID                # = dmstab hessian RUN_ID",
        "DMSTAB_PLUGINS=mylab.probes dmstab analyse probe RUN_ID probe.layers=4",
    )
)
@reports
@user_errors
def analyse(
    name: Annotated[str, typer.Argument(help="A registered analysis.", show_default=False)],
    arguments: Analyzed = None,
) -> Mapping[str, Any] | None:
    """Run a registered analysis by its section name: consistency, hessian, landscape, or one a
    plugin registers (DMSTAB_PLUGINS)."""
    from dmstab.commands.analyse import main

    return main(name, arguments or [])


def main() -> Any:
    return app()
