"""The AAAI stability recipes (Table 1, Figs. 2-4): published numbers and shared training runs.

Paper blocks are checked against the paper's text (../shared/papers) where it is beside the
repository.
"""

from __future__ import annotations

import re

import pytest

from dmstab.analysis.consistency import ConsistencyConfig
from dmstab.analysis.landscape_metrics import LandscapeConfig
from dmstab.commands.consistency import member_recipes
from dmstab.config import fingerprint, load_recipe
from tests.helpers import PAPER_TEXT, RECIPES

TABLE_1_ROWS = {  # recipe stem -> (the row's first cell ends with, its dataset)
    "cifar10_id": ("Improved Diffusion", "Cifar10"),
    "cifar10_dcgan": ("DCGAN", "Cifar10"),
    "imagenet128_gd": ("Guided Diffusion", "ImageNet128"),
    "imagenet128_biggan": ("BigGAN", "ImageNet128"),
    "uvit": ("ViT", "ImageNet512"),
}
MINI_OF = {
    "cifar10_id": "dm",
    "cifar10_dcgan": "dcgan",
    "imagenet128_gd": "gd",
    "imagenet128_biggan": "biggan",
    "uvit": "uvit",
}
needs_paper = pytest.mark.skipif(
    not PAPER_TEXT.is_file(), reason="the paper is not beside the repo"
)


def _table_1() -> dict[tuple[str, str], float]:
    lines = PAPER_TEXT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 1:"))
    rows = {}
    for line in lines[start + 1 : start + 12]:
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) >= 3 and re.fullmatch(r"\d+\.\d+", cells[-1]):
            rows[(cells[0], cells[1])] = float(cells[-1])
    return rows


@needs_paper
@pytest.mark.parametrize("stem", sorted(TABLE_1_ROWS))
def test_table_1_recipes_carry_the_published_consistency(stem: str) -> None:
    suffix, dataset = TABLE_1_ROWS[stem]
    (published,) = [v for (n, d), v in _table_1().items() if n.endswith(suffix) and d == dataset]
    for name in (f"table1_{stem}_consistency", f"mini_table1_{MINI_OF[stem]}_consistency"):
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        assert recipe.paper.others["consistency_psnr"] == published, name
        assert recipe.analysis(ConsistencyConfig).num_images == 32  # the paper's M
        assert len(member_recipes(recipe)) >= 2


@needs_paper
def test_fig_4_recipes_carry_the_published_spectrum() -> None:
    text = PAPER_TEXT.read_text()
    lambdas = [float(v) for v in re.findall(r"\\lambda_1 = ([\d.]+)\$ \(", text)]
    variances = [float(v) for v in re.findall(r"\\sigma\^2 = ([\d.]+)\$ \(", text)]
    assert len(lambdas) == len(variances) == 2  # DMs, then GANs
    expected = {
        "dm_lambda_1": lambdas[0],
        "gan_lambda_1": lambdas[1],
        "dm_variance": variances[0],
        "gan_variance": variances[1],
    }
    for name in (
        "fig4_hessian_cifar10_dm",
        "fig4_hessian_cifar10_dcgan",
        "mini_fig4_hessian_dm",
        "mini_fig4_hessian_dcgan",
    ):
        assert load_recipe(RECIPES / f"{name}.yaml").paper.others == expected, name


@pytest.mark.parametrize("kind", ["dm", "dcgan"])
def test_mini_stability_recipes_share_one_training_run(kind: str) -> None:
    """The analysis sections and keep_checkpoints are outside the fingerprint, so the mini
    figures reuse the seed-0 member of the mini Table 1 group."""
    shared = fingerprint(load_recipe(RECIPES / f"mini_stability_{kind}.yaml"))
    for figure in ("fig2_landscape", "fig3_interpolation", "fig4_hessian"):
        assert fingerprint(load_recipe(RECIPES / f"mini_{figure}_{kind}.yaml")) == shared
    group = load_recipe(RECIPES / f"mini_table1_{kind}_consistency.yaml")
    assert fingerprint(member_recipes(group)[0][1]) == shared


def test_interpolation_recipes_keep_the_checkpoints_they_interpolate() -> None:
    for name in ("fig3_interpolation_cifar10_dm", "fig3_interpolation_cifar10_dcgan"):
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        assert set(recipe.analysis(LandscapeConfig).interpolate) <= set(
            recipe.train.keep_checkpoints
        )
        assert recipe.analysis(LandscapeConfig).interpolate == (
            3910,
            39100,
        )  # epochs 10 and 100 of CIFAR-10
    for kind in ("dm", "dcgan"):
        recipe = load_recipe(RECIPES / f"mini_fig3_interpolation_{kind}.yaml")
        assert set(recipe.analysis(LandscapeConfig).interpolate) <= set(
            recipe.train.keep_checkpoints
        )
