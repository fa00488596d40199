"""Networks named in recipes; importing this package registers each one's recipe checks."""

from __future__ import annotations

from torch import nn

from dmstab.config import GAN_MODELS, Recipe, register_model_check
from dmstab.models import adm_unet, biggan, dcgan, edm2_unet, uvit

for _name, _module in (
    ("adm_unet", adm_unet),
    ("edm2_unet", edm2_unet),
    ("uvit", uvit),
    ("dcgan", dcgan),
    ("biggan", biggan),
):
    register_model_check(_name, _module.check_recipe)


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's network; `num_classes` comes from the dataset (used when class_cond).

    For a GAN (`dcgan`, `biggan`) it is the generator. For `edm2_unet` it is the EDM denoiser
    D(x, σ, one-hot labels): the UNet wrapped in EDM's preconditioning, with the UNet's learned
    uncertainty u(σ) for the EDM2 loss.
    """
    if recipe.model.name == "edm2_unet":
        return _edm2_denoiser(recipe, num_classes)
    if recipe.model.name == "uvit":
        return _uvit(recipe, num_classes)
    if (
        recipe.model.name in GAN_MODELS
    ):  # a GAN's generator; dmstab.models.gan builds its discriminator
        from dmstab.models.gan import build_generator

        return build_generator(recipe, num_classes)
    from dmstab.models.adm_unet import ADMUNet

    m = recipe.model
    return ADMUNet(
        image_size=recipe.data.resolution,
        in_channels=3,
        model_channels=m.channels,
        out_channels=6 if m.learn_sigma else 3,
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=m.attention_resolutions,
        channel_mult=m.channel_mult,
        dropout=m.dropout,
        num_heads=m.num_heads,
        num_head_channels=m.num_head_channels,
        use_scale_shift_norm=m.use_scale_shift_norm,
        resblock_updown=m.resblock_updown,
        num_classes=num_classes if m.class_cond else None,
    )


def _edm2_denoiser(recipe: Recipe, num_classes: int) -> nn.Module:
    from dmstab.diffusion.edm import EDMPrecond
    from dmstab.models.edm2_unet import EDM2UNet, edm2_config

    net = EDM2UNet(edm2_config(recipe, num_classes))
    return EDMPrecond(net, sigma_data=recipe.diffusion.sigma_data, uncertainty=net.uncertainty)


def _uvit(recipe: Recipe, num_classes: int) -> nn.Module:
    from dmstab.models.uvit import UViT

    m = recipe.model
    return UViT(
        image_size=recipe.data.resolution,
        in_channels=3,
        out_channels=6 if m.learn_sigma else 3,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        num_classes=num_classes if m.class_cond else None,
        dropout=m.dropout,
    )


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())
