"""`dmstab hessian`: the loss Hessian's top eigenvalues, trace and spectral density of one
trained model on a fixed batch (AAAI Fig. 4: λ1 and the variance σ² of the eigenvalues).

Every loss of `dmstab.analysis.fixed_batch` (averaged over t, and per chosen t) gets λ1..λk and
their eigenvectors by Lanczos with deflation, tr H by Hutchinson, and the eigenvalue density by
stochastic Lanczos quadrature; its mean is tr H / P and its variance the SLQ estimate of
(1/P)·tr H² − (tr H / P)². The density is also broadened on a grid as PyHessian does, the
numbers the figure draws. Everything is logged to one MLflow run of kind "hessian".

Under `torchrun` each rank takes its rows of the fixed batch and the Hessian-vector products
are summed over the ranks; every rank runs the same iterations and rank 0 logs and prints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmstab.analysis.fixed_batch import check_shardable, metric_name
from dmstab.analysis.hessian_memory import HessianMemory, hessian_memory
from dmstab.analysis.spectrum import HessianConfig, Spectrum, check_hessian, spectrum
from dmstab.atomic import write_atomically
from dmstab.commands.study import (
    AnalysisRun,
    analysis_losses,
    counted_progress,
    join_ranks,
    open_ranked_analysis,
)
from dmstab.commands.subjects import (
    Subject,
    load_subject,
    parse_inputs,
    subjects_from_arguments,
)
from dmstab.config import ANALYSES, Recipe
from dmstab.console import console, result
from dmstab.data import build_dataset
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.gan import build_discriminator, is_gan
from dmstab.plots import spectral_density_figure
from dmstab.tracking import browse_hint, save_figure

SPECTRUM_FILE = "spectrum.npz"
EIGENVECTORS_FILE = "eigenvectors.npz"
DENSITY_FILE = "density.npz"


def save_spectra(spectra: Mapping[str, Spectrum], path: Path) -> Path:
    """Raw numbers of every loss's spectrum as one .npz: `<name>/top`, `<name>/trace`
    (mean, standard error, samples), `<name>/slq_nodes` and `<name>/slq_weights`."""
    arrays: dict[str, Any] = {"names": np.array(json.dumps(list(spectra)))}
    for name, item in spectra.items():
        key = metric_name(name)
        arrays[f"{key}/top"] = np.array(item.top)
        trace = [item.trace.mean, item.trace.standard_error, item.trace.samples]
        arrays[f"{key}/trace"] = np.array(trace, dtype=np.float64)
        arrays[f"{key}/slq_nodes"] = item.density.nodes.numpy()
        arrays[f"{key}/slq_weights"] = item.density.weights.numpy()
        arrays[f"{key}/parameters"] = np.array(item.parameters)
    write_atomically(path, lambda handle: np.savez(handle, **arrays))
    return path


def save_eigenvectors(spectra: Mapping[str, Spectrum], path: Path) -> Path:
    """Every loss's top eigenpairs as one .npz: `<name>/eigenvalues` (k) and
    `<name>/eigenvectors` (k × P float32, row i the unit eigenvector of eigenvalue i, over the
    parameters in `parameter_names` order, each `parameter_shapes[j]` flattened in C order)."""
    layout = next(iter(spectra.values())).layout
    arrays: dict[str, Any] = {
        "names": np.array(json.dumps(list(spectra))),
        "parameter_names": np.array(json.dumps(list(layout))),
        "parameter_shapes": np.array(json.dumps([list(shape) for shape in layout.values()])),
    }
    for name, item in spectra.items():
        key = metric_name(name)
        arrays[f"{key}/eigenvalues"] = np.array(item.top)
        arrays[f"{key}/eigenvectors"] = item.eigenvectors.numpy()
    write_atomically(path, lambda handle: np.savez(handle, **arrays))
    return path


def save_densities(spectra: Mapping[str, Spectrum], sigma_squared: float, path: Path) -> Path:
    """Every loss's broadened density as one .npz: `sigma_squared` (the recipe's), and per loss
    `<name>/grid`, `<name>/density`, `<name>/kernel_variance` (σ²·max(1, grid range)) and the
    SLQ nodes and weights they were broadened from (runs × steps)."""
    arrays: dict[str, Any] = {
        "names": np.array(json.dumps(list(spectra))),
        "sigma_squared": np.array(sigma_squared),
    }
    for name, item in spectra.items():
        key = metric_name(name)
        arrays[f"{key}/grid"] = item.broadened.grid.numpy()
        arrays[f"{key}/density"] = item.broadened.density.numpy()
        arrays[f"{key}/kernel_variance"] = np.array(item.broadened.kernel_variance)
        arrays[f"{key}/slq_nodes"] = item.density.nodes.numpy()
        arrays[f"{key}/slq_weights"] = item.density.weights.numpy()
    write_atomically(path, lambda handle: np.savez(handle, **arrays))
    return path


@dataclass(frozen=True)
class HessianResult:
    run_id: str
    spectra: dict[str, Spectrum]
    directory: Path


def hessian(
    subject: Subject, device: torch.device, context: DistributedContext = SINGLE_PROCESS
) -> HessianResult | None:
    """The spectra of `subject`'s fixed-batch losses, logged to a new MLflow run. Under
    `context` the batch is sharded over the ranks and their products summed; rank 0 logs and
    returns the result, the others None."""
    config = subject.recipe.analysis(HessianConfig)
    shareable = partial(check_shardable, "hessian", config.batch_size, context.world_size)
    with open_ranked_analysis(subject, "hessian", context, shareable) as run:
        model, losses = analysis_losses(subject, device, config, context)
        spectra = {
            name: spectrum(
                model, loss, config, counted_progress(f"hessian {name} products", run), context
            )
            for name, loss in losses.items()
        }
        if run is None:
            return None
        _log(run, spectra, subject, config)
    return HessianResult(run.run_id, spectra, run.directory)


def _log(
    run: AnalysisRun, spectra: Mapping[str, Spectrum], subject: Subject, config: HessianConfig
) -> None:
    metrics: dict[str, float] = {
        "hessian/parameters": float(next(iter(spectra.values())).parameters)
    }
    for name, item in spectra.items():
        metrics.update(item.metrics(f"hessian/{metric_name(name)}"))
    run.tracker.log_metrics(metrics, subject.step)
    run.tracker.log_artifact(save_spectra(spectra, run.directory / SPECTRUM_FILE), "hessian")
    eigenvectors = save_eigenvectors(spectra, run.directory / EIGENVECTORS_FILE)
    run.tracker.log_artifact(eigenvectors, "hessian")
    sigma_squared = config.density_sigma_squared  # a run param too: `hessian.density_sigma_squared`
    densities = save_densities(spectra, sigma_squared, run.directory / DENSITY_FILE)
    run.tracker.log_artifact(densities, "hessian")
    figure = spectral_density_figure(
        {
            name: (item.broadened.grid.numpy(), item.broadened.density.numpy())
            for name, item in spectra.items()
        },
        f"Hessian eigenvalue density (σ² = {sigma_squared:g}), {subject.label} "
        f"(step {subject.step})",
    )
    save_figure(run.tracker, figure, "hessian/density.png")


def main(arguments: Sequence[str]) -> dict[str, Any] | None:
    """The Hessian spectrum of the one model the arguments name; the summary `--json` prints
    returned (None on torchrun's ranks other than 0)."""
    subjects = subjects_from_arguments(arguments)
    if len(subjects) != 1:
        raise DmstabError(f"dmstab hessian reads one model; got {len(subjects)}")
    subject = subjects[0]
    result = hessian(subject, *join_ranks(subject.recipe))
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    console.print(f"[green]done[/] Hessian of {subject.label} at step {subject.step}")
    for name, item in result.spectra.items():
        top = ", ".join(f"{value:.4g}" for value in item.top)
        console.print(
            f"  {name:>8}  λ1..k {top}  trace {item.trace.mean:.4g} ± "
            f"{item.trace.standard_error:.2g}  mean {item.mean:.3g}  "
            f"variance {item.density.variance():.4g}"
        )
    console.print(f"  run     {result.run_id}   (arrays: {result.directory})")
    console.print(f"  browse  {browse_hint(subject.recipe.tracking.uri)}")
    return {
        "run_id": result.run_id,
        "directory": str(result.directory),
        "model": subject.label,
        "step": subject.step,
        "spectra": {
            name: {
                "top": [float(value) for value in item.top],
                "trace": float(item.trace.mean),
                "variance": float(item.density.variance()),
            }
            for name, item in result.spectra.items()
        },
    }


def memory_plan(arguments: Sequence[str]) -> dict[str, Any]:
    """`dmstab hessian … --dry-run`: the memory estimate of the analysis the arguments ask for
    (dmstab.analysis.hessian_memory), from the networks built on the meta device. Trains,
    computes and writes nothing; a run id or checkpoint is read for its recipe and classes."""
    inputs = parse_inputs(arguments, will_write=False)
    if inputs.recipe is not None:
        recipe = inputs.recipe
        classes = build_dataset(recipe.data).num_classes if recipe.model.class_cond else 0
        label = recipe.name
    else:
        if len(inputs.sources) > 1:
            raise DmstabError(f"dmstab hessian reads one model; got {len(inputs.sources)}")
        subject = load_subject(inputs.sources[0] if inputs.sources else None, inputs.overrides)
        recipe, classes, label = subject.recipe, subject.num_classes, subject.label
    config = recipe.analysis(HessianConfig)
    memory = _estimate(recipe, classes, config)
    result(
        f"hessian memory estimate for {label}: P = {memory.parameters:,} parameters, "
        f"{_losses(recipe)} loss(es), one at a time"
    )
    for line in memory.lines():
        result(line)
    return {
        "dry_run": True,
        "parameters": memory.parameters,
        "basis_rows": memory.basis_rows,
        "device_bytes": memory.device,
        "host_bytes": memory.host,
    }


def _losses(recipe: Recipe) -> int:
    """How many spectra a run computes: the t-averaged loss and one per timestep (a GAN: one)."""
    return 1 if is_gan(recipe) else 1 + len(recipe.analysis(HessianConfig).timesteps)


def _estimate(recipe: Recipe, classes: int, config: HessianConfig) -> HessianMemory:
    """The estimate for the network the analysis moves (a GAN's other one held fixed)."""
    with torch.device("meta"):  # shapes only: a 52.5M-parameter UNet in milliseconds
        model = build_model(recipe, classes)
        if not is_gan(recipe):
            return hessian_memory(config, model, losses=_losses(recipe))
        discriminator = build_discriminator(recipe, classes)
    moving, fixed = (
        (model, discriminator) if config.network == "generator" else (discriminator, model)
    )
    return hessian_memory(config, moving, (fixed,), losses=1)


ANALYSES.register(HessianConfig.section, main, config=HessianConfig, check=check_hessian)
