"""Released checkpoints as consistency-group members (`consistency.published`): the Fig. 1b/1c
and Table 1 ImageNet recipes at toy scale, on the reference fixtures saved as released files;
a missing download is one line naming where to get it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmstab.commands.import_model import KIND
from tests.helpers import RECIPES, Runner, one_line_error, store

ADM_FIXTURE = Path(__file__).parents[1] / "models" / "fixtures" / "improved_diffusion_unet.pt"
UVIT_FIXTURE = Path(__file__).parent / "fixtures" / "uvit_reference.pt"
TOY_SAMPLING = [
    "consistency.num_images=2",
    "sample.batch_size=2",
    "sample.steps=5",
    "train.device=cpu",
    "tracking.experiment=tests",
]


def _scores(sampler: str) -> dict[str, object]:
    (scores,) = Path("analyses", "consistency").glob(f"*/{sampler}5/scores.json")
    result: dict[str, object] = json.loads(scores.read_text())
    return result


def _imported_runs() -> int:
    experiments = [e.experiment_id for e in store().search_experiments()]
    return len(store().search_runs(experiments, f"tags.`dmstab.kind` = '{KIND}'"))


@pytest.mark.parametrize(
    ("recipe", "first", "source"),
    [
        ("fig1b_imagenet128_gd_published", "128x128_diffusion.pt", "openaipublic.blob"),
        ("table1_imagenet128_gd_published_consistency", "128x128_diffusion.pt", "openaipublic"),
        ("fig1c_imagenet512_uvit_published", "imagenet512_uvit_large.pth", "drive.google"),
        ("table1_imagenet512_uvit_published_consistency", "imagenet512_uvit_large.pth", "drive"),
    ],
)
def test_a_missing_download_is_one_line_naming_where_to_get_it(
    dmstab: Runner, recipe: str, first: str, source: str
) -> None:
    line = one_line_error(dmstab("consistency", str(RECIPES / f"{recipe}.yaml")))
    assert f"published model models/{first} not found: download it from https://" in line
    assert source in line
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


def test_fig1c_at_toy_scale_imports_each_file_once_and_scores_the_group(dmstab: Runner) -> None:
    """Two copies of one tiny reference U-ViT: the same network from the same noise draws the
    same images, so Eq. 1 gives its cap; a second run reuses both imports."""
    state = torch.load(UVIT_FIXTURE, weights_only=True)["models"]["pixel_cond"]["state_dict"]
    for name in ("large.pth", "huge.pth"):
        torch.save({key: value.float() for key, value in state.items()}, name)
    given = "model.num_heads=2 data.name=synthetic data.resolution=16"
    published = f"consistency.published=['large.pth {given}', 'huge.pth {given}']"
    recipe = str(RECIPES / "fig1c_imagenet512_uvit_published.yaml")
    result = dmstab("consistency", recipe, published, *TOY_SAMPLING)
    assert result.returncode == 0, result.stderr
    scores = _scores("ddim")
    assert scores["labels"] == ["large", "huge"]
    assert scores["identical_pairs"] == scores["pairs"] == 2  # 2 images, 1 pair of models
    assert _imported_runs() == 2
    again = dmstab("consistency", recipe, published, *TOY_SAMPLING)
    assert again.returncode == 0, again.stderr
    assert _imported_runs() == 2  # same files, same settings: the earlier imports


@pytest.mark.slow
def test_fig1b_at_toy_scale_compares_a_released_model_with_one_trained_here(
    dmstab: Runner,
) -> None:
    torch.save(torch.load(ADM_FIXTURE, weights_only=True)["state_dict"], "gd.pt")
    toy = [  # the fixture's layout (tests/models/fixtures/README.md) at 16x16, 100 steps
        "data.name=synthetic", "data.resolution=16", "data.synthetic_size=32",
        "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[8]",
        "model.resblock_updown=false", "model.use_scale_shift_norm=false",
        "diffusion.steps=100", "eval.at=[]",
    ]  # fmt: skip
    layout = ["model.num_heads=4", "model.attention_order=legacy", "model.dropout=0.0"]
    diffusion = ["diffusion.schedule=linear", "diffusion.steps=100", "sample.steps=5"]
    given = " ".join([*layout, *toy[:2], *diffusion])
    result = dmstab(
        "consistency", str(RECIPES / "fig1b_imagenet128_gd_published.yaml"), *toy,
        f"consistency.published=['gd.pt {given}']",
        "consistency.members=['train.seed=1 model.channels=32']",
        "train.steps=2", "train.batch_size=4", "train.precision=fp32", *TOY_SAMPLING,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = _scores("ddpm")
    assert scores["labels"] == ["train.seed=1 model.channels=32", "gd"]
    assert 0 < float(scores["score"]) < float(scores["cap"])  # two different networks
