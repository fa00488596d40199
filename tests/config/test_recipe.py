"""Recipe loading, inheritance, overrides and the one-line errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dmstab.cli import app
from dmstab.config import (
    Recipe,
    differences,
    fingerprint,
    flatten,
    load_recipe,
    parse_override,
    to_yaml,
)
from dmstab.errors import DmstabError
from tests.helpers import RECIPES

ALL_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if not p.stem.endswith("_base"))
RUNNABLE = [p for p in ALL_RECIPES if "\nsweep:" not in p.read_text()]  # sweeps: test_sweep


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.stem)
def test_every_recipe_and_sweep_passes_dry_run(path: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"name: {path.stem}" in result.output


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_every_recipe_resolves(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert load_recipe_from_text(to_yaml(recipe), tmp_path, path.stem) == recipe


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.stem)
def test_every_diffusion_recipe_stores_two_power_emas_for_ema_reconstruct(path: Path) -> None:
    """EDM2 Sec. 3.2: σrel 0.05 and 0.10, snapshots often enough that a full run keeps between
    8 and 256 (the paper's count) per EMA, so that `dmstab ema-reconstruct` works on every
    diffusion run without overrides. GANs have no power EMA."""
    recipe = load_recipe(path)
    e, tr = recipe.ema, recipe.train
    if recipe.model.adversarial:
        assert e.power_sigma_rels == ()
        return
    assert e.power_sigma_rels == (0.05, 0.10)
    per_ema = tr.total_steps * tr.batch_size // e.snapshot_every
    assert 8 <= per_ema <= 256, per_ema


def load_recipe_from_text(text: str, directory: Path, stem: str) -> Recipe:
    """The recipe written out as `stem`.yaml in `directory` (the test's own, never recipes/)."""
    target = directory / f"{stem}.yaml"
    target.write_text(text)
    return load_recipe(target)


@pytest.mark.parametrize(
    ("path", "written", "left_out"),
    [(RECIPES / "edm2_mini.yaml", "kimg", "steps"), (RECIPES / "quickstart.yaml", "steps", "kimg")],
)
def test_the_dump_writes_the_one_length_key_in_use(
    path: Path, written: str, left_out: str, tmp_path: Path
) -> None:
    """The dump names only the key that sets the length, so it reloads and either key can be
    overridden on it by zeroing kimg or writing it (a run's recipe.yaml is reloaded so)."""
    recipe = load_recipe(path)
    train = yaml.safe_load(to_yaml(recipe))["train"]
    assert written in train and left_out not in train
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(to_yaml(recipe))
    assert load_recipe(dumped) == recipe
    assert load_recipe(dumped, ["train.kimg=0", "train.steps=7"]).train.total_steps == 7


def test_cifar10_clts_carries_the_papers_hyperparameters() -> None:
    r = load_recipe(RECIPES / "cifar10_clts.yaml")
    assert (r.diffusion.schedule, r.diffusion.steps, r.diffusion.target) == ("cosine", 4000, "eps")
    assert (r.optim.lr, r.optim.betas, r.train.batch_size) == (1e-4, (0.8, 0.999), 128)
    assert r.ema.rate == 0.9999
    assert (r.timesteps.sampler, r.timesteps.mu, r.timesteps.sigma) == ("clts", 1200.0, 4000.0)
    assert r.timesteps.mu == 0.3 * r.diffusion.steps
    assert r.sample.steps == 250
    assert r.paper.values["500k"] == 2.31


def test_base_inheritance_merges_sections(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.5, betas: [0.8, 0.9]}\ntrain: {steps: 7}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim: {lr: 0.25}\n")
    r = load_recipe(tmp_path / "child.yaml")
    assert r.optim.lr == 0.25 and r.optim.betas == (0.8, 0.9) and r.train.steps == 7


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(DmstabError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_overrides_are_yaml_typed() -> None:
    assert parse_override("optim.lr=2e-4") == (["optim", "lr"], 2e-4)
    assert parse_override("model.channel_mult=[1,2]") == (["model", "channel_mult"], [1, 2])
    assert parse_override("optim.grad_clip=null") == (["optim", "grad_clip"], None)
    r = load_recipe(RECIPES / "quickstart.yaml", ["optim.lr=2e-4", "model.channel_mult=[1,2]"])
    assert r.optim.lr == 2e-4 and r.model.channel_mult == (1, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown recipe key 'optim.lrr'; did you mean 'optim.lr'"),
        ("optimm.lr=1", "did you mean 'optim'"),
        ("optim.lr=fast", "'optim.lr' is 'fast'; expected float"),
        ("train.steps=1.5", "'train.steps' is 1.5; expected int"),
        ("train.steps=true", "expected int"),
        ("diffusion.target=z", "diffusion.target 'z' is not registered; registered: eps, "),
        ("timesteps.mu=1000", r"must be in \[0, diffusion.steps\)"),
        ("timesteps.sigma=0", "timesteps.sigma"),
        ("optim.betas=[0.9]", "list of 2 float"),
        ("model.dropout=1.5", "model.dropout"),
        ("sample.steps=5000", "sample.steps"),
        ("optim=3", "must be a mapping"),
        ("noequals", "section.key=value"),
        ("data.name=cifar10", "data.root is required"),
    ],
)
def test_bad_overrides_give_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(DmstabError, match=message) as info:
        load_recipe(RECIPES / "quickstart.yaml", [override])
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(DmstabError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [\n")
    with pytest.raises(DmstabError, match="not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(DmstabError, match="mapping of sections"):
        load_recipe(listy)


def test_flatten_fingerprint_and_differences() -> None:
    a = load_recipe(RECIPES / "quickstart.yaml")
    b = load_recipe(RECIPES / "quickstart.yaml", ["optim.lr=0.5"])
    flat = flatten(a)
    assert flat["optim.lr"] == str(a.optim.lr)
    assert flat["model.channel_mult"] == "[1, 2, 2]"
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(
        load_recipe(RECIPES / "quickstart.yaml", ["paper.notes=x"])
    )
    assert differences(a, b) == [f"optim.lr: {a.optim.lr} -> 0.5"]
