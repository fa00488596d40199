"""`model.name: edm2_unet`: the EDM2 UNet's recipe keys, its checks, and the EDM denoiser it
builds (the UNet in EDM's preconditioning, with its learned uncertainty for the EDM2 loss)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from dmstab.config import Recipe
from dmstab.diffusion.edm import EDMPrecond
from dmstab.models.edm2_unet import EDM2Config, EDM2UNet
from dmstab.models.network import model_config
from dmstab.models.unet_config import UNetConfig, check_unet_layout


@dataclass(frozen=True)
class Edm2Switches:
    """EDM2 Table 1, one switch per row (B..G), and the magnitude-preserving constants.

    Each switch needs the previous one: config X turns on every row up to X. The names are
    EDM2Config's own.
    """

    minor_improvements: bool = True  # B: learned uncertainty u(σ), no attention at 32×32
    streamlined: bool = True  # C
    mp_learned_layers: bool = True  # D
    forced_weight_norm: bool = True  # E
    no_group_norm: bool = True  # F
    mp_fixed_layers: bool = True  # G
    channels_per_head: int = 64
    res_balance: float = 0.3
    attn_balance: float = 0.3
    label_balance: float = 0.5
    concat_balance: float = 0.5
    clip_act: float = 256.0
    logvar_channels: int = 128


@dataclass(frozen=True)
class Edm2UnetConfig(UNetConfig):
    """The UNet keys plus `edm2`, the Table 1 switches and magnitude-preserving constants."""

    formulations: ClassVar[tuple[str, ...]] = ("edm",)

    edm2: Edm2Switches = Edm2Switches()


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
