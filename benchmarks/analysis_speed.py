"""Speed of the stability analyses on a recipe's network: Hessian-vector products by
forward-over-reverse vs double backward, and loss-landscape grid points per second.

    python benchmarks/analysis_speed.py recipes/mini_stability_dm.yaml --batch 64 --repeats 10

The network is freshly initialised (timing does not depend on the weights); the fixed batch,
noise and timesteps are the ones `dmstab hessian` / `dmstab landscape` build, resident on the
device. Forward-over-reverse is reported about 3× faster than double backward on an H100,
and the reference loss-landscape code about 4 s per grid point. Report the printed lines in
docs/performance.md with the device, torch version and date.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmstab.analysis.fixed_batch import MEAN_LOSS
from dmstab.analysis.hessian import HessianOperator, Method
from dmstab.analysis.landscape import evaluate
from dmstab.analysis.spectrum import HessianConfig
from dmstab.commands.study import analysis_losses
from dmstab.commands.subjects import Subject
from dmstab.config import load_recipe
from dmstab.data import build_dataset
from dmstab.devices import pick_device
from dmstab.models import build_model
from dmstab.models.gan import build_discriminator, is_gan
from dmstab.train.ema import EMA


def _seconds_per_call(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    call()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _fresh_subject(path: str, overrides: list[str], batch: int) -> Subject:
    """A freshly initialised model of the recipe, as a Subject the analyses can read."""
    recipe = load_recipe(path, [*overrides, f"hessian.batch_size={batch}", "hessian.timesteps=[]"])
    classes = build_dataset(recipe.data).num_classes
    model = build_model(recipe, classes)
    state: dict[str, object] = {"model": model.state_dict(), "num_classes": classes, "step": 0}
    state["ema"] = EMA(model, 0.5, False).state_dict()
    if is_gan(recipe):
        state["discriminator"] = build_discriminator(recipe, classes).state_dict()
    return Subject(checkpoint=Path(path), state=state, recipe=recipe, label="bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batch", type=int, default=64, help="fixed-batch size")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    subject = _fresh_subject(args.recipe, args.overrides, args.batch)
    device = pick_device(subject.recipe.train.device)
    model, losses = analysis_losses(subject, device, subject.recipe.analysis(HessianConfig))
    loss = losses.get(MEAN_LOSS) or next(iter(losses.values()))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.recipe}: {parameters:,} parameters, batch {args.batch}, device {device}")
    with sdpa_kernel(SDPBackend.MATH):
        methods: tuple[Method, ...] = ("forward_over_reverse", "double_backward")
        for method in methods:
            operator = HessianOperator(model, loss, method=method)
            # in the operator's vector space, as dmstab hessian: on the device, no round trip
            vector = operator.space.normal(parameters, torch.Generator().manual_seed(0))
            seconds = _seconds_per_call(functools.partial(operator, vector), args.repeats, device)
            print(f"  HVP {method:<22} {seconds * 1000:8.1f} ms")
    seconds = _seconds_per_call(lambda: evaluate(loss, model), args.repeats, device)
    print(f"  landscape grid point     {seconds * 1000:8.1f} ms  ({1 / seconds:.1f} points/s)")
    if device.type == "cuda":
        print(
            f"  peak memory              {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
