"""Training throughput, FLOP utilisation and peak memory of a recipe's real training step.

    python benchmarks/train_throughput.py recipes/cifar10_clts.yaml data.name=synthetic \
        --steps 50 --peak-tflops 989

Uses the same `Trainer.train_step` as `dmstab train` (no MLflow). On a GPU, report the
printed line in docs/performance.md with the GPU, torch version and date.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmstab.config import load_recipe
from dmstab.devices import pick_device
from dmstab.train.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU")
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="CPU: undo dmstab's flush-to-zero of denormal floats, to measure what it buys",
    )
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    device = pick_device(recipe.train.device)
    if args.keep_denormals:
        torch.set_flush_denormal(False)
    trainer = Trainer(recipe, device)
    for _ in range(args.warmup):
        trainer.train_step()
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    flops_per_step = counter.get_total_flops()

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    _sync(device)
    elapsed = time.perf_counter() - start

    images_per_s = args.steps * recipe.train.batch_size / elapsed
    achieved = flops_per_step * args.steps / elapsed
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
        name = torch.cuda.get_device_name(device)
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
        name = f"CPU x{torch.get_num_threads()} threads"
    mfu = f", MFU {achieved / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
    print(
        f"{recipe.name} on {name}, torch {torch.__version__}, {recipe.train.precision}, "
        f"batch {recipe.train.batch_size}: {images_per_s:.1f} img/s, "
        f"{achieved / 1e12:.3f} TFLOP/s{mfu}, peak {peak}, "
        f"{flops_per_step / recipe.train.batch_size / 1e9:.2f} GFLOP per image (fwd+bwd)"
    )


if __name__ == "__main__":
    main()
