"""What a training step with a non-finite or spiking loss does: stop the run, or skip the update.

The guard sees each step's global mean loss (the same number on every rank) before the
optimiser step and answers whether to apply the update. A skipped step changes no weights,
optimiser state or EMA; the step counter still advances, so later steps draw the same data and
noise as in a run without the skip. A spike is a loss above `spike_factor` times the mean of
the last `spike_window` accepted losses, judged once that many have been accepted.
"""

from __future__ import annotations

import math
from collections import deque

from dmstab.config import TrainConfig
from dmstab.errors import DmstabError


class TrainingDiverged(Exception):
    """The loss became NaN, infinite or spiked past the policy; the last good checkpoint stays."""


class LossGuard:
    """The `train.nonfinite` / `train.spike_*` / `train.max_skipped` policy and its state."""

    def __init__(self, config: TrainConfig) -> None:
        self.nonfinite = config.nonfinite
        self.spike_factor = config.spike_factor
        self.spike_policy = config.spike_policy
        self.max_skipped = config.max_skipped
        self.window: deque[float] = deque(maxlen=config.spike_window)
        self.consecutive = 0
        self.total_skipped = 0

    @property
    def skipping(self) -> bool:
        """Whether the last step judged was skipped."""
        return self.consecutive > 0

    def spike_threshold(self) -> float | None:
        """The loss above which a step is a spike, or None while the window is filling."""
        if self.spike_factor == 0 or len(self.window) < (self.window.maxlen or 0):
            return None
        return self.spike_factor * math.fsum(self.window) / len(self.window)

    def accept(self, step: int, loss: float) -> bool:
        """True: apply step `step`'s update; False: skip it. Raises TrainingDiverged on `stop`
        and at the `max_skipped`-th consecutive skip."""
        if not math.isfinite(loss):
            return self._reject(f"loss is not finite at step {step} ({loss})", self.nonfinite)
        threshold = self.spike_threshold()
        if threshold is not None and loss > threshold:
            reason = f"loss spike at step {step}: {loss:.4g} > {threshold:.4g}"
            return self._reject(reason, self.spike_policy)
        self.window.append(loss)
        self.consecutive = 0
        return True

    def _reject(self, reason: str, policy: str) -> bool:
        if policy == "stop":
            raise TrainingDiverged(reason)
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_skipped:
            raise TrainingDiverged(
                f"{reason}; {self.consecutive} consecutive steps skipped (train.max_skipped)"
            )
        return False

    def state_dict(self) -> dict[str, object]:
        return {
            "window": list(self.window),
            "consecutive": self.consecutive,
            "total_skipped": self.total_skipped,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        window, consecutive, total = (state.get(k) for k in self.state_dict())
        if not (
            isinstance(window, list)
            and all(isinstance(v, float) for v in window)
            and isinstance(consecutive, int)
            and isinstance(total, int)
        ):
            raise DmstabError("checkpoint's loss-guard state is malformed")
        self.window.clear()
        self.window.extend(window)
        self.consecutive = consecutive
        self.total_skipped = total
