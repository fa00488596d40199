"""Side-by-side timing: dmstab's way and a reference way of the same work, in one process.

A benchmark builds its `Side`s on the same inputs and hands them to `compare`, which runs them
interleaved (A B, then B A, ...) so that a change of load or clock hits both alike, after
`warmup` untimed rounds. Each side's peak memory is its own: the host's peak RSS is reset
before each call (Linux `/proc/self/clear_refs`), CUDA's peak statistics likewise. The result
is a `Comparison`: medians, spread, memory, MFU on a GPU, and the ratio to the baseline side,
written as JSON and shown as a table by `benchmarks/run.py`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import gc
import platform
import shutil
import statistics
import tempfile
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


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def _peak_rss() -> int | None:
    return _status_bytes("VmHWM")  # the peak since the last `_reset_peaks`


def resident_growth(run: Callable[[], object]) -> tuple[object, int | None]:
    """`run()`'s result and how far its peak resident memory rose above the memory held before
    it (Linux; None elsewhere). Freed heap memory is first handed back to the system (glibc's
    `malloc_trim`), so that memory `run` allocates shows as growth instead of reusing pages an
    earlier call left behind."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(libc).malloc_trim(0)
    before = _status_bytes("VmRSS")
    _reset_peaks(torch.device("cpu"))
    result = run()
    peak = _peak_rss()
    return result, None if before is None or peak is None else peak - before


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


class SideTimer:
    """Times one side's calls and its peak memory over them: `begin()` before a call, `end()`
    after it. `measure` uses one per side; a benchmark whose side is driven from elsewhere (the
    training loop calling back, say) calls them itself, around the work it can see."""

    def __init__(self, name: str, device: torch.device, flops: float | None = None) -> None:
        self.name = name
        self.device = device
        self.flops = flops
        self.seconds: list[float] = []
        self.peak_rss: int | None = None
        self.peak_cuda: int | None = None
        self._start = 0.0

    def begin(self) -> None:
        synchronize(self.device)
        _reset_peaks(self.device)
        self._start = time.perf_counter()

    def end(self, *, calls: int = 1, record: bool = True) -> None:
        """Close the timed stretch, which did `calls` units of work (its time per unit is
        recorded); `record=False` for a warm-up stretch."""
        synchronize(self.device)
        elapsed = time.perf_counter() - self._start
        if not record:
            return
        self.seconds.append(elapsed / calls)
        peak = _peak_rss()
        if peak is not None:
            self.peak_rss = max(self.peak_rss or 0, peak)
        if self.device.type == "cuda":
            cuda = torch.cuda.max_memory_allocated(self.device)
            self.peak_cuda = max(self.peak_cuda or 0, cuda)

    def result(self) -> SideResult:
        result = SideResult(self.name, self.seconds, self.peak_rss, self.peak_cuda, self.flops)
        peak = peak_tflops(self.device)
        if peak is not None and self.flops is not None:
            result.mfu = self.flops / result.median / (peak * 1e12)
        return result


def measure(
    sides: Sequence[Side], *, device: torch.device, warmup: int, repeats: int
) -> list[SideResult]:
    """Each side `warmup` untimed then `repeats` timed calls, interleaved and alternating in
    order; per side, its call times and the peak memory over its own calls."""
    timers = {side.name: SideTimer(side.name, device, side.flops) for side in sides}
    for round_ in range(warmup + repeats):
        order = sides if round_ % 2 == 0 else list(reversed(sides))
        for side in order:
            timers[side.name].begin()
            side.run()
            timers[side.name].end(record=round_ >= warmup)
    return [timers[side.name].result() for side in sides]


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


_EMPTY_STORE: list[Path] = []  # an empty MLflow SQLite store of this process, made once


def empty_store(folder: Path) -> str:
    """The URI of a new, empty MLflow SQLite store in `folder`. Making its tables takes MLflow
    seconds (schema migrations), so they are made once per process and the file is copied."""
    if not _EMPTY_STORE:
        from dmstab.tracking.client import open_client

        made = Path(tempfile.mkdtemp(prefix="dmstab-bench-store-")) / "mlflow.db"
        atexit.register(shutil.rmtree, made.parent, True)
        open_client(f"sqlite:///{made}").search_experiments()
        _EMPTY_STORE.append(made)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def tracked_overrides(folder: Path, device: torch.device) -> list[str]:
    """Recipe overrides for a benchmark's real training run: its run directory and a fresh
    MLflow store in `folder`, on `device`."""
    return [
        f"train.out_dir={folder}/runs",
        f"tracking.uri={empty_store(folder)}",
        "tracking.experiment=benchmark",
        f"train.device={device.type}",
    ]


@torch.no_grad()
def wake(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a fresh network's all-zero parameters (ADM's zero-initialised output convolution,
    EDM2's output gain) small random values, in place: its output then depends on its input,
    time and labels, so that two computations agreeing on it is a test that can fail."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in network.parameters():
        if not parameter.any():
            noise = torch.randn(parameter.shape, generator=generator) * 0.05
            parameter.copy_(noise.to(parameter.device, parameter.dtype))
    return network


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 for two zero tensors)."""
    a, b = a.double().flatten(), b.double().flatten()
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm else float((a - b).norm())
