"""Every side-by-side benchmark, one after the other: `nox -s bench [-- --full] [-- --only NAME]`.

    python -m benchmarks.run                 # CPU sizes, about 5 minutes on 2 cores
    python -m benchmarks.run --full          # the papers' sizes, on a GPU
    python -m benchmarks.run --only fid --only frechet --out bench-results

Each benchmark module has `run(size, device) -> list[Comparison]`. The results go to
OUT/NAME.json (one file per benchmark, with the environment) and to a table on the terminal.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.harness import Comparison, Size, environment

# name -> module under benchmarks/, in the order they run (issue 17's list).
BENCHMARKS = {
    "train_step": "benchmarks.train_step",
    "sampling": "benchmarks.sampling",
    "hessian": "benchmarks.hessian",
    "landscape": "benchmarks.landscape",
    "fid": "benchmarks.fid",
    "frechet": "benchmarks.frechet",
    "ema_reconstruct": "benchmarks.ema_reconstruct",
    "mlflow": "benchmarks.mlflow_cost",
}


def run_benchmark(name: str, size: Size, device: torch.device) -> list[Comparison]:
    module = importlib.import_module(BENCHMARKS[name])
    comparisons: list[Comparison] = module.run(size, device)
    return comparisons


def write_results(name: str, comparisons: list[Comparison], out: Path, seconds: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    record = {
        "benchmark": name,
        "environment": environment(),
        "wall_s": seconds,
        "comparisons": [comparison.to_json() for comparison in comparisons],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _mebibytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def table(comparisons: list[Comparison]) -> Table:
    view = Table(title="dmstab against the reference approach (ratio < 1: dmstab faster)")
    for column in ("benchmark", "side", "median", "min–max", "peak RSS", "peak CUDA", "MFU"):
        view.add_column(column, justify="left" if column in ("benchmark", "side") else "right")
    view.add_column("ratio", justify="right")
    view.add_column("target")
    for comparison in comparisons:
        for index, side in enumerate(comparison.sides):
            low, high = side.spread
            first = index == 0
            verdict = {True: "[green]met[/]", False: "[red]missed[/]", None: ""}[comparison.met]
            view.add_row(
                comparison.title if first else "",
                side.name,
                _milliseconds(side.median),
                f"{_milliseconds(low)}–{_milliseconds(high)}",
                _mebibytes(side.peak_rss_bytes),
                _mebibytes(side.peak_cuda_bytes),
                "–" if side.mfu is None else f"{side.mfu:.1%}",
                f"{comparison.ratio:.3f}×" if first else "",
                f"{comparison.target} {verdict}" if first and comparison.target else "",
            )
        view.add_section()
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the papers' sizes (for a GPU)")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=[])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    size: Size = "full" if args.full else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as dmstab does on the CPU (docs/performance.md)
    console = Console(width=None if Console().is_terminal else 160)
    every: list[Comparison] = []
    for name in args.only or list(BENCHMARKS):
        started = time.perf_counter()
        console.print(f"[bold]{name}[/] ({size}, {device})")
        comparisons = run_benchmark(name, size, device)
        seconds = time.perf_counter() - started
        path = write_results(name, comparisons, args.out, seconds)
        console.print(f"  {len(comparisons)} comparison(s) in {seconds:.0f} s -> {path}")
        every += comparisons
    console.print(table(every))


if __name__ == "__main__":
    main()
