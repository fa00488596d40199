"""Power-function EMA of the weights (EDM2 Sec. 3.1) and its snapshot files.

The average at training step t weights the parameters of step τ by the profile
p(τ) = (γ+1) τ^γ / t^(γ+1) on (0, t] (EDM2 Eq. 1). Updating after every step with
β(t) = (1 − 1/t)^(γ+1) (Eq. 2) gives step s the weight (s^(γ+1) − (s−1)^(γ+1)) / t^(γ+1):
exactly the profile's integral over (s−1, s]. Updating only every N steps distorts the
profile (FACTS), so `PowerEMA.update` refuses to skip a step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import brentq
from torch import nn

from dmstab.atomic import write_atomically
from dmstab.errors import DmstabError
from dmstab.train.checkpoint import load_checkpoint, save_checkpoint

SNAPSHOT_PREFIX = "phema"
SNAPSHOT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def gamma_to_sigma_rel(gamma: float) -> float:
    """σrel = (γ+1)^½ (γ+2)^−1 (γ+3)^−½, the profile's relative width (EDM2 Sec. 3.1)."""
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise DmstabError(f"EMA exponent gamma is {gamma}; must be a finite number >= 0")
    return math.sqrt(gamma + 1.0) / (gamma + 2.0) / math.sqrt(gamma + 3.0)


SIGMA_REL_MAX = gamma_to_sigma_rel(0.0)  # 1/√12 ≈ 0.288675: the uniform average


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The γ ≥ 0 whose profile has relative width `sigma_rel` (largest root of the cubic).

    σrel(γ) falls monotonically on [0, ∞) and σrel(1/σ) < σ, so the root is bracketed
    by [0, 1/σrel].
    """
    if not (0.0 < sigma_rel <= SIGMA_REL_MAX):
        raise DmstabError(
            f"EMA sigma_rel is {sigma_rel}; must be in (0, {SIGMA_REL_MAX:.6f}] "
            "(the relative width of the averaging profile)"
        )
    if sigma_rel == SIGMA_REL_MAX:
        return 0.0
    root = brentq(lambda g: gamma_to_sigma_rel(g) - sigma_rel, 0.0, 1.0 / sigma_rel, xtol=1e-13)
    return float(root)


def power_beta(step: int, gamma: float, delta: int = 1) -> float:
    """β = (1 − Δ/t)^(γ+1): the decay at step t of an average updated every Δ steps (Eq. 2)."""
    if not 1 <= delta <= step:
        raise ValueError(f"power_beta needs 1 <= delta <= step; got delta={delta}, step={step}")
    return float((1.0 - delta / step) ** (gamma + 1.0))


def _cast_floating(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached CPU copies, floating tensors in `dtype`, integer buffers unchanged."""
    return {
        key: value.detach().to(
            "cpu", dtype=dtype if value.is_floating_point() else value.dtype, copy=True
        )
        for key, value in weights.items()
    }


def _float32_copy(value: torch.Tensor) -> torch.Tensor:
    copy = value.detach().clone()
    return copy.float() if copy.is_floating_point() else copy


class PowerEMA:
    """Power-function EMAs of a model's state (float32 shadows), one per σrel."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]) -> None:
        if not sigma_rels or len({_sigma_tag(s) for s in sigma_rels}) != len(sigma_rels):
            raise DmstabError(
                f"EMA sigma_rels are {list(sigma_rels)}; need one or more, distinct to 4 decimals"
            )
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.step = 0
        state = model.state_dict()
        self.shadows = [{k: _float32_copy(v) for k, v in state.items()} for _ in self.sigma_rels]
        self._floating_keys = [k for k, v in state.items() if v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimiser step `step`; must be called for every step."""
        if step != self.step + 1:
            raise ValueError(
                f"PowerEMA.update got step {step} after step {self.step}; call it after every "
                "optimiser step (sparser updates distort the profile)"
            )
        state = model.state_dict()
        current = [state[k].detach().float() for k in self._floating_keys]
        for gamma, shadow in zip(self.gammas, self.shadows, strict=True):
            averaged = [shadow[k] for k in self._floating_keys]
            torch._foreach_lerp_(averaged, current, 1.0 - power_beta(step, gamma))
            for key, value in state.items():
                if not value.is_floating_point():
                    shadow[key].copy_(value)
        self.step = step

    def snapshot(self, index: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """CPU copy of EMA number `index`, floating tensors in `dtype`."""
        return _cast_floating(self.shadows[index], dtype)

    def save_snapshots(self, directory: Path, dtype: torch.dtype) -> list[SnapshotInfo]:
        """Write every EMA at the current step as a snapshot file in `directory`."""
        return [
            save_snapshot(shadow, self.step, sigma_rel, gamma, directory, dtype)
            for shadow, sigma_rel, gamma in zip(
                self.shadows, self.sigma_rels, self.gammas, strict=True
            )
        ]

    def state_dict(self) -> dict[str, object]:
        return {"sigma_rels": list(self.sigma_rels), "step": self.step, "shadows": self.shadows}

    def load_state_dict(self, state: dict[str, object]) -> None:
        sigma_rels, step, shadows = (state.get(k) for k in ("sigma_rels", "step", "shadows"))
        if sigma_rels != list(self.sigma_rels):
            raise DmstabError(
                f"checkpoint tracks power EMAs with sigma_rel {sigma_rels}; "
                f"this run asks for {list(self.sigma_rels)}"
            )
        if not isinstance(step, int) or not isinstance(shadows, list):
            raise DmstabError("checkpoint's power EMA state has no integer 'step' or 'shadows'")
        for mine, stored in zip(self.shadows, shadows, strict=True):
            if not isinstance(stored, dict) or stored.keys() != mine.keys():
                raise DmstabError("checkpoint's power EMA weights do not fit this model")
            for key, value in stored.items():
                mine[key].copy_(value)
        self.step = step


@dataclass(frozen=True)
class SnapshotInfo:
    """Where one saved EMA lies and which profile it holds (step t, σrel, γ)."""

    path: Path
    step: int
    sigma_rel: float
    gamma: float
    dtype: str


def _sigma_tag(sigma_rel: float) -> str:
    return f"{sigma_rel:.4f}"


def snapshot_path(directory: Path, step: int, sigma_rel: float) -> Path:
    return directory / f"{SNAPSHOT_PREFIX}-{step:010d}-{_sigma_tag(sigma_rel)}.pt"


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
    save_checkpoint({"model": _cast_floating(weights, dtype), **metadata}, info.path)
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
        raise DmstabError(f"{source} is not a power-EMA snapshot (step/sigma_rel/gamma/dtype)")
    return SnapshotInfo(path, step, sigma_rel, gamma, dtype)


def list_snapshots(directory: Path) -> list[SnapshotInfo]:
    """Every snapshot in `directory` (read from the sidecars), sorted by step then σrel."""
    if not directory.is_dir():
        raise DmstabError(f"snapshot directory not found: {directory}")
    found = []
    for sidecar in directory.glob(f"{SNAPSHOT_PREFIX}-*.json"):
        try:
            metadata = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DmstabError(f"snapshot sidecar {sidecar} is corrupt (not JSON)") from None
        if not isinstance(metadata, dict):
            raise DmstabError(f"snapshot sidecar {sidecar} is corrupt (not a JSON object)")
        info = _info_from_metadata(metadata, sidecar.with_suffix(".pt"), sidecar)
        if not info.path.is_file():
            raise DmstabError(f"snapshot {info.path} is missing (its sidecar {sidecar} exists)")
        found.append(info)
    return sorted(found, key=lambda info: (info.step, info.sigma_rel))


def load_snapshot(path: Path) -> tuple[dict[str, torch.Tensor], SnapshotInfo]:
    """Weights and metadata of one snapshot file, loaded weights-only."""
    state = load_checkpoint(path)
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise DmstabError(f"snapshot {path} holds no tensor dictionary under 'model'")
    return weights, _info_from_metadata(state, path, path)
