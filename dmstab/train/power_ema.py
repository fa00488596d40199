"""Power-function EMA of the weights during training (EDM2 Sec. 3.1).

The average at training step t weights the parameters of step τ by the profile
p(τ) = (γ+1) τ^γ / t^(γ+1) on (0, t] (EDM2 Eq. 1). Updating after every step with
β(t) = (1 − 1/t)^(γ+1) (Eq. 2) gives step s the weight (s^(γ+1) − (s−1)^(γ+1)) / t^(γ+1):
exactly the profile's integral over (s−1, s]. Updating only every N steps distorts the
profile (every 100 steps turns σrel 0.10 into an effective 0.18–0.30), so `PowerEMA.update`
refuses to skip a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dmstab.analysis.ema_profiles import (
    SnapshotInfo,
    cast_floating,
    save_snapshot,
    sigma_rel_to_gamma,
    sigma_tag,
)
from dmstab.errors import DmstabError


def power_beta(step: int, gamma: float, delta: int = 1) -> float:
    """β = (1 − Δ/t)^(γ+1): the decay at step t of an average updated every Δ steps (Eq. 2)."""
    if not 1 <= delta <= step:
        raise ValueError(f"power_beta needs 1 <= delta <= step; got delta={delta}, step={step}")
    return float((1.0 - delta / step) ** (gamma + 1.0))


def _float32_copy(value: torch.Tensor) -> torch.Tensor:
    copy = value.detach().clone()
    return copy.float() if copy.is_floating_point() else copy


class PowerEMA:
    """Power-function EMAs of a model's state (float32 shadows), one per σrel."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]) -> None:
        if not sigma_rels or len({sigma_tag(s) for s in sigma_rels}) != len(sigma_rels):
            raise DmstabError(
                f"EMA sigma_rels are {list(sigma_rels)}; need one or more, distinct to 4 decimals"
            )
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.step = 0
        state = model.state_dict()
        self.shadows = [{k: _float32_copy(v) for k, v in state.items()} for _ in self.sigma_rels]
        self._floating_keys = [k for k, v in state.items() if v.is_floating_point()]
        self._other_keys = [k for k, v in state.items() if not v.is_floating_point()]

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
            for key in self._other_keys:  # integer buffers (step counters): the latest value
                shadow[key].copy_(state[key])
        self.step = step

    def snapshot(self, index: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """CPU copy of EMA number `index`, floating tensors in `dtype`."""
        return cast_floating(self.shadows[index], dtype)

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
