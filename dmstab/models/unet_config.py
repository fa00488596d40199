"""The recipe keys both UNets read (ADM and EDM2): width, levels, blocks, attention, dropout."""

from __future__ import annotations

from dataclasses import dataclass

from dmstab.config import ModelConfig
from dmstab.errors import DmstabError
from dmstab.models.network import check_dropout


@dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """`channels` × `channel_mult[i]` at level i, `num_res_blocks` per level, self-attention at
    the `attention_resolutions` (in pixels), `dropout` in the residual blocks."""

    channels: int = 128
    """base width"""
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    """width multiplier per level; `data.resolution` must be divisible by 2^(levels−1)"""
    num_res_blocks: int = 3
    """residual blocks per level"""
    attention_resolutions: tuple[int, ...] = (16, 8)
    """feature-map sizes (pixels) with self-attention"""
    dropout: float = 0.3
    """dropout in residual blocks"""


def check_unet_layout(m: UNetConfig, resolution: int) -> None:
    """Positive sizes, and an image that halves cleanly at every level."""
    check_dropout(m.dropout)
    if m.channels < 1:
        raise DmstabError("model.channels must be positive")
    if len(m.channel_mult) < 1:
        raise DmstabError("model.channel_mult needs at least one level")
    if min(m.channel_mult) <= 0:
        raise DmstabError("model.channel_mult entries must be positive")
    if m.num_res_blocks < 1:
        raise DmstabError("model.num_res_blocks must be at least 1")
    factor = 2 ** (len(m.channel_mult) - 1)
    if resolution % factor:
        raise DmstabError(
            f"data.resolution {resolution} must be divisible by 2^(levels-1) = {factor} for "
            f"model.channel_mult {list(m.channel_mult)}"
        )
