"""The ADM UNet against openai/improved-diffusion's and openai/guided-diffusion's own `UNetModel`:
the reference's weights, loaded into dmstab's network, give the reference's outputs.

The fixtures (tests/models/fixtures/README.md) hold a tiny reference model's random weights,
inputs and outputs, written by a script that imports the reference code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from dmstab.config import load_recipe
from dmstab.models.adm_unet import ADMUNet, AttentionBlock, AttentionOrder, build
from dmstab.published.adm import dmstab_weights
from tests.helpers import QUICKSTART, RECIPES

FIXTURES = Path(__file__).parent / "fixtures"


def load_reference(model: ADMUNet, state: dict[str, Tensor]) -> None:
    """The reference's state dict through dmstab's import mapping (`dmstab.published.adm`):
    every parameter matched, strictly."""
    model.load_state_dict(dmstab_weights(state), strict=True)


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    return data


def adm_unet(config: dict[str, Any], order: AttentionOrder) -> ADMUNet:
    """dmstab's ADM UNet with the reference's constructor arguments."""
    size = config["image_size"]
    return ADMUNet(
        image_size=size,
        in_channels=config["in_channels"],
        model_channels=config["model_channels"],
        out_channels=config["out_channels"],
        num_res_blocks=config["num_res_blocks"],
        # The reference takes downsampling rates; dmstab, as the recipes, pixels.
        attention_resolutions=[size // rate for rate in config["attention_resolutions"]],
        channel_mult=config["channel_mult"],
        dropout=config["dropout"],
        num_heads=config.get("num_heads", 1),  # guided-diffusion's default
        num_head_channels=config.get("num_head_channels", -1),
        use_scale_shift_norm=config["use_scale_shift_norm"],
        resblock_updown=config.get("resblock_updown", False),
        num_classes=config["num_classes"],
        attention_order=order,
    ).eval()


@torch.no_grad()
def outputs(name: str, order: AttentionOrder) -> tuple[Tensor, dict[str, Tensor]]:
    """dmstab's output with `order` on the fixture's weights and inputs, and the reference's."""
    data = fixture(name)
    model = adm_unet(data["config"], order)
    load_reference(model, data["state_dict"])
    return model(data["x"], data["t"], data["y"]), data["outputs"]


MATCHES = [
    ("improved_diffusion_unet", "legacy"),  # improved-diffusion's QKVAttention
    ("guided_diffusion_unet", "legacy"),  # QKVAttentionLegacy
    ("guided_diffusion_unet", "qkv_first"),  # QKVAttention (use_new_attention_order=True)
]
OTHER: dict[AttentionOrder, AttentionOrder] = {"legacy": "qkv_first", "qkv_first": "legacy"}


@pytest.mark.parametrize(("name", "order"), MATCHES)
def test_reference_weights_give_the_reference_outputs(name: str, order: AttentionOrder) -> None:
    # Outputs reach ±5; float32 rounding (fused attention vs the reference's einsums) stays
    # under 1e-5 (measured about 7e-6), the tolerance of float32 summation order.
    out, reference = outputs(name, order)
    torch.testing.assert_close(out, reference[order], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "order"), MATCHES)
def test_the_other_attention_order_gives_other_outputs(name: str, order: AttentionOrder) -> None:
    out, reference = outputs(name, OTHER[order])
    assert (out - reference[order]).abs().max() > 1e-2


def test_every_reference_parameter_has_a_random_value() -> None:
    # A parameter left at its zero initialisation would hide a wrongly mapped one.
    for name in ("improved_diffusion_unet", "guided_diffusion_unet"):
        for key, value in fixture(name)["state_dict"].items():
            assert value.any(), key


@pytest.mark.parametrize(
    ("recipe", "order"),
    [
        (RECIPES / "cifar10_baseline.yaml", "legacy"),  # improved-diffusion's CIFAR-10 model
        (RECIPES / "imagenet128_gd.yaml", "legacy"),  # guided-diffusion's 128x128 model
        (QUICKSTART, "qkv_first"),
    ],
)
def test_recipes_build_their_attention_order(recipe: Path, order: str) -> None:
    with torch.device("meta"):
        model = build(load_recipe(recipe), num_classes=10)
    orders = {m.order for m in model.modules() if isinstance(m, AttentionBlock)}
    assert orders == {order}
