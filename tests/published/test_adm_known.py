"""The released improved-/guided-diffusion files dmstab knows: their settings make valid recipes,
and the fractional channel multiplier of guided-diffusion's 512x512 model builds its network."""

from __future__ import annotations

import pytest
import torch

import dmstab.commands  # noqa: F401  (registers the samplers and networks recipes name)
from dmstab.config import apply_overrides, from_written
from dmstab.models import build_model, count_parameters
from dmstab.published import FORMATS, KnownFile
from dmstab.published.adm_known import KNOWN_FILES


def test_the_adm_format_knows_its_released_files() -> None:
    assert FORMATS["adm"].known_files == KNOWN_FILES
    assert {known.name for known in KNOWN_FILES} >= {
        "64x64_diffusion.pt",
        "128x128_diffusion.pt",
        "256x256_diffusion.pt",
        "256x256_diffusion_uncond.pt",
        "512x512_diffusion.pt",
    }


@pytest.mark.parametrize("known", KNOWN_FILES, ids=lambda known: known.name)
def test_each_known_files_settings_are_a_valid_recipe(known: KnownFile) -> None:
    recipe = from_written(apply_overrides({"model": {"name": "adm_unet"}}, known.overrides))
    assert known.url.endswith("/" + known.name)
    assert recipe.diffusion.steps in (1000, 4000)
    assert recipe.model.attention_order in ("legacy", "qkv_first")


def test_guided_diffusion_512_network_has_the_reference_parameter_count() -> None:
    # The layout `dmstab import` reads from 512x512_diffusion.pt; 558,997,638 parameters is
    # what guided-diffusion's own UNetModel has with the README's flags (counted by building it).
    (known,) = [k for k in KNOWN_FILES if k.name == "512x512_diffusion.pt"]
    layout = {
        "name": "adm_unet",
        "channels": 256,
        "channel_mult": [0.5, 1, 1, 2, 2, 4, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [32, 16, 8],
        "resblock_updown": True,
        "class_cond": True,
    }
    recipe = from_written(apply_overrides({"model": layout}, known.overrides))
    with torch.device("meta"):
        model = build_model(recipe, num_classes=1000)
    assert count_parameters(model) == 558_997_638
