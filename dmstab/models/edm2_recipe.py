"""`model.name: edm2_unet`: the EDM2 UNet's recipe keys, its checks, and the EDM denoiser it
builds (the UNet in EDM's preconditioning, with its learned uncertainty for the EDM2 loss)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from dmstab.config import Recipe
from dmstab.diffusion.edm import EDMPrecond
from dmstab.models.edm2_unet import EDM2Config, EDM2Switches, EDM2UNet
from dmstab.models.network import model_config
from dmstab.models.unet_config import UNetConfig, check_unet_layout


@dataclass(frozen=True)
class Edm2UnetConfig(UNetConfig):
    """The UNet keys plus `edm2`, the Table 1 switches and magnitude-preserving constants."""

    formulations: ClassVar[tuple[str, ...]] = ("edm",)

    edm2: EDM2Switches = field(default_factory=EDM2Switches)


def edm2_config(recipe: Recipe, num_classes: int) -> EDM2Config:
    """The EDM2Config a recipe's `model` section describes; building it runs the network's own
    layout and switch checks."""
    m = model_config(recipe, Edm2UnetConfig)
    return EDM2Config(
        img_resolution=recipe.data.resolution,
        img_channels=recipe.data.channels,
        label_dim=num_classes if m.class_cond else 0,
        model_channels=m.channels,
        channel_mult=m.channel_mult,
        num_blocks=m.num_res_blocks,
        attn_resolutions=m.attention_resolutions,
        dropout=m.dropout,
        **dataclasses.asdict(m.edm2),
    )


def check_recipe(recipe: Recipe) -> None:
    check_unet_layout(model_config(recipe, Edm2UnetConfig), recipe.data.resolution)
    edm2_config(recipe, num_classes=1)


def build(recipe: Recipe, num_classes: int) -> nn.Module:
    """The EDM denoiser D(x, σ, one-hot labels) around the recipe's EDM2 UNet."""
    net = EDM2UNet(edm2_config(recipe, num_classes))
    return EDMPrecond(net, sigma_data=recipe.diffusion.sigma_data, uncertainty=net.uncertainty)
