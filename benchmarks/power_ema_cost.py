"""What the two power-function EMAs cost a recipe's training: step time, peak RSS, disk.

    OMP_NUM_THREADS=2 python benchmarks/power_ema_cost.py recipes/quickstart.yaml --repeats 5

Each repeat trains the recipe's real `Trainer.train_step` (no MLflow) in two fresh child
processes, one with the recipe's power EMAs and one with `ema.power_sigma_rels=[]`, in
alternating order so that a busy machine slows both sides alike; each child reports its median
step time over `--steps` steps after `--warmup`, its peak RSS and (with power EMAs) the
median time of the power-EMA update alone. The parent prints the medians
over the repeats, the disk a full run's snapshots take (the recipe's cadence and dtype) and how
much the power EMAs add to a checkpoint. Record the figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmstab.analysis.ema_profiles import SNAPSHOT_DTYPES
from dmstab.config import load_recipe
from dmstab.devices import pick_device
from dmstab.train.trainer import Trainer

WITHOUT = "ema.power_sigma_rels=[]"


def _child(recipe_path: str, overrides: list[str], steps: int, warmup: int) -> None:
    """Train and print one JSON line: median seconds per step, peak RSS in bytes."""
    recipe = load_recipe(recipe_path, overrides)
    trainer = Trainer(recipe, pick_device(recipe.train.device))
    for _ in range(warmup):
        trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    measured = {"step_s": statistics.median(times), "rss": rss}
    if trainer.power_ema is not None:  # the update alone, what the power EMAs add to a step
        updates = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.power_ema.update(trainer.model, trainer.power_ema.step + 1)
            updates.append(time.perf_counter() - start)
        measured["update_s"] = statistics.median(updates)
    print(json.dumps(measured))


def _measure(args: argparse.Namespace, overrides: list[str]) -> dict[str, float]:
    command = [sys.executable, __file__, args.recipe, *overrides, "--child"]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _disk(recipe_path: str, overrides: list[str]) -> tuple[int, int, int]:
    """(bytes of one full run's snapshots, checkpoint bytes with, checkpoint bytes without)."""
    recipe = load_recipe(recipe_path, overrides)
    trainer = Trainer(recipe, torch.device("cpu"))
    assert trainer.power_ema is not None, "the recipe tracks no power EMA"
    trainer.train_step()
    tr, e = recipe.train, recipe.ema
    images = tr.total_steps * tr.batch_size
    count = images // e.snapshot_every if e.snapshot_every else 0
    count += 0 if e.snapshot_every and images % e.snapshot_every == 0 else 1  # the last step's
    with tempfile.TemporaryDirectory() as folder:
        infos = trainer.power_ema.save_snapshots(Path(folder), SNAPSHOT_DTYPES[e.snapshot_dtype])
        one_step = sum(f.stat().st_size for f in Path(folder).iterdir())
    assert len(infos) == len(e.power_sigma_rels)

    def size(state: object) -> int:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.tell()

    with_power = size(trainer.state_dict("run"))
    trainer.power_ema = None
    return one_step * count, with_power, size(trainer.state_dict("run"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per child")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.recipe, args.overrides, args.steps, args.warmup)
        return

    sides: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
    for repeat in range(args.repeats):
        order = ["with", "without"] if repeat % 2 == 0 else ["without", "with"]
        for side in order:
            extra = [] if side == "with" else [WITHOUT]
            sides[side].append(_measure(args, [*args.overrides, *extra]))
            print(f"repeat {repeat + 1} {side:>7}: {sides[side][-1]}", flush=True)
    step = {k: statistics.median(m["step_s"] for m in v) for k, v in sides.items()}
    rss = {k: statistics.median(m["rss"] for m in v) for k, v in sides.items()}
    update = statistics.median(m["update_s"] for m in sides["with"])
    snapshots, checkpoint_with, checkpoint_without = _disk(args.recipe, args.overrides)
    mib = 2**20
    print(
        f"{args.recipe} on CPU x{torch.get_num_threads()} threads, torch {torch.__version__}: "
        f"step {step['without'] * 1e3:.1f} ms without, {step['with'] * 1e3:.1f} ms with power "
        f"EMAs ({step['with'] / step['without'] - 1:+.1%}; the update alone {update * 1e3:.1f} "
        f"ms); peak RSS {rss['without'] / mib:.0f} "
        f"-> {rss['with'] / mib:.0f} MiB; snapshots of a full run {snapshots / mib:.1f} MiB; "
        f"checkpoint {checkpoint_without / mib:.1f} -> {checkpoint_with / mib:.1f} MiB "
        f"(medians of {args.repeats} interleaved repeats, {args.steps} steps each)"
    )


if __name__ == "__main__":
    main()
