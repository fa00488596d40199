"""`dmstab hessian`: the loss Hessian's top eigenvalues, trace and spectral density of one
trained model on a fixed batch (AAAI Fig. 4: λ1 and the variance σ² of the eigenvalues).

Every loss of `dmstab.analysis.fixed_batch` (averaged over t, and per chosen t) gets λ1..λk by
Lanczos with deflation, tr H by Hutchinson, and the eigenvalue density by stochastic
Lanczos quadrature; its mean is tr H / P and its variance the SLQ estimate of
(1/P)·tr H² − (tr H / P)². Everything is logged to one MLflow run of kind "hessian".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmstab.analysis.fixed_batch import metric_name
from dmstab.analysis.spectrum import HessianConfig, Spectrum, check_hessian, spectrum
from dmstab.atomic import write_atomically
from dmstab.commands.study import AnalysisRun, analysis_losses, open_analysis
from dmstab.commands.subjects import Subject, subjects_from_arguments
from dmstab.config import ANALYSES
from dmstab.console import console
from dmstab.devices import pick_device
from dmstab.errors import DmstabError
from dmstab.plots import spectral_density_figure
from dmstab.tracking import browse_hint, save_figure

SPECTRUM_FILE = "spectrum.npz"


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


@dataclass(frozen=True)
class HessianResult:
    run_id: str
    spectra: dict[str, Spectrum]
    directory: Path


def hessian(subject: Subject, device: torch.device) -> HessianResult:
    """The spectra of `subject`'s fixed-batch losses, logged to a new MLflow run."""
    config = subject.recipe.analysis(HessianConfig)
    with open_analysis(subject, "hessian") as run:
        model, losses = analysis_losses(subject, device, config)
        spectra = {name: spectrum(model, loss, config) for name, loss in losses.items()}
        _log(run, spectra, subject)
    return HessianResult(run.run_id, spectra, run.directory)


def _log(run: AnalysisRun, spectra: Mapping[str, Spectrum], subject: Subject) -> None:
    metrics: dict[str, float] = {
        "hessian/parameters": float(next(iter(spectra.values())).parameters)
    }
    for name, item in spectra.items():
        metrics.update(item.metrics(f"hessian/{metric_name(name)}"))
    run.tracker.log_metrics(metrics, subject.step)
    run.tracker.log_artifact(save_spectra(spectra, run.directory / SPECTRUM_FILE), "hessian")
    figure = spectral_density_figure(
        {
            name: (item.density.nodes.numpy(), item.density.weights.numpy())
            for name, item in spectra.items()
        },
        f"Hessian eigenvalue density, {subject.label} (step {subject.step})",
    )
    save_figure(run.tracker, figure, "hessian/density.png")


def main(arguments: Sequence[str]) -> None:
    """The Hessian spectrum of the one model the arguments name."""
    subjects = subjects_from_arguments(arguments)
    if len(subjects) != 1:
        raise DmstabError(f"dmstab hessian reads one model; got {len(subjects)}")
    subject = subjects[0]
    result = hessian(subject, pick_device(subject.recipe.train.device))
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


ANALYSES.register(HessianConfig.section, main, config=HessianConfig, check=check_hessian)
