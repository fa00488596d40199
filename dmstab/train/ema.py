"""Exponential moving average of the weights (improved-diffusion's EMA, rate 0.9999)."""

from __future__ import annotations

import torch
from torch import nn

from dmstab.errors import DmstabError


class EMA:
    """θ̂ ← r·θ̂ + (1−r)·θ after every optimiser step, kept in float32.

    With `warmup`, r = min(rate, (1+n)/(10+n)) after n updates, so early averages are
    not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool) -> None:
        self.rate = rate
        self.warmup = warmup
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def current_rate(self) -> float:
        if not self.warmup:
            return self.rate
        return min(self.rate, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        rate = self.current_rate()
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if value.dtype.is_floating_point:
                shadow.lerp_(value.detach().float(), 1.0 - rate)
            else:
                shadow.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, object]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow, updates = state.get("shadow"), state.get("updates")
        if not (isinstance(shadow, dict) and isinstance(updates, int)):
            raise DmstabError("checkpoint's EMA state is malformed (needs 'shadow' and 'updates')")
        if shadow.keys() != self.shadow.keys():
            raise DmstabError("checkpoint's EMA weights do not fit this recipe's model")
        self.shadow = shadow
        self.updates = updates
