"""Post-hoc EMA: any power-function profile as a linear combination of snapshots (EDM2 Sec. 3.2).

A profile (t, γ) is p(τ) = (γ+1) τ^γ / t^(γ+1) on (0, t] (EDM2 Eq. 1). The coefficients x
minimise ‖Σ_i x_i p_i − p_out‖² over τ (EDM2 App. C), i.e. solve the normal equations
G x = b with G_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p_out⟩; the same x applied to the stored
weights gives the reconstructed average.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from dmstab.analysis.ema_profiles import load_snapshot
from dmstab.analysis.progress import Progress, report
from dmstab.errors import DmstabError

FloatArray = npt.NDArray[np.float64]


def profile_inner_product(
    t_a: npt.ArrayLike, gamma_a: npt.ArrayLike, t_b: npt.ArrayLike, gamma_b: npt.ArrayLike
) -> FloatArray:
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ, broadcast over arrays.

    Integrating τ^(γa+γb) up to min(ta, tb) gives
    (γa+1)(γb+1)(ta/tb)^e / ((γa+γb+1)·max(ta, tb)), e = γb if ta < tb else −γa
    (EDM2 App. C.2).
    """
    ta, ga, tb, gb = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    exponent = np.where(ta < tb, gb, -ga)
    result: FloatArray = (
        (ga + 1) * (gb + 1) * (ta / tb) ** exponent / ((ga + gb + 1) * np.maximum(ta, tb))
    )
    return result


def _times_and_gammas(profiles: Sequence[tuple[float, float]], what: str) -> FloatArray:
    table = np.asarray(profiles, dtype=np.float64).reshape(-1, 2)
    if len(table) == 0:
        raise DmstabError(f"no {what} profiles given")
    if not (np.all(np.isfinite(table)) and np.all(table[:, 0] > 0) and np.all(table[:, 1] >= 0)):
        raise DmstabError(f"{what} profiles need step t > 0 and gamma >= 0; got {table.tolist()}")
    return table


def _relative_error(
    gram: FloatArray, cross: FloatArray, target_norm2: float, x: FloatArray
) -> float:
    """‖Σ x_i p_i − p_out‖ / ‖p_out‖, expanded in inner products."""
    residual2 = float(x @ gram @ x - 2.0 * x @ cross + target_norm2)
    return float(np.sqrt(max(residual2, 0.0) / target_norm2))


def solve_coefficients(
    snapshots: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]]
) -> tuple[FloatArray, FloatArray]:
    """Coefficients (n_snapshots, n_targets) and each target's relative profile error.

    `snapshots` and `targets` are (step t, γ) pairs. Each target uses only the snapshots
    with t ≤ t_out (the others get 0), in float64.
    """
    inputs = _times_and_gammas(snapshots, "snapshot")
    outputs = _times_and_gammas(targets, "target")
    t_in, g_in = inputs[:, :1], inputs[:, 1:]
    gram = profile_inner_product(t_in, g_in, t_in.T, g_in.T)
    cross = profile_inner_product(t_in, g_in, outputs[:, 0], outputs[:, 1])
    norms2 = profile_inner_product(outputs[:, 0], outputs[:, 1], outputs[:, 0], outputs[:, 1])
    coefficients = np.zeros((len(inputs), len(outputs)))
    errors = np.empty(len(outputs))
    for j, (t_out, _) in enumerate(outputs):
        usable = inputs[:, 0] <= t_out
        if not usable.any():
            raise DmstabError(f"no snapshot at or before step {t_out:g} to reconstruct from")
        sub_gram, sub_cross = gram[np.ix_(usable, usable)], cross[usable, j]
        # NVlabs/edm2 (reconstruct_phema.py keeps the inputs with 0 < t <= t_out, then
        # training/phema.py solve_posthoc_coefficients) solves G x = b with
        # np.linalg.solve; lstsq gives the same x and also survives a singular G (e.g. one
        # snapshot stored twice).
        x = np.linalg.lstsq(sub_gram, sub_cross, rcond=None)[0]
        # The reference then divides each output's unconstrained solution by its sum
        # (`X = X / np.sum(X, axis=0)`): a rescale after the fit, not a fit constrained to
        # sum to 1. Its error below is that of the rescaled weights.
        x = x / x.sum()
        coefficients[usable, j] = x
        errors[j] = _relative_error(sub_gram, sub_cross, float(norms2[j]), x)
    return coefficients, errors


def reconstruct(
    snapshot_paths: Sequence[Path],
    coefficients: FloatArray,
    batch: int,
    progress: Progress | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield Σ_i coefficients[i, j]·snapshot_i for each column j, in order, in float32.

    Columns are done `batch` at a time with one pass over the snapshot files each, so
    memory holds about `batch` + 1 models. Integer buffers come from the last snapshot used.
    `progress(done, total)` follows the snapshots combined, over all passes.
    """
    if coefficients.ndim != 2 or coefficients.shape[0] != len(snapshot_paths):
        raise ValueError(
            f"coefficients of shape {coefficients.shape} do not fit {len(snapshot_paths)} snapshots"
        )
    if not coefficients.any(axis=0).all():
        raise ValueError("every reconstructed output needs at least one nonzero coefficient")
    if batch < 1:
        raise DmstabError(f"reconstruction batch is {batch}; must be >= 1")
    blocks = [
        coefficients[:, start : start + batch] for start in range(0, coefficients.shape[1], batch)
    ]
    total = sum(int(block.any(axis=1).sum()) for block in blocks)  # the snapshots each pass reads
    combined = itertools.count(1)
    report(progress, 0, total)
    for block in blocks:
        yield from _combine(snapshot_paths, block, lambda: report(progress, next(combined), total))


def _combine(
    paths: Sequence[Path], columns: FloatArray, combined: Callable[[], None]
) -> list[dict[str, torch.Tensor]]:
    outputs: list[dict[str, torch.Tensor]] = []
    first: Path | None = None
    for path, row in zip(paths, columns, strict=True):
        if not row.any():
            continue  # a snapshot after t_out, or one the fit left out
        weights, _ = load_snapshot(path)
        if first is None:
            first = path
            outputs = [_zeros_like(weights) for _ in row]
        elif weights.keys() != outputs[0].keys():
            raise DmstabError(f"snapshot {path} holds other tensors than {first}")
        for output, coefficient in zip(outputs, row.tolist(), strict=True):
            for key, value in weights.items():
                if value.is_floating_point():
                    output[key].add_(value, alpha=coefficient)
                else:
                    output[key].copy_(value)
        del weights  # free it before the next file is loaded: peak stays batch + 1 models
        combined()
    return outputs


def _zeros_like(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        key: torch.zeros_like(value, dtype=torch.float32)
        if value.is_floating_point()
        else value.clone()
        for key, value in weights.items()
    }
