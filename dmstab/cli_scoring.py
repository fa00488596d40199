"""The scoring commands of the command line, `dmstab fid` and `dmstab fid-sweep`: their
arguments and help; `dmstab.cli` registers them. No numerical work here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from dmstab.cli_options import OptionalFeatures, examples

FID_EXAMPLES = examples(
    "dmstab fid   # the latest run's checkpoint, as its recipe's eval: block says",
    "dmstab fid samples/RUN/ddpm250_seed0.npz --ref recipes/cifar10_baseline.yaml",
    "dmstab fid RUN_ID --ref recipes/cifar10_baseline.yaml --kid --is   # samples 50k",
    "dmstab fid runs/RUN/reconstructed/phema_step0000004000_sigma0.1300.pt --ref ref.npz",
    "dmstab fid generated/ --ref cifar10_train_stats.npz --mode legacy_tensorflow",
    "dmstab fid a.npz --ref b.npz --kid --inception-weights ~/inception-2015-12-05.pt",
)
FID_SWEEP_EXAMPLES = examples(
    "dmstab ema-reconstruct --sweep 0.03:0.20:0.01",
    "dmstab fid-sweep --ref stats.npz                      # latest run's reconstructions",
    "dmstab fid-sweep runs/RUN_ID/reconstructed --ref recipes/edm2_mini.yaml "
    "--features random_conv --num-images 1000",
    "dmstab fid-sweep DIR --ref stats.npz --guidance 1.0 --guidance 1.4 --guide guide.pt",
    "dmstab fid-sweep recipes/edm2_img512_released_guidance.yaml   # EDM2's released files",
)


def fid(
    images: Annotated[
        str | None,
        typer.Argument(
            help="Images to score: .npz (uint8 NHWC), folder, or a training run id or checkpoint "
            "(.pt) to sample from with its recipe's sampler (default: the checkpoint of the "
            "latest run that wrote one, training or ema-reconstruct).",
            show_default=False,
        ),
    ] = None,
    ref: Annotated[
        Path | None,
        typer.Option(
            help="Reference: statistics .npz (mu, sigma), images (.npz/folder), or a recipe "
            "whose dataset's statistics are computed once and cached (default for a model: "
            "its recipe's eval.reference, else its training set).",
            show_default=False,
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="clean-fid mode: clean, legacy_pytorch or legacy_tensorflow (default: a "
            "model's eval.mode, else clean).",
            show_default=False,
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            help="FID feature network: inception; random_conv (a seeded proxy for toy data); or "
            "classifier (a small CNN trained on the synthetic shapes; synthetic data only, no "
            "IS). Default: a model's eval.features, else inception.",
            show_default=False,
        ),
    ] = None,
    inception_weights: Annotated[
        str | None,
        typer.Option(
            help="Local Inception weights file or folder (else $DMSTAB_INCEPTION_WEIGHTS)."
        ),
    ] = None,
    with_kid: Annotated[bool, typer.Option("--kid", help="Also compute KID.")] = False,
    with_is: Annotated[bool, typer.Option("--is", help="Also compute Inception Score.")] = False,
    num_images: Annotated[
        int | None,
        typer.Option(
            help="Images to sample from a run or checkpoint (default: its recipe's "
            "eval.num_images, 50,000 as the papers unless the recipe says otherwise).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per Inception batch.")] = 250,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the score run.")] = "fid",
    parent: Annotated[
        str | None,
        typer.Option(
            help="Run id to link the score to (default: the sampled training run).",
            show_default=False,
        ),
    ] = None,
) -> Mapping[str, Any] | None:
    """FID (clean-fid numbers, batched), KID and IS of images or a model; logged to MLflow."""
    from dmstab.commands.fid import main

    return main(
        images,
        ref,
        mode=mode,
        features=features,
        inception_weights=inception_weights,
        with_kid=with_kid,
        with_is=with_is,
        num_images=num_images,
        batch_size=batch_size,
        experiment=experiment,
        parent=parent,
    )


def fid_sweep(
    checkpoints: Annotated[
        list[str] | None,
        typer.Argument(
            help="ema-reconstruct outputs (files or folders; default: the latest training "
            "run's reconstructed/), or a recipe with a fid_sweep: section of released files, "
            "and its overrides section.key=value.",
            show_default=False,
        ),
    ] = None,
    ref: Annotated[
        Path | None,
        typer.Option(help="Reference: statistics .npz, images or a recipe (or eval.reference)."),
    ] = None,
    num_images: Annotated[
        int | None,
        typer.Option(
            help="Images per checkpoint and guidance [default: 50000, or fid_sweep.num_images].",
            show_default=False,
        ),
    ] = None,
    guidance: Annotated[
        list[float] | None,
        typer.Option(
            help="Guidance strength(s) w (EDM2 Fig. 6); default 1 (none), or fid_sweep.guidance.",
            show_default=False,
        ),
    ] = None,
    guide: Annotated[
        str | None,
        typer.Option(help="Guide for w != 1: self, a checkpoint / run id (or fid_sweep.guide)."),
    ] = None,
    features: OptionalFeatures = None,
    mode: Annotated[
        str | None,
        typer.Option(help="clean-fid mode [default: clean, or eval.mode].", show_default=False),
    ] = None,
    inception_weights: Annotated[
        str | None, typer.Option(help="Local Inception weights (else $DMSTAB_INCEPTION_WEIGHTS).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Images per feature batch [default: 250, or eval.batch_size].", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where the CSV and figure go (default: beside the checkpoints; for a recipe, "
            "analyses/fid-sweep/RECIPE_NAME).",
            show_default=False,
        ),
    ] = None,
) -> Mapping[str, Any] | None:
    """FID against EMA length σrel (EDM2 Fig. 5a; per guidance strength, Fig. 6), of
    reconstructed checkpoints or of the released files a recipe names."""
    from dmstab.commands.fid_sweep import main

    return main(
        ref,
        checkpoints or [],
        num_images=num_images,
        guidances=guidance or [],
        guide=guide,
        features=features,
        mode=mode,
        inception_weights=inception_weights,
        batch_size=batch_size,
        out=out,
    )
