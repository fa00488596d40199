"""Power-function EMA profiles (EDM2 Sec. 3.1) and the snapshot files that store them.

A profile p(τ) = (γ+1) τ^γ / t^(γ+1) on (0, t] (EDM2 Eq. 1) is named by its exponent γ or its
relative width σrel; a snapshot file holds the average at one step t for one σrel. Training
writes them (dmstab.train.power_ema); `dmstab.analysis.ema_reconstruct` reads them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmstab.atomic import write_atomically
from dmstab.checkpoint import load_checkpoint, save_checkpoint
from dmstab.config import SIGMA_REL_MAX
from dmstab.errors import DmstabError
from dmstab.reading import not_a, read_json

SNAPSHOT_PREFIX = "phema"
SNAPSHOT_KIND = "power-EMA snapshot"
SNAPSHOT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def gamma_to_sigma_rel(gamma: float) -> float:
    """σrel = (γ+1)^½ (γ+2)^−1 (γ+3)^−½, the profile's relative width (EDM2 Sec. 3.1)."""
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise DmstabError(f"EMA exponent gamma is {gamma}; must be a finite number >= 0")
    return math.sqrt(gamma + 1.0) / (gamma + 2.0) / math.sqrt(gamma + 3.0)


def check_sigma_rel(sigma_rel: float) -> None:
    """σrel is a power profile's relative width: in (0, σrel(γ=0)] (EDM2 Sec. 3.1)."""
    if not (0.0 < sigma_rel <= SIGMA_REL_MAX):
        raise DmstabError(
            f"EMA sigma_rel is {sigma_rel}; must be in (0, {SIGMA_REL_MAX:.6f}] "
            "(the relative width of the averaging profile)"
        )


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The γ ≥ 0 whose profile has relative width `sigma_rel` (largest root of the cubic).

    σrel(γ) falls monotonically on [0, ∞) and σrel(1/σ) < σ, so the root is bracketed
    by [0, 1/σrel].
    """
    check_sigma_rel(sigma_rel)
    if sigma_rel == SIGMA_REL_MAX:
        return 0.0
    from scipy.optimize import brentq  # here: scipy.optimize takes a second to import

    root = brentq(lambda g: gamma_to_sigma_rel(g) - sigma_rel, 0.0, 1.0 / sigma_rel, xtol=1e-13)
    return float(root)


def cast_floating(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached CPU copies, floating tensors in `dtype`, integer buffers unchanged."""
    return {
        key: value.detach().to(
            "cpu", dtype=dtype if value.is_floating_point() else value.dtype, copy=True
        )
        for key, value in weights.items()
    }


@dataclass(frozen=True)
class SnapshotInfo:
    """Where one saved EMA lies and which profile it holds (step t, σrel, γ)."""

    path: Path
    step: int
    sigma_rel: float
    gamma: float
    dtype: str


def sigma_tag(sigma_rel: float) -> str:
    return f"{sigma_rel:.4f}"


def snapshot_path(directory: Path, step: int, sigma_rel: float) -> Path:
    return directory / f"{SNAPSHOT_PREFIX}-{step:010d}-{sigma_tag(sigma_rel)}.pt"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in SNAPSHOT_DTYPES.items():
        if candidate == dtype:
            return name
    raise DmstabError(f"snapshot dtype is {dtype}; allowed: {', '.join(SNAPSHOT_DTYPES)}")


def save_snapshot(
    weights: dict[str, torch.Tensor],
    step: int,
    sigma_rel: float,
    gamma: float,
    directory: Path,
    dtype: torch.dtype,
) -> SnapshotInfo:
    """Write `weights` atomically as a weights-only file, with a JSON sidecar of its metadata."""
    if abs(gamma_to_sigma_rel(gamma) - sigma_rel) > 1e-9 * sigma_rel:
        raise ValueError(f"gamma {gamma} does not belong to sigma_rel {sigma_rel}")
    info = SnapshotInfo(
        snapshot_path(directory, step, sigma_rel), step, sigma_rel, gamma, _dtype_name(dtype)
    )
    metadata = {"step": step, "sigma_rel": sigma_rel, "gamma": gamma, "dtype": info.dtype}
    save_checkpoint({"model": cast_floating(weights, dtype), **metadata}, info.path)
    # The sidecar comes second: a listed snapshot always has its complete weights file.
    sidecar = json.dumps(metadata, indent=1).encode()
    write_atomically(info.path.with_suffix(".json"), lambda handle: handle.write(sidecar))
    return info


def _info_from_metadata(metadata: dict[str, Any], path: Path, source: Path) -> SnapshotInfo:
    step, sigma_rel, gamma, dtype = (
        metadata.get(k) for k in ("step", "sigma_rel", "gamma", "dtype")
    )
    if not (
        isinstance(step, int)
        and isinstance(sigma_rel, float)
        and isinstance(gamma, float)
        and dtype in SNAPSHOT_DTYPES
    ):
        raise not_a(source, SNAPSHOT_KIND, "no integer step, float sigma_rel and gamma, dtype")
    return SnapshotInfo(path, step, sigma_rel, gamma, dtype)


def list_snapshots(directory: Path) -> list[SnapshotInfo]:
    """Every snapshot in `directory` (read from the sidecars), sorted by step then σrel."""
    if not directory.is_dir():
        raise DmstabError(f"snapshot directory not found: {directory}")
    found = []
    for sidecar in directory.glob(f"{SNAPSHOT_PREFIX}-*.json"):
        metadata = read_json(sidecar, "snapshot sidecar")
        if not isinstance(metadata, dict):
            raise not_a(sidecar, "snapshot sidecar", "not a JSON object")
        info = _info_from_metadata(metadata, sidecar.with_suffix(".pt"), sidecar)
        if not info.path.is_file():
            raise DmstabError(f"snapshot {info.path} is missing (its sidecar {sidecar} exists)")
        found.append(info)
    return sorted(found, key=lambda info: (info.step, info.sigma_rel))


def load_snapshot(
    path: Path, *, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], SnapshotInfo]:
    """Weights and metadata of one snapshot file, loaded weights-only (`mmap`: mapped, not read)."""
    state = load_checkpoint(path, SNAPSHOT_KIND, mmap=mmap)
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise not_a(path, SNAPSHOT_KIND, "no tensor dictionary under 'model'")
    return weights, _info_from_metadata(state, path, path)
