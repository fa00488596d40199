"""The training loop: recipe -> data, model, diffusion, optimiser -> steps -> tracking.

Every random draw of step k (batch order, flips, timesteps, noise, dropout) comes from
seeds derived from (train.seed, k), so the loop has no RNG state to save: a run resumed
from the checkpoint of step k continues bit for bit as if it had never stopped. (A loss-aware
timestep sampler's history is objective state, saved in the checkpoint.)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from dmstab import __version__
from dmstab.data import ImageDataset, build_dataset
from dmstab.devices import pick_device
from dmstab.diffusion.objectives import DDPMObjective, build_objective
from dmstab.errors import DmstabError
from dmstab.evaluate import Evaluator, build_evaluator
from dmstab.generate import generate_for_recipe, write_samples
from dmstab.models import build_model, count_parameters
from dmstab.networks import CHECKPOINT_NAME
from dmstab.plots import timestep_histogram
from dmstab.recipe import Recipe, differences, fingerprint, from_mapping, to_dict, to_yaml
from dmstab.tracking import (
    TAG_FINGERPRINT,
    TAG_RUN_DIR,
    MlflowTracker,
    Tracker,
    find_resumable_run,
    run_info,
    save_figure,
    tracked_run,
)
from dmstab.train.checkpoint import load_checkpoint, save_checkpoint
from dmstab.train.ema import EMA
from dmstab.train.magnitudes import MAGNITUDES_ARTIFACT, MagnitudeMonitor
from dmstab.train.optim import build_optimizer, learning_rate
from dmstab.train.power_ema import SNAPSHOT_DTYPES, PowerEMA

SNAPSHOT_DIR = "snapshots"


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class Progress(Protocol):
    def start(self, total: int, completed: int) -> None: ...
    def advance(self, step: int, loss: float, images_per_s: float) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    run_dir: Path
    step: int
    checkpoint: Path
    samples: Path | None


def step_seed(seed: int, step: int) -> int:
    """Seed of every random draw made in training step `step` (1-based)."""
    return (seed * 1_000_003 + step) % (2**63)


class EpochOrder:
    """Shuffled passes over the dataset; the batch of step k depends only on (seed, k)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(step_seed(self.seed, -1 - epoch))
            self._perm = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        positions = torch.arange((step - 1) * batch_size, step * batch_size)
        epochs = positions // self.size
        out = torch.empty(batch_size, dtype=torch.long)
        for epoch in torch.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[positions[mask] % self.size]
        return out


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
        if stored.is_file():
            from dmstab.recipe import load_recipe

            changed = differences(load_recipe(stored), recipe)
            detail = ": " + "; ".join(changed[:5])
        raise DmstabError(f"recipe differs from the one run {resume} was started with{detail}")
    return resume


class Trainer:
    """The objects a recipe builds, and one training step over them."""

    def __init__(self, recipe: Recipe, device: torch.device) -> None:
        self.recipe = recipe
        self.device = device
        self.dataset: ImageDataset = build_dataset(recipe.data)
        if recipe.model.class_cond and self.dataset.num_classes < 1:
            raise DmstabError("model.class_cond is true but the dataset has no labels")
        torch.manual_seed(recipe.train.seed)
        self.model: nn.Module = build_model(recipe, self.dataset.num_classes).to(device)
        self.objective = build_objective(recipe, self.dataset.num_classes)
        self.optimizer = build_optimizer(self.model, recipe.optim)
        self.ema = EMA(self.model, recipe.ema.rate, recipe.ema.warmup)
        sigma_rels = recipe.ema.power_sigma_rels
        self.power_ema = PowerEMA(self.model, sigma_rels) if sigma_rels else None
        self.order = EpochOrder(len(self.dataset), recipe.train.seed)
        self.step = 0

    def state_dict(self, run_id: str) -> dict[str, object]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "power_ema": self.power_ema.state_dict() if self.power_ema else None,
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "step": self.step,
            "recipe": to_dict(self.recipe),
            "num_classes": self.dataset.num_classes,
            "run_id": run_id,
            "dmstab_version": __version__,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        model, ema, optimizer, step = (state[k] for k in ("model", "ema", "optimizer", "step"))
        if not (isinstance(model, dict) and isinstance(ema, dict) and isinstance(optimizer, dict)):
            raise DmstabError("checkpoint is missing model/ema/optimizer state")
        if not isinstance(step, int):
            raise DmstabError("checkpoint has no integer 'step'")
        try:
            self.model.load_state_dict(model)
        except RuntimeError as exc:
            raise DmstabError(f"checkpoint does not fit this recipe's model: {exc}") from None
        self.optimizer.load_state_dict(optimizer)
        self.ema.load_state_dict(ema)
        power_ema = state.get("power_ema")
        if self.power_ema is not None and isinstance(power_ema, dict):
            self.power_ema.load_state_dict(power_ema)
        self._load_objective_state(state.get("objective", {}))
        self.step = step

    def _load_objective_state(self, objective: object) -> None:
        """The objective's state (an importance sampler's loss history); {} in old checkpoints."""
        if not isinstance(objective, dict):
            raise DmstabError("checkpoint's 'objective' entry is not a mapping")
        try:
            self.objective.load_state_dict(objective)
        except ValueError as exc:
            raise DmstabError(f"checkpoint's objective state does not fit: {exc}") from None

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimiser step; returns detached per-step scalars (still on the device)."""
        self.step += 1
        recipe, device = self.recipe, self.device
        seed = step_seed(recipe.train.seed, self.step)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)
        indices = self.order.batch(self.step, recipe.train.batch_size)
        x0, labels = self.dataset.get_batch(indices)
        if recipe.data.hflip:
            flip = torch.rand(len(indices), generator=generator) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise_generator = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn(x0.shape, generator=noise_generator, device=device)
        x0 = x0.to(device, non_blocking=True)
        y = labels.to(device) if recipe.model.class_cond else None

        lr = learning_rate(recipe.optim, self.step, recipe.train.batch_size)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, recipe.train.precision):
            terms = self.objective.losses(self.model, x0, y, noise, generator, self.step)
        loss = terms["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        clip = recipe.optim.grad_clip if recipe.optim.grad_clip is not None else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.ema.update(self.model)
        if self.power_ema is not None:
            self.power_ema.update(self.model, self.step)
        out = {"loss": loss.detach(), "grad_norm": grad_norm.detach()}
        out.update({k: v.detach().mean() for k, v in terms.items() if k != "loss"})
        return out

    def ema_model(self) -> nn.Module:
        """A copy of the network carrying the EMA weights."""
        model = copy.deepcopy(self.model)
        model.load_state_dict({k: v.to(self.device) for k, v in self.ema.shadow.items()})
        return model


def _log_timestep_histogram(objective: DDPMObjective, step: int, tracker: Tracker) -> None:
    title = f"timesteps ({objective.sampler_name})"
    probabilities = objective.timesteps.probabilities(step)
    figure = timestep_histogram(objective.timestep_counts, probabilities, step, title)
    save_figure(tracker, figure, f"timesteps/step_{step:08d}.png")
    objective.timestep_counts.zero_()


def _sample_and_log(
    trainer: Trainer, tracker: Tracker, run_dir: Path, on_sample: Callable[[int, int], None] | None
) -> Path:
    model = trainer.ema_model() if trainer.recipe.sample.use_ema else trainer.model
    images = generate_for_recipe(
        model,
        trainer.recipe,
        dataset_classes=trainer.dataset.num_classes,
        device=trainer.device,
        callback=on_sample,
        preview_latents_without_vae=True,  # the optional VAE never fails a training run
    )
    npz, grid = write_samples(images, run_dir / "samples", f"step_{trainer.step:08d}")
    tracker.log_artifact(grid, "samples")
    tracker.log_artifact(npz, "samples")
    return grid


def _snapshot_due(trainer: Trainer, step: int) -> bool:
    """At the end, and whenever the image count crosses a multiple of `ema.snapshot_every`."""
    if trainer.power_ema is None:
        return False
    every, batch = trainer.recipe.ema.snapshot_every, trainer.recipe.train.batch_size
    crossed = bool(every) and (step * batch) // every > ((step - 1) * batch) // every
    return crossed or step == trainer.recipe.train.total_steps


def _save_snapshots(trainer: Trainer, run_dir: Path) -> None:
    assert trainer.power_ema is not None
    dtype = SNAPSHOT_DTYPES[trainer.recipe.ema.snapshot_dtype]
    trainer.power_ema.save_snapshots(run_dir / SNAPSHOT_DIR, dtype)


def _save(trainer: Trainer, run_id: str, path: Path) -> None:
    """Checkpoint only a finite model: a diverged step must not replace the last good one."""
    if not all(torch.isfinite(p).all() for p in trainer.model.parameters()):
        raise TrainingDiverged(
            f"weights are not finite at step {trainer.step}; last good checkpoint: {path}"
        )
    save_checkpoint(trainer.state_dict(run_id), path)


def _magnitude_monitor(trainer: Trainer, tracker: Tracker) -> MagnitudeMonitor | None:
    """EDM2 Fig. 3 magnitudes every `train.magnitudes_every` steps, from step 0 of a new run."""
    if not trainer.recipe.train.magnitudes_every:
        return None
    monitor = MagnitudeMonitor(trainer.model, trainer.recipe, trainer.dataset, trainer.device)
    if trainer.step == 0:
        tracker.log_metrics(monitor.measure(0), 0)
    return monitor


def train(
    recipe: Recipe,
    *,
    resume: str | None = None,
    progress: Progress | None = None,
    on_sample: Callable[[int, int], None] | None = None,
    parent_run_id: str | None = None,
) -> TrainResult:
    """Run (or resume) a training run, a child of `parent_run_id` when given; all to MLflow."""
    device = pick_device(recipe.train.device)
    resume_run_id = _resolve_resume(recipe, resume)
    trainer = Trainer(recipe, device)  # bad data or model settings fail before a run exists
    evaluator = build_evaluator(recipe, num_classes=trainer.dataset.num_classes, device=device)
    tracker = MlflowTracker.start(
        recipe, kind="train", resume_run_id=resume_run_id, parent_run_id=parent_run_id
    )
    assert tracker.run_id is not None
    run_id = tracker.run_id
    with tracked_run(tracker):
        run_dir = (Path(recipe.train.out_dir) / run_id).resolve()
        checkpoint = run_dir / CHECKPOINT_NAME
        if resume_run_id is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
            tracker.set_tags({TAG_RUN_DIR: str(run_dir)})
        if resume_run_id is not None and checkpoint.is_file():
            state = load_checkpoint(checkpoint)
            if from_mapping(state["recipe"]) != recipe:
                raise DmstabError(f"checkpoint {checkpoint} belongs to a different recipe")
            trainer.load_state_dict(state)
        if trainer.step == 0:
            tracker.log_metrics({"model/parameters": count_parameters(trainer.model)}, 0)
        samples = _run_steps(trainer, tracker, run_id, checkpoint, progress, on_sample, evaluator)
    return TrainResult(run_id, run_dir, trainer.step, checkpoint, samples)


def _run_steps(
    trainer: Trainer,
    tracker: Tracker,
    run_id: str,
    checkpoint: Path,
    progress: Progress | None,
    on_sample: Callable[[int, int], None] | None,
    evaluator: Evaluator | None,
) -> Path | None:
    cfg = trainer.recipe.train
    total = cfg.total_steps
    run_dir = checkpoint.parent
    if progress:
        progress.start(total, trainer.step)
    window: dict[str, float] = {}
    window_steps, window_start = 0, time.perf_counter()
    magnitudes = _magnitude_monitor(trainer, tracker)
    try:
        while trainer.step < total:
            scalars = trainer.train_step()
            window_steps += 1
            for key, value in scalars.items():
                window[key] = window.get(key, 0.0) + float(value)
            step = trainer.step
            if step % cfg.log_every == 0 or step == total:
                metrics = {k: v / window_steps for k, v in window.items()}
                if not all(map(torch.isfinite, torch.tensor(list(metrics.values())))):
                    raise TrainingDiverged(
                        f"loss is not finite at step {step} (loss={metrics['loss']}); "
                        f"last good checkpoint: {checkpoint}"
                    )
                elapsed = time.perf_counter() - window_start
                metrics["images_per_s"] = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                metrics["lr"] = trainer.optimizer.param_groups[0]["lr"]
                metrics["kimg"] = step * cfg.batch_size / 1000
                metrics.update(trainer.objective.metrics(step))
                tracker.log_metrics(metrics, step)
                if progress:
                    progress.advance(step, metrics["loss"], metrics["images_per_s"])
                window.clear()
                window_steps, window_start = 0, time.perf_counter()
            if magnitudes is not None and step % cfg.magnitudes_every == 0:
                tracker.log_metrics(magnitudes.measure(step), step)
            every = trainer.recipe.timesteps.histogram_every
            if isinstance(trainer.objective, DDPMObjective) and every and step % every == 0:
                _log_timestep_histogram(trainer.objective, step, tracker)
            if _snapshot_due(trainer, step):
                _save_snapshots(trainer, run_dir)
            if step % cfg.checkpoint_every == 0 or step == total:
                tracker.flush()
                _save(trainer, run_id, checkpoint)
            if evaluator is not None and evaluator.due(step):
                model = trainer.ema_model() if trainer.recipe.eval.use_ema else trainer.model
                tracker.log_metrics(evaluator.evaluate(model), step)
            if cfg.sample_every and step % cfg.sample_every == 0 and step != total:
                _sample_and_log(trainer, tracker, run_dir, on_sample)
    finally:
        if progress:
            progress.stop()
    if magnitudes is not None and magnitudes.history:
        save_figure(tracker, magnitudes.figure(), MAGNITUDES_ARTIFACT)
    samples = _sample_and_log(trainer, tracker, run_dir, on_sample)
    tracker.log_artifact(checkpoint, "checkpoints")
    return samples
