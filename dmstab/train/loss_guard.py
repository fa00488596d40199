"""What a training step with a non-finite or spiking loss does: stop the run, or skip the update.

The guard sees each step's global mean loss (the same number on every rank) before the
optimiser step and answers whether to apply the update. A skipped step changes no weights,
optimiser state or EMA; the step counter still advances, so later steps draw the same data and
noise as in a run without the skip. A spike is a loss above `spike_factor` times the mean of
the last `spike_window` accepted losses, judged once that many have been accepted.

The verdict is a boolean tensor on the loss's device (`judge`), so a step never waits for the
device: the window of accepted losses, the skip counts and a sticky `stopped` flag live there
too. A `stop` verdict (the `stop` policy, or the `max_skipped`-th consecutive skip) sets the
flag, which also masks every later update; the loop asks `raise_if_stopped` at its host points
(every `train.log_every` steps and before anything is written or measured), which raises
TrainingDiverged naming the step and loss that stopped the run (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmstab.config import TrainConfig
from dmstab.errors import DmstabError

_NONFINITE, _SPIKE = 1, 2  # what stopped the run: `_cause`


class TrainingDiverged(Exception):
    """The loss became NaN, infinite or spiked past the policy; the last good checkpoint stays."""


class LossGuard:
    """The `train.nonfinite` / `train.spike_*` / `train.max_skipped` policy and its state."""

    def __init__(self, config: TrainConfig) -> None:
        self.stop_on_nonfinite = config.nonfinite == "stop"
        self.spike_factor = config.spike_factor
        self.stop_on_spike = config.spike_policy == "stop"
        self.max_skipped = config.max_skipped
        self.window_size = config.spike_window
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (step, skipped, total) unread
        self._allocate(torch.device("cpu"))

    def _allocate(self, device: torch.device) -> None:
        """Fresh state on `device`: an empty window, no skips, not stopped."""
        self.device = device
        zero = torch.zeros((), dtype=torch.long, device=device)
        self._window = torch.zeros(self.window_size, dtype=torch.float64, device=device)
        self._slots = torch.arange(self.window_size, device=device)
        self._filled, self._position = zero.clone(), zero.clone()  # the ring buffer's fill, head
        self._consecutive, self._total = zero.clone(), zero.clone()
        self._stopped = torch.zeros((), dtype=torch.bool, device=device)
        self._cause, self._stop_step, self._stop_count = zero.clone(), zero.clone(), zero.clone()
        self._stop_loss = torch.zeros((), dtype=torch.float64, device=device)
        self._stop_threshold = torch.zeros((), dtype=torch.float64, device=device)
        self.last_accept = torch.ones((), dtype=torch.bool, device=device)

    def _to(self, device: torch.device) -> None:
        if device != self.device:
            state = self.state_dict()
            self._allocate(device)
            self.load_state_dict(state)

    def judge(self, step: int, loss: Tensor) -> Tensor:
        """Step `step`'s verdict on its mean loss, as a boolean tensor on the loss's device:
        True applies the update. Never reads the loss on the host."""
        self._to(loss.device)
        loss64 = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss64)
        # Spike threshold (factor × window mean), judged only on a full window.
        threshold = self.spike_factor * self._window.sum() / max(self.window_size, 1)
        watching = self.spike_factor != 0
        spike = finite & (self._filled >= self.window_size) & (loss64 > threshold) & watching
        bad = ~finite | spike
        running = ~self._stopped
        accept = ~bad & running
        stop_now = running & ((~finite & self.stop_on_nonfinite) | (spike & self.stop_on_spike))
        skip = running & bad & ~stop_now
        self._consecutive = torch.where(skip, self._consecutive + 1, self._consecutive * ~accept)
        self._total += skip
        too_many = skip & (self._consecutive >= self.max_skipped)
        newly = stop_now | too_many
        self._cause = torch.where(newly, torch.where(finite, _SPIKE, _NONFINITE), self._cause)
        self._stop_step = torch.where(newly, step, self._stop_step)
        self._stop_count = torch.where(newly, self._consecutive * too_many, self._stop_count)
        self._stop_loss = torch.where(newly, loss64, self._stop_loss)
        self._stop_threshold = torch.where(newly, threshold, self._stop_threshold)
        self._stopped |= newly
        # Append an accepted loss at the ring's head (the oldest entry once full).
        at_head = accept & (self._slots == self._position)
        self._window = torch.where(at_head, loss64, self._window)
        self._position = (self._position + accept) % max(self.window_size, 1)
        self._filled = torch.clamp(self._filled + accept, max=self.window_size)
        self.last_accept = accept
        self._pending.append((step, skip & ~too_many, self._total.clone()))  # a stop: not logged
        return accept

    def raise_if_stopped(self) -> None:
        """Host point: raise TrainingDiverged if a step since the start stopped the run."""
        if not bool(self._stopped):
            return
        step, loss = int(self._stop_step), float(self._stop_loss)
        if int(self._cause) == _NONFINITE:
            reason = f"loss is not finite at step {step} ({loss})"
        else:
            reason = f"loss spike at step {step}: {loss:.4g} > {float(self._stop_threshold):.4g}"
        count = int(self._stop_count)
        if count:
            reason = f"{reason}; {count} consecutive steps skipped (train.max_skipped)"
        raise TrainingDiverged(reason)

    def read_skipped(self) -> list[tuple[int, int]]:
        """Host point: (step, skips so far) of every step skipped since the last read."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        flags = torch.stack([torch.stack([skip.long(), total]) for _, skip, total in pending])
        steps = [step for step, _, _ in pending]
        rows = zip(steps, flags.tolist(), strict=True)
        return [(step, total) for step, (skipped, total) in rows if skipped]

    @property
    def skipping(self) -> bool:
        """Whether the last step judged was skipped (a host read)."""
        return bool(self._consecutive > 0)

    @property
    def total_skipped(self) -> int:
        return int(self._total)

    def window(self) -> list[float]:
        """The accepted losses the spike baseline averages, oldest first (a host read)."""
        filled, position = int(self._filled), int(self._position)
        if filled < self.window_size:
            return self._window[:filled].tolist()
        return self._window.roll(-position).tolist()

    def state_dict(self) -> dict[str, object]:
        return {
            "window": self.window(),
            "consecutive": int(self._consecutive),
            "total_skipped": self.total_skipped,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        keys = ("window", "consecutive", "total_skipped")
        window, consecutive, total = (state.get(k) for k in keys)
        if not (
            isinstance(window, list)
            and all(isinstance(v, float) for v in window)
            and isinstance(consecutive, int)
            and isinstance(total, int)
        ):
            raise DmstabError("checkpoint's loss-guard state is malformed")
        kept = window[len(window) - self.window_size :] if self.window_size else []
        self._window.zero_()
        self._window[: len(kept)] = torch.tensor(kept, dtype=torch.float64)
        self._filled.fill_(len(kept))
        self._position.fill_(len(kept) % max(self.window_size, 1))
        self._consecutive.fill_(consecutive)
        self._total.fill_(total)
