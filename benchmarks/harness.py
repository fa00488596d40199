"""Side-by-side timing: dmstab's way and a reference way of the same work, in one process.

A benchmark builds its `Side`s on the same inputs and hands them to `compare`, which runs them
interleaved (A B, then B A, ...) so that a change of load or clock hits both alike, after
`warmup` untimed rounds. Each side's peak memory is its own: the host's peak RSS is reset
before each call (Linux `/proc/self/clear_refs`), CUDA's peak statistics likewise. The result
is a `Comparison`: medians, spread, memory, MFU on a GPU, and the ratio to the baseline side,
written as JSON and shown as a table by `benchmarks/run.py`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

Size = Literal["toy", "cpu", "full"]  # tests; `nox -s bench` on a CPU; the papers' sizes on a GPU

# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs MFU is reported for, by name fragment.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass(frozen=True)
class Side:
    """One way of doing the benchmark's work: `run()` does it once and returns its output, which
    the benchmark may compare between sides. `flops` per call, when known, gives MFU on a GPU."""

    name: str
    run: Callable[[], object]
    flops: float | None = None


@dataclass
class SideResult:
    name: str
    seconds: list[float]
    peak_rss_bytes: int | None
    peak_cuda_bytes: int | None
    flops: float | None
    mfu: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """The smallest and largest timed call."""
        return min(self.seconds), max(self.seconds)


@dataclass
class Comparison:
    """`subject` (dmstab) against `baseline`: ratio = subject's median / baseline's median, so
    below 1 is faster. `target` states the goal in words; `met` whether it held (or None)."""

    benchmark: str
    title: str
    config: dict[str, Any]
    device: str
    sides: list[SideResult]
    subject: str
    baseline: str
    target: str = ""
    met: bool | None = None
    checks: dict[str, Any] = field(default_factory=dict)  # e.g. the sides' relative difference

    def side(self, name: str) -> SideResult:
        return next(side for side in self.sides if side.name == name)

    @property
    def ratio(self) -> float:
        return self.side(self.subject).median / self.side(self.baseline).median

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for side, result in zip(data["sides"], self.sides, strict=True):
            side["median_s"] = result.median
            side["min_s"], side["max_s"] = result.spread
        data["ratio"] = self.ratio
        return data


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peaks(device: torch.device) -> None:
    with contextlib.suppress(OSError):  # "5" resets the peak RSS (VmHWM) on Linux 4.0+
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when it is a GPU this table knows."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def measure(
    sides: Sequence[Side], *, device: torch.device, warmup: int, repeats: int
) -> list[SideResult]:
    """Each side `warmup` untimed then `repeats` timed calls, interleaved and alternating in
    order; per side, its call times and the peak memory over its own calls."""
    seconds: dict[str, list[float]] = {side.name: [] for side in sides}
    rss: dict[str, int | None] = {side.name: None for side in sides}
    cuda: dict[str, int | None] = {side.name: None for side in sides}
    for round_ in range(warmup + repeats):
        order = sides if round_ % 2 == 0 else list(reversed(sides))
        for side in order:
            synchronize(device)
            _reset_peaks(device)
            start = time.perf_counter()
            side.run()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_ < warmup:
                continue
            seconds[side.name].append(elapsed)
            peak = _peak_rss()
            if peak is not None:
                rss[side.name] = max(rss[side.name] or 0, peak)
            if device.type == "cuda":
                cuda[side.name] = max(cuda[side.name] or 0, torch.cuda.max_memory_allocated(device))
    peak = peak_tflops(device)
    results = []
    for side in sides:
        name = side.name
        result = SideResult(name, seconds[name], rss[name], cuda[name], side.flops)
        if peak is not None and side.flops is not None:
            result.mfu = side.flops / result.median / (peak * 1e12)
        results.append(result)
    return results


def environment() -> dict[str, str]:
    """What a figure depends on besides the code: versions, machine and date (UTC)."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.version.cuda or "none",
        "threads": str(torch.get_num_threads()),
    }


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 for two zero tensors)."""
    a, b = a.double().flatten(), b.double().flatten()
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm else float((a - b).norm())
