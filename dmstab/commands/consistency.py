"""`dmstab consistency`: how alike a group of trained models' images are for the same noise
(AAAI 2024 Eq. 1, Table 1, Fig. 1).

Every model draws `consistency.num_images` images with ONE sampling configuration, so image i
of every model starts from the same x_T and gets the same per-step noise (a GAN: the same z).
The group is scored once per sampler in `consistency.samplers` and, within each sampler, per
prediction target for the members that share one (the paper credits ε-prediction near t → T).

Under `torchrun` every rank samples its share of the seeds of every model (image i depends only
on the seed and i, so the gathered images are one process's); rank 0 scores, logs and prints.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmstab.analysis.consistency import (
    ConsistencyConfig,
    ConsistencyResult,
    check_consistency,
    consistency_score,
)
from dmstab.atomic import write_atomically
from dmstab.commands.published_group import (
    published_entries,
    published_subjects,
    require_downloaded,
)
from dmstab.commands.study import AnalysisRun, join_ranks, open_ranked_analysis
from dmstab.commands.subjects import Subject, load_subject, parse_inputs, trained_subject
from dmstab.config import ANALYSES, Recipe, SampleConfig, apply_overrides, from_written, to_written
from dmstab.console import SampleProgress, TextTable, TrainProgress, console, result_table
from dmstab.data.latents import require_vae
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError
from dmstab.models.gan import gan_config
from dmstab.models.generate import generate_for_recipe, sampler_label
from dmstab.plots import consistency_grid
from dmstab.tracking import browse_hint, save_figure
from dmstab.train.loop import Progress


def _member_overrides(member: str) -> list[str]:
    """One member's overrides, split as a shell would: `model.channel_mult='[1, 2]'` is one."""
    try:
        return shlex.split(member)
    except ValueError as error:
        raise DmstabError(f"consistency.members entry {member!r}: {error}") from None


def member_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """The group `consistency.members` defines: (label, the recipe with that member's
    overrides, split as a shell would) for each member."""
    group = recipe.analysis(ConsistencyConfig)
    members = group.members
    if len(members) + len(group.published) < 2:
        raise DmstabError(
            f"consistency.members lists {len(members)} model(s); a group needs at least 2 "
            '(e.g. ["train.seed=0", "train.seed=1", "train.seed=2"])'
        )
    tree = to_written(recipe)
    return [
        (member or recipe.name, from_written(apply_overrides(tree, _member_overrides(member))))
        for member in members
    ]


def trained_group(
    recipe: Recipe,
    *,
    progress: Progress | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> list[Subject]:
    """Every member of the recipe's group, trained now or reused from a finished run."""
    return [
        trained_subject(member, label=label, progress=progress, on_sample=on_sample)
        for label, member in member_recipes(recipe)
    ]


def _is_gan(recipe: Recipe) -> bool:
    return recipe.model.adversarial


def _noise_signature(subject: Subject) -> dict[str, object]:
    """What must agree for two models to receive the same noise for the same seed."""
    recipe = subject.recipe
    signature: dict[str, object] = {
        "kind": "GAN" if _is_gan(recipe) else "diffusion model",
        "data.resolution": recipe.data.resolution,
        "image channels": recipe.data.channels,
        "class conditioning (classes)": subject.num_classes if recipe.model.class_cond else 0,
    }
    if _is_gan(recipe):
        signature["model.z_dim"] = gan_config(recipe).z_dim
    else:
        signature["diffusion.formulation"] = recipe.diffusion.formulation
        signature["diffusion.steps"] = recipe.diffusion.steps
    return signature


def require_shared_noise(subjects: Sequence[Subject]) -> None:
    """One line naming the first setting that stops the models from sharing noise."""
    if len(subjects) < 2:
        raise DmstabError(f"consistency compares at least 2 models; got {len(subjects)}")
    reference = _noise_signature(subjects[0])
    for subject in subjects[1:]:
        for key, value in _noise_signature(subject).items():
            if value != reference[key]:
                raise DmstabError(
                    f"{subjects[0].label} and {subject.label} cannot share noise: {key} is "
                    f"{reference[key]} vs {value}"
                )


def sample_settings(subjects: Sequence[Subject]) -> list[SampleConfig]:
    """One SampleConfig per sampler, from the first model's recipe, for every model (a GAN
    group has no sampler: one configuration, whatever `consistency.samplers` lists)."""
    recipe = subjects[0].recipe
    config = dataclasses.replace(
        recipe.sample, num_images=recipe.analysis(ConsistencyConfig).num_images
    )
    if _is_gan(recipe):
        return [config]
    samplers = recipe.analysis(ConsistencyConfig).samplers or (config.sampler,)
    return [dataclasses.replace(config, sampler=sampler) for sampler in samplers]


def sampler_note(subjects: Sequence[Subject]) -> str:
    """Why a GAN group's `consistency.samplers` are ignored ("" when they are not)."""
    recipe = subjects[0].recipe
    samplers = recipe.analysis(ConsistencyConfig).samplers
    if not _is_gan(recipe) or not samplers:
        return ""
    return f"a GAN group is scored once; consistency.samplers {list(samplers)} do not apply"


def group_images(
    subjects: Sequence[Subject],
    config: SampleConfig,
    device: torch.device,
    callback: Callable[[int, int], None] | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> torch.Tensor:
    """uint8 images (N models, M seeds, C, H, W), every model sampled with `config`; under
    `context` each rank samples its share of the seeds and every rank gets all images."""
    images = []
    for subject in subjects:
        model = subject.network(device, use_ema=config.use_ema)
        images.append(
            generate_for_recipe(
                model,
                subject.recipe,
                dataset_classes=subject.num_classes,
                device=device,
                callback=callback,
                sample=config,
                context=context,
            )
        )
    return torch.stack(images)


@dataclass(frozen=True)
class SamplerScores:
    """The group's Eq. 1 score for one sampler, and per prediction target."""

    name: str
    result: ConsistencyResult
    by_target: dict[str, ConsistencyResult]


def score_group(subjects: Sequence[Subject], images: torch.Tensor, name: str) -> SamplerScores:
    """Eq. 1 over the whole group, and over each prediction target's members (≥ 2 of them)
    when the group mixes targets; each subgroup's first member is its reference."""
    targets: dict[str, list[int]] = {}
    if not _is_gan(subjects[0].recipe):
        for index, subject in enumerate(subjects):
            targets.setdefault(subject.recipe.diffusion.target, []).append(index)
    by_target = {
        target: consistency_score(images[indices])
        for target, indices in targets.items()
        if len(indices) >= 2 and len(targets) > 1
    }
    return SamplerScores(name, consistency_score(images), by_target)


@dataclass(frozen=True)
class ConsistencyReport:
    """The logged run, the models' labels (reference first) and the scores per sampler."""

    run_id: str
    labels: list[str]
    scores: list[SamplerScores]
    directory: Path


def consistency(
    subjects: Sequence[Subject],
    device: torch.device,
    callback: Callable[[int, int], None] | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> ConsistencyReport | None:
    """Sample every model with each shared configuration, score Eq. 1, log one MLflow run.
    Under `context` the seeds are split over the ranks (every model's image i is made by the
    same rank); rank 0 scores, logs and returns the report, the others None."""
    require_shared_noise(subjects)
    labels = [subject.label for subject in subjects]
    scores = []
    shareable = partial(_check_shareable, subjects, context.world_size)
    with open_ranked_analysis(subjects, "consistency", context, shareable) as run:
        if run is not None:
            run.tracker.set_tags(_member_tags(subjects))
        for config in sample_settings(subjects):
            progress = callback if run is not None else None
            images = group_images(subjects, config, device, progress, context)
            if run is not None:  # rank 0 scores and logs
                scored = score_group(subjects, images, sampler_label(subjects[0].recipe, config))
                _log(run, scored, images, labels, subjects[0].step)
                scores.append(scored)
        if run is None:
            return None
        run.tracker.log_metrics(_metrics(scores[0], "consistency"), 0)
    return ConsistencyReport(run.run_id, labels, scores, run.directory)


def _check_shareable(subjects: Sequence[Subject], ranks: int) -> None:
    """Every one of `ranks` ranks samples at least one seed."""
    count = subjects[0].recipe.analysis(ConsistencyConfig).num_images
    if count < ranks:
        raise DmstabError(
            f"consistency.num_images={count} cannot be shared by {ranks} ranks; "
            f"use at least {ranks} or fewer processes"
        )


def summary_tables(report: ConsistencyReport) -> list[TextTable]:
    """Per sampler: each model's mean PSNR against the reference, Eq. 1's score and, for a
    group that mixes prediction targets, the score within each target."""
    reference = report.labels[0]
    tables = []
    for scored in report.scores:
        result = scored.result
        body = [
            (f"{reference} vs {label}", f"{row.mean():.2f}")
            for label, row in zip(report.labels[1:], result.per_pair, strict=True)
        ]
        body.append(("C(q), Eq. 1", f"{result.score:.2f}"))
        body += [(f"C(q), target {t} only", f"{r.score:.2f}") for t, r in scored.by_target.items()]
        caption = (
            f"{result.identical_pairs}/{result.num_pairs} pairs identical, cap {result.cap:.1f} dB"
        )
        tables.append(
            TextTable(f"consistency, {scored.name}", ("models", "PSNR dB"), body, caption)
        )
    return tables


def _member_tags(subjects: Sequence[Subject]) -> dict[str, str]:
    """Each member's label and training run id (its checkpoint is tagged by open_analysis)."""
    tags = {f"dmstab.member.{i}": subject.label for i, subject in enumerate(subjects)}
    for i, subject in enumerate(subjects):
        if subject.run_id:
            tags[f"dmstab.member.{i}.run_id"] = subject.run_id
    note = sampler_note(subjects)
    if note:
        tags["dmstab.consistency.note"] = note
    return tags


def _metrics(scored: SamplerScores, prefix: str) -> dict[str, float]:
    """`<prefix>/psnr`, `<prefix>/identical_pairs` and `<prefix>/target_<t>/psnr` (the first
    sampler's are also logged under plain `consistency/`)."""
    metrics = {
        f"{prefix}/psnr": scored.result.score,
        f"{prefix}/identical_pairs": float(scored.result.identical_pairs),
    }
    for target, result in scored.by_target.items():
        metrics[f"{prefix}/target_{target}/psnr"] = result.score
    return metrics


def _summary(result: ConsistencyResult) -> dict[str, Any]:
    return {
        "score": result.score,
        "cap": result.cap,
        "identical_pairs": result.identical_pairs,
        "pairs": result.num_pairs,
        "per_pair": result.per_pair.tolist(),
        "per_seed": result.per_seed.tolist(),
        "pairwise": [[None if np.isnan(v) else v for v in row] for row in result.pairwise],
    }


def _log(
    run: AnalysisRun, scored: SamplerScores, images: torch.Tensor, labels: list[str], step: int
) -> None:
    prefix = f"consistency/{scored.name}"
    run.tracker.log_metrics(_metrics(scored, prefix), 0)
    directory = run.directory / scored.name
    npz = directory / "images.npz"
    write_atomically(npz, lambda handle: np.savez(handle, images=images.numpy(), labels=labels))
    report = {
        "labels": labels,
        "training_step_of_first_model": step,
        **_summary(scored.result),
        "by_target": {target: _summary(result) for target, result in scored.by_target.items()},
    }
    scores_file = directory / "scores.json"
    text = json.dumps(report, indent=2)
    write_atomically(scores_file, lambda handle: handle.write(text.encode()))
    run.tracker.log_artifact(npz, prefix)
    run.tracker.log_artifact(scores_file, prefix)
    figure = consistency_grid(images, labels, psnr=scored.result.per_pair)
    save_figure(run.tracker, figure, f"{prefix}/grid.png")


def _published_members(recipe: Recipe, context: DistributedContext) -> list[Subject]:
    """`published_subjects`, imported by rank 0 alone (the others wait, then find its import)."""
    imported = context.from_main(lambda: published_subjects(recipe))
    return imported if imported is not None else published_subjects(recipe)


def main(arguments: Sequence[str]) -> dict[str, Any] | None:
    """A recipe's group (trained or reused) or two or more trained models, scored by Eq. 1;
    the tables on stdout, the summary `--json` prints returned (None on torchrun's ranks other
    than 0)."""
    inputs = parse_inputs(arguments)
    if inputs.recipe is not None:
        members = [member for _, member in member_recipes(inputs.recipe)]
        require_downloaded(published_entries(inputs.recipe))  # before any training
        device, context = join_ranks(inputs.recipe)
        for member in members:  # a group of latent models needs the VAE: before any training
            require_vae(member.data, device)
        published = _published_members(inputs.recipe, context)
        for subject in published:
            require_vae(subject.recipe.data, device)
        trained = trained_group(
            inputs.recipe, progress=TrainProgress(), on_sample=SampleProgress("sample")
        )
        subjects = [*trained, *published]
    else:
        if len(inputs.sources) < 2:
            raise DmstabError(
                "give a recipe with consistency.members, or at least two trained models"
            )
        subjects = [load_subject(source, inputs.overrides) for source in inputs.sources]
        device, context = join_ranks(subjects[0].recipe)
        for subject in subjects:
            require_vae(subject.recipe.data, device)
    report = consistency(subjects, device, SampleProgress("sample"), context)
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    for table in summary_tables(report):
        result_table(table)
    if sampler_note(subjects):
        console.print(f"  note    {sampler_note(subjects)}")
    console.print(f"[green]done[/] consistency of {len(subjects)} models")
    console.print(f"  run     {report.run_id}   (images and scores: {report.directory})")
    console.print(f"  browse  {browse_hint(subjects[0].recipe.tracking.uri)}")
    return {
        "run_id": report.run_id,
        "directory": str(report.directory),
        "labels": report.labels,
        "scores": {scored.name: scored.result.score for scored in report.scores},
    }


ANALYSES.register(
    ConsistencyConfig.section, main, config=ConsistencyConfig, check=check_consistency
)
