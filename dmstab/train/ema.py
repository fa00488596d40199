"""Exponential moving average of the weights (improved-diffusion's EMA, rate 0.9999)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmstab.errors import DmstabError


class EMA:
    """θ̂ ← r·θ̂ + (1−r)·θ after every optimiser step, kept in float32.

    With `warmup`, r = min(rate, (1+n)/(10+n)) after n updates, so early averages are
    not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool) -> None:
        self.rate = rate
        self.warmup = warmup
        state = model.state_dict()
        self.shadow = {k: v.detach().float().clone() for k, v in state.items()}
        self._floating_keys = [k for k, v in state.items() if v.dtype.is_floating_point]
        self._other_keys = [k for k, v in state.items() if not v.dtype.is_floating_point]
        device = next(iter(self.shadow.values())).device
        self._updates = torch.zeros((), dtype=torch.long, device=device)  # applied updates

    @property
    def updates(self) -> int:
        """Updates applied so far (a host read)."""
        return int(self._updates)

    def _weight(self, accept: Tensor) -> Tensor:
        """The lerp weight 1 − r as float32 (rounded from float64, as a Python float would be),
        0 where `accept` is False; built on the device from scalars (no host-to-device copy)."""
        if not self.warmup:
            return torch.where(accept, 1.0 - self.rate, 0.0).to(torch.float32)
        n = self._updates.to(torch.float64)
        rate = torch.clamp((1 + n) / (10 + n), max=self.rate)
        return torch.where(accept, 1.0 - rate, 0.0).to(torch.float32)

    @torch.no_grad()
    def update(self, model: nn.Module, accept: Tensor) -> None:
        """Fold in the weights where the boolean tensor `accept` is True (a step the loss guard
        let through); else change nothing. Decided on the device, never read on the host."""
        weight = self._weight(accept)
        state = model.state_dict()
        floating = self._floating_keys
        current = [state[k].detach().float() for k in floating]
        torch._foreach_lerp_([self.shadow[k] for k in floating], current, [weight] * len(floating))
        for key in self._other_keys:  # integer buffers: the latest value of an accepted step
            self.shadow[key].copy_(torch.where(accept, state[key], self.shadow[key]))
        self._updates += accept

    def state_dict(self) -> dict[str, object]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow, updates = state.get("shadow"), state.get("updates")
        if not (isinstance(shadow, dict) and isinstance(updates, int)):
            raise DmstabError("checkpoint's EMA state is malformed (needs 'shadow' and 'updates')")
        if shadow.keys() != self.shadow.keys():
            raise DmstabError("checkpoint's EMA weights do not fit this recipe's model")
        self.shadow = shadow
        self._updates.fill_(updates)
