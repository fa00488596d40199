"""Power-function EMAs during real training, and `dmstab ema-reconstruct` on their snapshots."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dmstab.analysis.ema_profiles import list_snapshots, load_snapshot
from dmstab.checkpoint import load_checkpoint
from dmstab.commands.ema_reconstruct import make_plan, parse_sigma_rel_range, reconstruct_ema
from dmstab.config import load_recipe
from dmstab.errors import DmstabError
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, Runner, one_line_error, store

POWER = ["ema.power_sigma_rels=[0.05,0.1,0.13]", "train.steps=48", "train.checkpoint_every=48"]


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point()]
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in keys])
    return float(diff.norm())


@pytest.mark.slow
def test_reconstruction_approaches_a_directly_tracked_ema(isolated_workdir: Path) -> None:
    """Snapshots of σrel 0.05 and 0.10 rebuild the σrel 0.13 EMA tracked in the same run."""
    errors = []
    for every in (24 * 8, 6 * 8, 2 * 8):  # images between snapshots: 2, 8, 24 snapshots each
        result = train(
            load_recipe(
                RECIPES / "quickstart.yaml",
                [*TINY, *POWER, f"ema.snapshot_every={every}", f"train.out_dir=runs{every}"],
            )
        )
        snapshots = result.run_dir / "snapshots"
        two = result.run_dir / "two"
        two.mkdir()
        for info in list_snapshots(snapshots):
            if info.sigma_rel != 0.13:
                shutil.copy(info.path, two)
                shutil.copy(info.path.with_suffix(".json"), two)
        # `two` sits beside the run's checkpoint, which carries the recipe the command needs
        _, [made] = reconstruct_ema(two, [0.13])
        direct, _ = load_snapshot(
            next(i.path for i in list_snapshots(snapshots) if i.sigma_rel == 0.13 and i.step == 48)
        )
        ten, _ = load_snapshot(
            next(i.path for i in list_snapshots(snapshots) if i.sigma_rel == 0.1 and i.step == 48)
        )
        rebuilt = load_checkpoint(made.path)["model"]
        errors.append(_distance(rebuilt, direct) / _distance(ten, direct))
    print("relative error vs snapshot density:", errors)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


@pytest.mark.slow
def test_cli_reconstructs_the_latest_run_and_sample_accepts_it(dmstab: Runner) -> None:
    trained = dmstab(
        "train",
        str(RECIPES / "quickstart.yaml"),
        *TINY,
        "ema.power_sigma_rels=[0.05,0.1]",
        "ema.snapshot_every=16",
    )
    assert trained.returncode == 0, trained.stderr
    made = dmstab("ema-reconstruct", "--sigma-rel", "0.13")
    assert made.returncode == 0, made.stderr
    checkpoint = next(Path("runs").glob("*/reconstructed/*.pt"))
    state = load_checkpoint(checkpoint)
    assert state["sigma_rel"] == 0.13 and state["step"] == 12
    sampled = dmstab("sample", str(checkpoint), "sample.num_images=2")
    assert sampled.returncode == 0, sampled.stderr
    runs = store().search_runs(
        [e.experiment_id for e in store().search_experiments()],
        "tags.`dmstab.kind` = 'ema-reconstruct'",
    )
    assert len(runs) == 1 and runs[0].data.tags["dmstab.sigma_rels"] == "0.13"

    dry = dmstab("ema-reconstruct", "--sweep", "0.05:0.15:0.05", "--dry-run")
    assert dry.returncode == 0 and "relative profile error" in dry.stdout
    bad = dmstab("ema-reconstruct", "--sigma-rel", "0.5")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_an_impossible_sigma_rel_is_refused_before_any_run_is_looked_up(
    dmstab: Runner, isolated_workdir: Path
) -> None:
    for option in (["--sigma-rel", "5"], ["--sweep", "0.1:0.4:0.1"]):  # σrel(γ=0) ≈ 0.2887
        refused = dmstab("ema-reconstruct", *option)
        assert refused.returncode == 2, refused.stderr
        assert "sigma_rel" in one_line_error(refused)
    assert list(isolated_workdir.iterdir()) == [], "no store, no run lookup"


def test_plan_and_sweep_errors(isolated_workdir: Path) -> None:
    assert parse_sigma_rel_range("0.03:0.20:0.01")[-1] == pytest.approx(0.20)
    assert len(parse_sigma_rel_range("0.03:0.20:0.01")) == 18
    with pytest.raises(DmstabError, match="start:stop:step"):
        parse_sigma_rel_range("0.1-0.2")
    empty = isolated_workdir / "empty"
    empty.mkdir()
    with pytest.raises(DmstabError, match="no snapshots"):
        make_plan(empty, [0.1], None)


def test_power_emas_only_observe_the_training(isolated_workdir: Path, one_thread: None) -> None:
    """The quickstart's default power EMAs change no number of the training itself: the same
    weights, classic EMA and optimiser state bit for bit as with `ema.power_sigma_rels=[]`."""
    states = []
    for index, power in enumerate(([], ["ema.power_sigma_rels=[]"])):
        recipe = load_recipe(
            RECIPES / "quickstart.yaml", [*TINY, *power, f"train.out_dir=r{index}"]
        )
        states.append(load_checkpoint(train(recipe).checkpoint))
    with_power, without = states
    assert with_power["power_ema"] is not None and without["power_ema"] is None
    for part in ("model", "ema", "optimizer"):
        flat = [torch.nn.utils.parameters_to_vector(_tensors(s[part])) for s in states]
        assert torch.equal(flat[0], flat[1]), part


def _tensors(value: object) -> list[torch.Tensor]:
    """Every floating tensor inside a checkpoint part, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value.double().flatten()] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []
