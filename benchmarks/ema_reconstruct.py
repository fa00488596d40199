"""Post-hoc EMA reconstruction (`dmstab ema-reconstruct`, EDM2 Sec. 3.2): time and peak memory
against the number of snapshots, dmstab's streaming against loading every snapshot at once.

dmstab solves the least-squares plan and then streams: `batch` outputs are built in one pass
over the snapshot files, holding one snapshot at a time, as NVlabs/edm2's reconstruct_phema.py
does with its `--batch` (outputs per pass over the inputs). Its memory should therefore stay at
about `batch` + 1 models whatever the snapshot count; the target allows `batch` + 2 (the caller
still holds the last output of the previous pass). The reference side loads every snapshot
first and then combines them: the obvious way, whose memory grows with the count.

Memory is the rise of the peak resident set over the memory held before the call, in units of
one float32 model (the outputs' dtype). The snapshots are real dmstab snapshot files of a
quickstart-shaped network, written by `save_snapshot` as training writes them, at steps
100, 200, … for σrel 0.05 and 0.10 (EDM2's two stored profiles).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    Comparison,
    Side,
    Size,
    describe_device,
    measure,
    relative_difference,
    resident_growth,
)
from dmstab.analysis.ema_profiles import (
    SNAPSHOT_DTYPES,
    load_snapshot,
    save_snapshot,
    sigma_rel_to_gamma,
)
from dmstab.analysis.ema_reconstruct import reconstruct
from dmstab.commands.ema_reconstruct import Plan, make_plan
from dmstab.config import load_recipe
from dmstab.data import build_dataset
from dmstab.models import build_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STORED_SIGMA_RELS = (0.05, 0.10)
OUTPUT_SIGMA_RELS = (0.04, 0.07, 0.10, 0.13, 0.16, 0.19)  # what a user sweeps


@dataclass(frozen=True)
class Setup:
    recipe: str
    overrides: tuple[str, ...]
    counts: tuple[int, ...]  # snapshots in all (half per stored σrel)
    outputs: int  # reconstructed σrels (the first of OUTPUT_SIGMA_RELS)
    batch: int  # outputs per pass over the snapshots
    dtype: str  # the snapshots' storage dtype
    repeats: int


# recipe, overrides, snapshot counts, outputs, batch, snapshot dtype, timed repeats
SIZES: dict[Size, Setup] = {
    # float32 snapshots: a loaded one weighs a whole model, the strictest case for the bound
    "toy": Setup(
        "quickstart.yaml",
        ("model.channels=64", "model.channel_mult=[1,2]", "data.synthetic_size=16"),
        (6,),
        3,
        2,
        "float32",
        1,
    ),
    "cpu": Setup(
        "quickstart.yaml",
        ("model.channels=64", "data.synthetic_size=16"),
        (4, 8, 16, 32),
        6,
        4,
        "float16",
        2,
    ),
    "full": Setup(
        "edm2_img64_s.yaml",
        ("data.name=synthetic", "data.synthetic_size=16"),
        (4, 8, 16),
        6,
        4,
        "float16",
        2,
    ),
}


def write_snapshots(
    weights: dict[str, torch.Tensor], indices: range, directory: Path, dtype: torch.dtype
) -> None:
    """Snapshot files number `indices`: steps 100, 200, … for each stored σrel in turn, each a
    distinct shift of `weights` so that every coefficient shows in the result."""
    for index in indices:
        step = 100 * (index // len(STORED_SIGMA_RELS) + 1)
        sigma_rel = STORED_SIGMA_RELS[index % len(STORED_SIGMA_RELS)]
        shifted = {
            key: value + 0.01 * index if value.is_floating_point() else value
            for key, value in weights.items()
        }
        save_snapshot(shifted, step, sigma_rel, sigma_rel_to_gamma(sigma_rel), directory, dtype)


def all_at_once(plan: Plan) -> Iterator[dict[str, torch.Tensor]]:
    """The reference: load every snapshot the plan uses, then form each output from them."""
    loaded = [load_snapshot(info.path)[0] for info in plan.snapshots]
    for column in plan.coefficients.T:
        output = {
            key: torch.zeros_like(value, dtype=torch.float32)
            if value.is_floating_point()
            else value.clone()
            for key, value in loaded[0].items()
        }
        for weights, coefficient in zip(loaded, column.tolist(), strict=True):
            for key, value in weights.items():
                if value.is_floating_point():
                    output[key].add_(value, alpha=coefficient)
        yield output


def streamed(plan: Plan, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """dmstab's reconstruction of the plan's outputs, `batch` per pass."""
    return reconstruct([info.path for info in plan.snapshots], plan.coefficients, batch)


def consume(outputs: Iterator[dict[str, torch.Tensor]]) -> int:
    """Take each output in turn and let it go, as `dmstab ema-reconstruct` writes each to a
    file; the number taken."""
    return sum(1 for _ in outputs)


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.flatten() for value in weights.values() if value.is_floating_point()])


def model_bytes(weights: dict[str, torch.Tensor]) -> int:
    """One model in float32 (what the outputs hold); integer buffers at their own size."""
    return sum(
        value.numel() * (4 if value.is_floating_point() else value.element_size())
        for value in weights.values()
    )


def compare(
    setup: Setup,
    count: int,
    weights: dict[str, torch.Tensor],
    directory: Path,
    device: torch.device,
) -> Comparison:
    sigma_rels = OUTPUT_SIGMA_RELS[: setup.outputs]
    model = model_bytes(weights)

    def dmstab_side() -> int:
        return consume(streamed(make_plan(directory, sigma_rels, None), setup.batch))

    def reference_side() -> int:
        return consume(all_at_once(make_plan(directory, sigma_rels, None)))

    plan = make_plan(directory, sigma_rels, None)
    pairs = zip(streamed(plan, setup.batch), all_at_once(plan), strict=True)
    difference = max(relative_difference(flat(a), flat(b)) for a, b in pairs)
    _, dmstab_growth = resident_growth(dmstab_side)
    _, reference_growth = resident_growth(reference_side)
    sides = [Side("dmstab (streamed)", dmstab_side), Side("all snapshots at once", reference_side)]
    bound = setup.batch + 2
    dmstab_models = None if dmstab_growth is None else dmstab_growth / model
    comparison = Comparison(
        benchmark="ema_reconstruct",
        title=f"post-hoc EMA, {count} snapshots → {setup.outputs} σrel",
        config={
            "recipe": setup.recipe,
            "overrides": list(setup.overrides),
            "snapshots": count,
            "outputs": setup.outputs,
            "batch": setup.batch,
            "snapshot_dtype": setup.dtype,
            "model_bytes": model,
        },
        device=describe_device(torch.device("cpu")),  # reconstruction runs on the CPU
        sides=measure(
            sides,
            device=torch.device("cpu"),
            warmup=0,
            repeats=setup.repeats,  # warmed by the checks
        ),
        subject=sides[0].name,
        baseline=sides[1].name,
        target=f"peak ≤ {bound} models (batch + 2)",
        checks={
            "relative_difference": difference,
            "bound_models": bound,
            "dmstab_peak_models": dmstab_models,
            "all_at_once_peak_models": None
            if reference_growth is None
            else reference_growth / model,
        },
    )
    comparison.met = dmstab_models is not None and dmstab_models <= bound and difference <= 1e-6
    return comparison


def run(size: Size, device: torch.device) -> list[Comparison]:
    setup = SIZES[size]
    recipe = load_recipe(RECIPES / setup.recipe, setup.overrides)
    num_classes = build_dataset(recipe.data).num_classes if recipe.model.class_cond else 0
    torch.manual_seed(0)
    weights = {
        k: v.detach().clone() for k, v in build_model(recipe, num_classes).state_dict().items()
    }
    comparisons = []
    with tempfile.TemporaryDirectory() as folder:
        written = 0
        for count in setup.counts:  # each count adds the snapshots of later steps
            write_snapshots(
                weights, range(written, count), Path(folder), SNAPSHOT_DTYPES[setup.dtype]
            )
            written = count
            comparisons.append(compare(setup, count, weights, Path(folder), device))
    return comparisons
