"""The logging window of the training loop, summed on the device.

Each step adds its scalars (mean loss terms, gradient norm) where the loss guard accepted the
step; the sums and the count of accepted steps stay on the device until the loop reads them
once per `train.log_every` steps, so logging costs one host read per window, not one per step.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor


class MetricWindow:
    """Float64 sums of a step's scalars over the accepted steps since the last `clear`."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count: Tensor | None = None
        self.started = time.perf_counter()

    def add(self, scalars: dict[str, Tensor], accept: Tensor) -> None:
        """Add `scalars` where the boolean tensor `accept` is True (a NaN of a skipped step
        adds nothing)."""
        for key, value in scalars.items():
            term = torch.where(accept, value.detach().to(torch.float64), 0.0)
            self.sums[key] = self.sums[key] + term if key in self.sums else term
        self.count = accept.long() if self.count is None else self.count + accept

    def read(self) -> tuple[int, dict[str, float]]:
        """Host point: the accepted steps in the window and the mean of each scalar over them."""
        if self.count is None:
            return 0, {}
        values = torch.stack([self.count.to(torch.float64), *self.sums.values()]).tolist()
        count = int(values[0])
        if not count:
            return 0, {}
        return count, {key: total / count for key, total in zip(self.sums, values[1:], strict=True)}

    def clear(self) -> None:
        """A new window, starting now."""
        self.sums, self.count, self.started = {}, None, time.perf_counter()
