"""The training loop: recipe -> data, model, diffusion, optimiser -> steps -> tracking.

Every random draw of step k (batch order, flips, timesteps, noise, dropout) comes from
seeds derived from (train.seed, k), so the loop has no RNG state to save: a run resumed
from the checkpoint of step k continues bit for bit as if it had never stopped. (A loss-aware
timestep sampler's history is objective state, saved in the checkpoint.)

Under `torchrun` each rank trains its rows of the global batch under DistributedDataParallel.
The draws of step k are made for the whole global batch on every rank, so the weights do not
depend on the number of processes or on `train.micro_batch_size` (up to float summation order;
model dropout is the exception, docs/distributed.md). Rank 0 owns the MLflow run and the files.

A GAN recipe (AAAI Table 1's baselines) runs through the same loop with a `GanTrainer`
(dmstab.train.gan_trainer) in place of the diffusion `Trainer`: both are a `LoopTrainer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dmstab.analysis.ema_profiles import SNAPSHOT_DTYPES
from dmstab.atomic import remove_interrupted_writes, require_writable_directory, write_atomically
from dmstab.checkpoint import (
    CHECKPOINT_NAME,
    KEPT_DIR,
    kept_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dmstab.config import (
    Recipe,
    differences,
    fingerprint,
    from_mapping,
    load_tree,
    result_dict,
    to_yaml,
)
from dmstab.console import working
from dmstab.devices import pick_device
from dmstab.diffusion.objectives import (
    DDPMObjective,
)
from dmstab.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    ctrl_c_ends_on_rank_zero,
    init_distributed,
    rank_device,
)
from dmstab.errors import DmstabError
from dmstab.models.generate import generate_for_recipe, write_samples
from dmstab.plots import timestep_histogram
from dmstab.tracking import (
    TAG_CHECKPOINT,
    TAG_FINGERPRINT,
    TAG_RUN_DIR,
    MlflowTracker,
    NullTracker,
    Tracker,
    check_store_writable,
    find_resumable_run,
    log_figure_at_step,
    resolve_uri,
    run_info,
    save_figure,
    tracked_run,
)
from dmstab.train.common import LoopTrainer
from dmstab.train.evaluate import Evaluator, build_evaluator
from dmstab.train.loss_guard import TrainingDiverged
from dmstab.train.magnitudes import MAGNITUDES_ARTIFACT, MagnitudeMonitor
from dmstab.train.metric_names import MetricNames
from dmstab.train.metric_window import MetricWindow
from dmstab.train.trainer import Trainer

SNAPSHOT_DIR = "snapshots"
# MLflow's stepped images (`mlflow ui`: an image chart with a step slider)
SAMPLES_KEY = "samples"  # the sample grid every `train.sample_every` steps and at the end
TIMESTEP_HISTOGRAM_KEY = "timesteps/histogram"  # every `timesteps.histogram_every` steps


class Progress(Protocol):
    def start(self, total: int, completed: int) -> None: ...
    def advance(self, step: int, loss: float, images_per_s: float) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class StartedRun:
    """The MLflow run a training logs to, as soon as it exists (rank 0)."""

    run_id: str
    run_name: str | None  # None while spooled for an unreachable server
    experiment: str
    experiment_id: str | None
    tracking_uri: str
    run_dir: Path
    resumed: bool


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    run_dir: Path
    step: int
    checkpoint: Path
    samples: Path | None
    is_main: bool = True  # False on torchrun ranks other than 0
    final_loss: float | None = None  # the mean loss of the last logged window of this process
    run: StartedRun | None = None  # rank 0's run


def _resolve_resume(recipe: Recipe, resume: str | None) -> str | None:
    """`auto` -> latest unfinished run of this recipe (or None); a run id is checked."""
    if resume is None:
        return None
    if resume == "auto":
        return find_resumable_run(recipe)
    tags, status = run_info(resume, recipe.tracking.uri)
    if status == "FINISHED":
        raise DmstabError(f"run {resume} already FINISHED; start a new run instead of resuming")
    if tags.get(TAG_FINGERPRINT) != fingerprint(recipe):
        stored = Path(tags.get(TAG_RUN_DIR, "")) / "recipe.yaml"
        detail = ""
        if stored.is_file():  # a dump, read as stored: older ones wrote train.steps and kimg
            changed = differences(from_mapping(load_tree(stored)), recipe)
            detail = ": " + "; ".join(changed[:5])
        raise DmstabError(f"recipe differs from the one run {resume} was started with{detail}")
    return resume


def build_trainer(
    recipe: Recipe, device: torch.device, context: DistributedContext = SINGLE_PROCESS
) -> LoopTrainer:
    """A GanTrainer for GAN recipes (AAAI Table 1's baselines), else the diffusion Trainer."""
    if recipe.model.adversarial:
        from dmstab.train.gan_trainer import GanTrainer

        return GanTrainer(recipe, device, context)
    return Trainer(recipe, device, context)


def _log_timestep_histogram(objective: DDPMObjective, step: int, tracker: Tracker) -> None:
    title = f"timesteps ({objective.sampler_name})"
    probabilities = objective.timesteps.probabilities(step).cpu()
    figure = timestep_histogram(objective.timestep_counts.cpu(), probabilities, step, title)
    log_figure_at_step(tracker, figure, TIMESTEP_HISTOGRAM_KEY, step)
    objective.timestep_counts.zero_()


def _sample_and_log(
    trainer: LoopTrainer,
    tracker: Tracker,
    run_dir: Path,
    on_sample: Callable[[int, int], None] | None,
) -> Path:
    """Every rank samples its share; rank 0 writes and logs the grid (its path on every rank)."""
    model = trainer.ema_model() if trainer.recipe.sample.use_ema else trainer.model
    images = generate_for_recipe(
        model,
        trainer.recipe,
        dataset_classes=trainer.dataset.num_classes,
        device=trainer.device,
        callback=on_sample,
        preview_latents_without_vae=True,  # the optional VAE never fails a training run
        context=trainer.context,
    )
    stem = f"step_{trainer.step:08d}"
    if not trainer.context.is_main:
        return run_dir / "samples" / f"{stem}.png"
    npz, grid = write_samples(images, run_dir / "samples", stem)
    tracker.log_image(grid, SAMPLES_KEY, trainer.step)
    tracker.log_artifact(npz, "samples")
    return grid


def _snapshot_due(trainer: LoopTrainer, step: int) -> bool:
    """At the end, and whenever the image count crosses a multiple of `ema.snapshot_every`."""
    if trainer.power_ema is None:
        return False
    every, batch = trainer.recipe.ema.snapshot_every, trainer.recipe.train.batch_size
    crossed = bool(every) and (step * batch) // every > ((step - 1) * batch) // every
    return crossed or step == trainer.recipe.train.total_steps


def _save_snapshots(trainer: LoopTrainer, run_dir: Path) -> None:
    assert trainer.power_ema is not None
    dtype = SNAPSHOT_DTYPES[trainer.recipe.ema.snapshot_dtype]
    trainer.power_ema.save_snapshots(run_dir / SNAPSHOT_DIR, dtype)


def _save(trainer: LoopTrainer, run_id: str, path: Path) -> None:
    """Checkpoint only a finite model: a diverged step must not replace the last good one.

    Every rank checks its (identical) weights; rank 0 writes; the others wait for the file.
    """
    if not all(torch.isfinite(p).all() for p in trainer.model.parameters()):
        raise TrainingDiverged(
            f"weights are not finite at step {trainer.step}; last good checkpoint: {path}"
        )
    if trainer.context.is_main:
        save_checkpoint(trainer.state_dict(run_id), path)
    trainer.context.barrier()


def _read_guard(trainer: LoopTrainer, tracker: Tracker, checkpoint: Path) -> None:
    """A host point: log the steps the loss guard skipped since the last one, and end the run
    if a step stopped it (the loss guard's verdict, the same on every rank)."""
    for step, total in trainer.guard.read_skipped():
        tracker.log_metrics({"train/skipped": 1.0, "train/skipped_total": total}, step)
    try:
        trainer.guard.raise_if_stopped()
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{exc}; last good checkpoint: {checkpoint}") from None


def _set_up_run_dir(run_dir: Path, recipe: Recipe, tracker: Tracker) -> None:
    """The run directory with its `recipe.yaml`, and the tags that point at it and at its
    checkpoint, which is kept there only, not uploaded as an artifact (idempotent)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "recipe.yaml").is_file():
        text = to_yaml(recipe).encode()
        write_atomically(run_dir / "recipe.yaml", lambda handle: handle.write(text))
    tracker.set_tags({TAG_RUN_DIR: str(run_dir), TAG_CHECKPOINT: str(run_dir / CHECKPOINT_NAME)})


def _read_resume_state(trainer: LoopTrainer, checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from (rank 0's, when rank 0 sees one: a shared
    filesystem), read and matched to the recipe before the run reopens, so a damaged one is
    one line and no run output."""
    context = trainer.context
    if not context.broadcast_object(checkpoint.is_file()):
        return None
    if not checkpoint.is_file():
        raise DmstabError(
            f"rank {context.rank} cannot read {checkpoint}, which rank 0 resumes from; "
            "multi-node resume needs train.out_dir on a shared filesystem"
        )
    state = load_checkpoint(checkpoint)
    if result_dict(from_mapping(state["recipe"])) != result_dict(trainer.recipe):
        raise DmstabError(f"checkpoint {checkpoint} belongs to a different recipe")
    return state


def _magnitude_monitor(trainer: LoopTrainer, tracker: Tracker) -> MagnitudeMonitor | None:
    """EDM2 Fig. 3 magnitudes every `train.magnitudes_every` steps, from step 0 of a new run
    (measured on rank 0 only)."""
    if not trainer.recipe.train.magnitudes_every or not trainer.context.is_main:
        return None
    monitor = MagnitudeMonitor(trainer.model, trainer.recipe, trainer.dataset, trainer.device)
    if trainer.step == 0:
        tracker.log_metrics(monitor.measure(0), 0)
    return monitor


def check_writable(recipe: Recipe) -> None:
    """Refuse, before a run exists or a step is computed, a recipe whose MLflow store or
    `train.out_dir` this process cannot write (a read-only working directory, say)."""
    check_store_writable(recipe.tracking.uri)
    require_writable_directory(Path(recipe.train.out_dir), "train.out_dir")


def train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    progress: Progress | None = None,
    on_sample: Callable[[int, int], None] | None = None,
    parent_run_id: str | None = None,
    on_run: Callable[[StartedRun], None] | None = None,
) -> TrainResult:
    """Run (or resume) a training run, a child of `parent_run_id` when given; all to MLflow.
    `on_run` is told of the run as soon as it exists.

    Under `torchrun` every rank calls this; rank 0 opens the MLflow run and writes the files,
    the others get a NullTracker and no progress, sample or run callbacks.
    """
    device = pick_device(recipe.train.device)
    context = init_distributed(device.type)
    device = rank_device(device, context)
    if not context.is_main:
        progress, on_sample, on_run = None, None, None
    context.from_main(lambda: check_writable(recipe))
    resumed = context.broadcast_object(context.from_main(lambda: _resolve_resume(recipe, resume)))
    resume_run_id = resumed if isinstance(resumed, str) else None
    if context.is_main:  # a spinner on a terminal until the run exists
        working(f"{recipe.name}: building the data and the model")
    trainer = build_trainer(recipe, device, context)  # bad settings fail before a run exists
    evaluator = build_evaluator(
        recipe, num_classes=trainer.dataset.num_classes, device=device, context=context
    )
    resume_state = None
    if resume_run_id is not None:
        resumed_dir = (Path(recipe.train.out_dir) / resume_run_id).resolve()
        resume_state = _read_resume_state(trainer, resumed_dir / CHECKPOINT_NAME)
    if context.is_main:
        working(f"{recipe.name}: opening the MLflow store {resolve_uri(recipe.tracking.uri)}")
    started = context.from_main(
        lambda: MlflowTracker.start(
            recipe, kind="train", resume_run_id=resume_run_id, parent_run_id=parent_run_id
        )
    )
    tracker: Tracker = started if started is not None else NullTracker()
    run_id = context.broadcast_object(tracker.run_id)
    assert isinstance(run_id, str)
    with tracked_run(tracker), ctrl_c_ends_on_rank_zero(context):
        run_dir = (Path(recipe.train.out_dir) / run_id).resolve()
        checkpoint = run_dir / CHECKPOINT_NAME
        run = None
        if started is not None:
            run = StartedRun(
                run_id,
                started.run_name,
                recipe.tracking.experiment,
                started.experiment_id,
                started.uri,
                run_dir,
                resumed=resume_run_id is not None,
            )
            if on_run is not None:
                on_run(run)
        if context.is_main:  # also on resume: a kill -9 may have cut a new run's setup short
            _set_up_run_dir(run_dir, recipe, tracker)
        if resume_run_id is not None:
            if context.is_main:  # a kill -9 mid-write leaves a partial temporary file behind
                for directory in (run_dir, run_dir / SNAPSHOT_DIR, run_dir / KEPT_DIR):
                    remove_interrupted_writes(directory)
            if resume_state is not None:
                trainer.load_state_dict(resume_state)
        # Constants of the run: tags (`dmstab.parameters`), not a metric's one-point chart.
        tracker.set_tags({f"dmstab.{k}": str(n) for k, n in trainer.parameter_counts().items()})
        samples, loss = _run_steps(
            trainer, tracker, run_id, checkpoint, progress, on_sample, evaluator
        )
    return TrainResult(
        run_id, run_dir, trainer.step, checkpoint, samples, context.is_main, loss, run
    )


def _run_steps(
    trainer: LoopTrainer,
    tracker: Tracker,
    run_id: str,
    checkpoint: Path,
    progress: Progress | None,
    on_sample: Callable[[int, int], None] | None,
    evaluator: Evaluator | None,
) -> tuple[Path | None, float | None]:
    """The steps left, then the final samples: their grid and the last logged mean loss."""
    cfg = trainer.recipe.train
    total = cfg.total_steps
    run_dir = checkpoint.parent
    if progress:
        progress.start(total, trainer.step)
    window = MetricWindow()
    last_loss: float | None = None
    magnitudes = _magnitude_monitor(trainer, tracker)
    names = MetricNames(trainer.recipe)
    objective, main = trainer.ddpm_objective(), trainer.context.is_main
    every_histogram = trainer.recipe.timesteps.histogram_every
    try:
        while trainer.step < total:
            scalars = trainer.train_step()
            step = trainer.step
            window.add(scalars, trainer.guard.last_accept)
            log_due = step % cfg.log_every == 0 or step == total
            # Host points, the same on every rank: the guard's verdicts are read here only.
            magnitudes_due = bool(cfg.magnitudes_every) and step % cfg.magnitudes_every == 0
            histogram_due = objective is not None and every_histogram
            histogram_due = bool(histogram_due) and step % every_histogram == 0
            snapshot_due = _snapshot_due(trainer, step)
            checkpoint_due = step % cfg.checkpoint_every == 0 or step == total
            kept_due = step in cfg.keep_checkpoints
            evaluation_due = evaluator is not None and evaluator.due(step)
            sample_due = bool(cfg.sample_every) and step % cfg.sample_every == 0 and step != total
            due = (magnitudes_due, histogram_due, snapshot_due, checkpoint_due, kept_due)
            if log_due or evaluation_due or sample_due or any(due):
                _read_guard(trainer, tracker, checkpoint)
            steps, metrics = window.read() if log_due else (0, {})
            if steps:
                if not all(map(math.isfinite, metrics.values())):
                    raise TrainingDiverged(
                        f"loss is not finite at step {step} (loss={metrics['loss']}); "
                        f"last good checkpoint: {checkpoint}"
                    )
                elapsed = time.perf_counter() - window.started
                metrics["images_per_s"] = steps * cfg.batch_size / max(elapsed, 1e-9)
                metrics["lr"] = trainer.optimizer.param_groups[0]["lr"]
                metrics["kimg"] = step * cfg.batch_size / 1000
                metrics.update(trainer.objective_metrics(step))
                tracked, constants = names.tracked(metrics)
                tracker.log_metrics(tracked, step)
                if constants:
                    tracker.set_tags(constants)
                last_loss = float(metrics["loss"])
                if progress:
                    progress.advance(step, metrics["loss"], metrics["images_per_s"])
                window.clear()
            if magnitudes is not None and magnitudes_due:
                tracker.log_metrics(magnitudes.measure(step), step)
            if objective is not None and main and histogram_due:
                _log_timestep_histogram(objective, step, tracker)
            if snapshot_due and main:
                _save_snapshots(trainer, run_dir)
            if checkpoint_due:
                tracker.flush()
                _save(trainer, run_id, checkpoint)
            if kept_due:
                _save(trainer, run_id, kept_checkpoint(run_dir, step))
            if evaluator is not None and evaluation_due:
                model = trainer.ema_model() if trainer.recipe.eval.use_ema else trainer.model
                tracker.log_metrics(evaluator.evaluate(model), step)
            if sample_due:
                _sample_and_log(trainer, tracker, run_dir, on_sample)
    finally:
        if progress:
            progress.stop()
    if magnitudes is not None and magnitudes.history:
        save_figure(tracker, magnitudes.figure(), MAGNITUDES_ARTIFACT)
    samples = _sample_and_log(trainer, tracker, run_dir, on_sample)
    return samples, last_loss
