"""Networks named in recipes; importing this package registers each one as a `model.name`."""

from __future__ import annotations

from torch import nn

from dmstab.config import Recipe
from dmstab.models import adm_unet, biggan, dcgan, edm2_recipe, uvit
from dmstab.models.gan import GanConfig
from dmstab.models.network import network, register_network

register_network("adm_unet", adm_unet.AdmUnetConfig, adm_unet.build, adm_unet.check_recipe)
register_network(
    "edm2_unet", edm2_recipe.Edm2UnetConfig, edm2_recipe.build, edm2_recipe.check_recipe
)
register_network("uvit", uvit.UvitConfig, uvit.build, uvit.check_recipe)
register_network(
    "dcgan",
    GanConfig,
    dcgan.build_generator,
    dcgan.check_recipe,
    build_discriminator=dcgan.build_discriminator,
)
register_network(
    "biggan",
    biggan.BigganConfig,
    biggan.build_generator,
    biggan.check_recipe,
    build_discriminator=biggan.build_discriminator,
)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's network; `num_classes` comes from the dataset (used when class_cond).

    For a GAN it is the generator (`dmstab.models.gan` builds its discriminator). For
    `edm2_unet` it is the EDM denoiser D(x, σ, one-hot labels).
    """
    return network(recipe.model.name).build(recipe, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())
