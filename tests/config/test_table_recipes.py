"""The AAAI stability paper's table recipes: published numbers, settings, and a few real steps.

The paper blocks are checked against the paper's own text (Tables 2-3 of
../shared/papers/dm-training-stability-aaai2024.txt) where that file is beside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmstab.commands.report_collect import parse_iteration
from dmstab.config import Recipe, load_recipe
from dmstab.train.loop import train
from tests.helpers import PAPER_TEXT, RECIPES, TINY, store

TABLE_ROWS = {  # recipe -> (the row's name in the paper's table, the table's caption start)
    "cifar10_baseline": ("ID", "Table 3"),
    "cifar10_fdm": ("FDM", "Table 3"),
    "cifar10_clts": ("ID+Ours", "Table 3"),
    "imagenet128_gd": ("GD", "Table 2"),
    "imagenet128_minsnr": ("Min-SNR", "Table 2"),
    "imagenet128_gd_clts": ("GD+Ours", "Table 2"),
}
# A tiny ADM for any table recipe; the ImageNet base's 5 levels and attention need resetting.
TINY_ADM = [
    *TINY,
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[8]",
    "model.num_head_channels=-1",
    "train.steps=3",
    "train.precision=fp32",
    "eval.at=[]",
    "eval.every=0",
]


def _published_row(table: str, row: str) -> dict[int, float]:
    """A row of the paper's Table 2 or 3 as {iteration: FID}, read from the paper's text."""
    lines = PAPER_TEXT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{table}:"))
    header = next(line for line in lines[start + 1 :] if line.startswith("Methods"))
    iterations = [parse_iteration(m) for m in re.findall(r"Iters=(\w+)", header)]
    body = lines[lines.index(header) + 1 :]
    cells = next(line.split("\t") for line in body if line.split("\t")[0] == row)
    return dict(zip(iterations, map(float, cells[1:]), strict=True))


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper's text is not beside the repo")
@pytest.mark.parametrize("name", sorted(TABLE_ROWS))
def test_paper_blocks_equal_the_published_tables(name: str) -> None:
    row, table = TABLE_ROWS[name]
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    published = {parse_iteration(k): v for k, v in recipe.paper.values.items()}
    assert published == _published_row(table, row)
    assert recipe.paper.metric == "fid" and recipe.paper.table == f"{table}, {row}"
    # The eval block asks for FID at exactly the published iterations.
    assert set(recipe.eval.at) == set(published) and recipe.eval.metrics == ("fid",)


def test_imagenet128_recipes_carry_guided_diffusion_and_the_papers_settings() -> None:
    gd, minsnr, clts = (
        load_recipe(RECIPES / f"imagenet128_{n}.yaml") for n in ("gd", "minsnr", "gd_clts")
    )
    m = gd.model
    assert (m.channels, m.channel_mult, m.num_res_blocks) == (256, (1, 1, 2, 3, 4), 2)
    assert (m.attention_resolutions, m.num_heads, m.num_head_channels) == ((32, 16, 8), 4, -1)
    assert m.resblock_updown and m.use_scale_shift_norm and m.learn_sigma and m.class_cond
    assert (gd.diffusion.schedule, gd.diffusion.steps, gd.data.resolution) == ("linear", 1000, 128)
    assert (gd.optim.lr, gd.optim.betas, gd.train.batch_size) == (1e-4, (0.8, 0.999), 256)
    assert gd.timesteps.sampler == "uniform" and gd.diffusion.weighting == "none"
    assert (minsnr.diffusion.weighting, minsnr.diffusion.min_snr_gamma) == ("min_snr", 5.0)
    ts = clts.timesteps
    assert (ts.sampler, ts.mu, ts.sigma, ts.target_iteration) == ("clts", 300, 1000, 300_000)
    # Only the method differs between the three rows of Table 2.
    for recipe in (minsnr, clts):
        assert (recipe.model, recipe.data, recipe.optim) == (gd.model, gd.data, gd.optim)


def _imagenet_like_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """Class subfolders of non-square JPEGs, as an ImageNet train/ folder has."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            height, width = rng.integers(20, 60, size=2)
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.JPEG")
    return root


def _tiny_run(name: str, *extra: str) -> Recipe:
    recipe = load_recipe(RECIPES / f"{name}.yaml", [*TINY_ADM, *extra])
    result = train(recipe)
    assert store().get_run(result.run_id).info.status == "FINISHED"
    return recipe


@pytest.mark.parametrize("name", ["cifar10_baseline", "cifar10_fdm", "cifar10_clts"])
def test_cifar10_table_recipes_train_a_few_steps(name: str, one_thread: None) -> None:
    _tiny_run(name, "data.name=synthetic", "diffusion.steps=100", "sample.steps=5")


@pytest.mark.parametrize("name", ["imagenet128_gd", "imagenet128_minsnr", "imagenet128_gd_clts"])
def test_imagenet128_table_recipes_train_on_a_class_folder(
    name: str, isolated_workdir: Path, one_thread: None
) -> None:
    root = _imagenet_like_folder(isolated_workdir / "imagenet" / "train")
    recipe = _tiny_run(name, f"data.root={root}", "sample.steps=5")
    assert recipe.model.class_cond and recipe.data.resolution == 16
