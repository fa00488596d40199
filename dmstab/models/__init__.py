"""Networks named in recipes."""

from __future__ import annotations

from torch import nn

from dmstab.recipe import Recipe


def build_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's network; `num_classes` comes from the dataset (used when class_cond)."""
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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
