"""The UNet of improved-diffusion (Nichol & Dhariwal 2021) with guided-diffusion's extras ("ADM").

Layout, channel bookkeeping and initialisation follow openai/improved-diffusion `UNetModel`, so
parameter counts match (CIFAR-10 model: 52,546,438); `num_head_channels` and `resblock_updown`
follow openai/guided-diffusion, and so does the choice of how the attention's qkv channels split
(`AttentionOrder`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmstab.config import Recipe
from dmstab.errors import DmstabError
from dmstab.models.network import model_config
from dmstab.models.unet_config import UNetConfig, check_unet_layout

GROUP_NORM_GROUPS = 32
Resample = Literal["none", "down", "up"]
# How the 3·C qkv channels split into heads: guided-diffusion's `QKVAttentionLegacy` (improved-
# diffusion's `QKVAttention`, and every released improved-/guided-diffusion checkpoint) reads them
# as (heads, 3, C/heads); guided-diffusion's `QKVAttention` (`use_new_attention_order=True`) as
# (3, heads, C/heads).
AttentionOrder = Literal["legacy", "qkv_first"]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def check_timesteps_and_labels(t: Tensor, y: Tensor | None, batch: int, conditional: bool) -> None:
    """A backbone's t is (B,); y (B,) is given exactly when the network is class-conditional."""
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    if (y is None) == conditional:
        raise ValueError("y (class labels) must be given if and only if num_classes is set")
    if y is not None and y.shape != (batch,):
        raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t·f_j), sin(t·f_j)], f_j = max_period^(−j/half), zero-padded."""
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    angles = t.float()[:, None] * torch.exp(-math.log(max_period) * exponents)
    return F.pad(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1), (0, dim % 2))


def zero_init(module: ModuleT) -> ModuleT:
    """Zero every parameter of `module` (improved-diffusion's `zero_module`)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def resample(x: Tensor, mode: Resample) -> Tensor:
    """Parameter-free 2× resampling of a BigGAN-style ResBlock: average pool / nearest."""
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep conditioning, GroupNorm-SiLU-dropout-zero conv, skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        use_scale_shift_norm: bool,
        resample_mode: Resample = "none",
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample_mode: Resample = resample_mode
        self.in_norm = nn.GroupNorm(GROUP_NORM_GROUPS, in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        emb_width = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_proj = nn.Linear(emb_channels, emb_width)
        self.out_norm = nn.GroupNorm(GROUP_NORM_GROUPS, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # guided-diffusion resamples between the input activation and the input conv.
        h = resample(F.silu(self.in_norm(x)), self.resample_mode)
        h = self.in_conv(h)
        cond = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = cond.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + cond)
        residual: Tensor = self.out_conv(self.dropout(F.silu(h)))
        skip: Tensor = self.skip(resample(x, self.resample_mode))
        return skip + residual


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels with a zero-initialised output projection; the qkv
    projection's channels split into heads in `order` (see `AttentionOrder`)."""

    def __init__(self, channels: int, num_heads: int, order: AttentionOrder = "qkv_first") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.order: AttentionOrder = order
        self.norm = nn.GroupNorm(GROUP_NORM_GROUPS, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(tokens)  # (B, HW, 3C)
        head_channels = channels // self.num_heads
        if self.order == "legacy":  # QKVAttentionLegacy: (heads, 3, C/heads)
            qkv = qkv.unflatten(2, (self.num_heads, 3, head_channels)).transpose(2, 3)
        else:  # QKVAttention: (3, heads, C/heads)
            qkv = qkv.unflatten(2, (3, self.num_heads, head_channels))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, HW, C/heads)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out: Tensor = self.proj_out(attended)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(batch, channels, height, width)  # a view


class Stage(nn.ModuleList):
    """improved-diffusion's `TimestepEmbedSequential`: ResBlocks also receive the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


@dataclass(frozen=True)
class _BlockFactory:
    """Builds blocks sharing the model-wide settings."""

    emb_channels: int
    dropout: float
    use_scale_shift_norm: bool
    num_heads: int
    num_head_channels: int
    attention_order: AttentionOrder

    def res(self, in_channels: int, out_channels: int, mode: Resample = "none") -> ResBlock:
        return ResBlock(
            in_channels,
            out_channels,
            self.emb_channels,
            self.dropout,
            self.use_scale_shift_norm,
            mode,
        )

    def attention(self, channels: int) -> AttentionBlock:
        return AttentionBlock(channels, self.heads_for(channels), self.attention_order)

    def heads_for(self, channels: int) -> int:
        """guided-diffusion: num_head_channels > 0 overrides num_heads."""
        if self.num_head_channels > 0:
            divisor, heads = self.num_head_channels, channels // self.num_head_channels
        else:
            divisor, heads = self.num_heads, self.num_heads
        if divisor <= 0 or channels % divisor != 0:
            raise DmstabError(
                f"attention on {channels} channels: num_heads={self.num_heads} / "
                f"num_head_channels={self.num_head_channels} must be positive and divide it"
            )
        return heads


def _check_config(
    image_size: int,
    model_channels: int,
    channel_mult: Sequence[float],
    attention_resolutions: Sequence[int],
) -> None:
    """Reject configurations improved-diffusion would build wrongly or not at all."""
    if not channel_mult or min(channel_mult) <= 0 or model_channels <= 0:
        raise DmstabError(
            f"model_channels={model_channels}, channel_mult={list(channel_mult)}: "
            "need a non-empty list of positive multipliers and positive model_channels"
        )
    if any(mult * model_channels % GROUP_NORM_GROUPS != 0 for mult in channel_mult):
        raise DmstabError(
            f"model_channels × channel_mult = {[m * model_channels for m in channel_mult]}: "
            f"every level's width must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm groups)"
        )
    downsamplings = 2 ** (len(channel_mult) - 1)
    if image_size <= 0 or image_size % downsamplings != 0:
        raise DmstabError(
            f"image_size={image_size} must be a positive multiple of {downsamplings} "
            f"for {len(channel_mult)} levels"
        )
    resolutions = [image_size // 2**level for level in range(len(channel_mult))]
    unreachable = sorted(set(attention_resolutions) - set(resolutions))
    if unreachable:
        raise DmstabError(
            f"attention_resolutions {unreachable} never occur; the feature maps are {resolutions}"
        )


class ADMUNet(nn.Module):
    """improved-diffusion's `UNetModel`, predicting from (x_t, t[, y])."""

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int = 3,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[float],
        dropout: float = 0.0,
        num_heads: int = 4,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        num_classes: int | None = None,
        attention_order: AttentionOrder = "qkv_first",
    ) -> None:
        super().__init__()
        _check_config(image_size, model_channels, channel_mult, attention_resolutions)
        if num_classes is not None and num_classes <= 0:
            raise DmstabError(f"num_classes={num_classes} must be positive (or None)")
        orders = get_args(AttentionOrder)
        if attention_order not in orders:
            raise DmstabError(f"attention_order={attention_order!r}; allowed: {', '.join(orders)}")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.downsampling = 2 ** (len(channel_mult) - 1)
        emb_channels = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels),
            nn.SiLU(),
            nn.Linear(emb_channels, emb_channels),
        )
        self.label_embed = None if num_classes is None else nn.Embedding(num_classes, emb_channels)
        blocks = _BlockFactory(
            emb_channels,
            dropout,
            use_scale_shift_norm,
            num_heads,
            num_head_channels,
            attention_order,
        )
        # script_util.py: attention resolutions in pixels become downsampling rates.
        attention_rates = {image_size // resolution for resolution in attention_resolutions}
        # guided-diffusion: int(mult · model_channels); its 512x512 model starts at mult 0.5.
        widths = [int(mult * model_channels) for mult in channel_mult]
        last_level = len(widths) - 1

        ch = widths[0]
        self.encoder = nn.ModuleList([Stage([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        rate = 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [blocks.res(ch, width)]
                ch = width
                if rate in attention_rates:
                    layers.append(blocks.attention(ch))
                self.encoder.append(Stage(layers))
                skip_channels.append(ch)
            if level != last_level:
                down = (
                    blocks.res(ch, ch, "down")
                    if resblock_updown
                    else nn.Conv2d(ch, ch, 3, stride=2, padding=1)
                )
                self.encoder.append(Stage([down]))
                skip_channels.append(ch)
                rate *= 2

        self.middle = Stage([blocks.res(ch, ch), blocks.attention(ch), blocks.res(ch, ch)])

        self.decoder = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                layers = [blocks.res(ch + skip_channels.pop(), width)]
                ch = width
                if rate in attention_rates:
                    layers.append(blocks.attention(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(
                        blocks.res(ch, ch, "up")
                        if resblock_updown
                        else nn.Sequential(
                            nn.Upsample(scale_factor=2.0, mode="nearest"),
                            nn.Conv2d(ch, ch, 3, padding=1),
                        )
                    )
                    rate //= 2
                self.decoder.append(Stage(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(GROUP_NORM_GROUPS, ch),
            nn.SiLU(),
            zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, in_channels, H, W); t: (B,) float timesteps; y: (B,) labels iff conditional."""
        self._check_inputs(x, t, y)
        emb: Tensor = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        skips = []
        h = x
        for stage in self.encoder:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.decoder:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        out: Tensor = self.out(h)
        return out

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor | None) -> None:
        batch = x.shape[0]
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.downsampling or x.shape[3] % self.downsampling:
            raise ValueError(f"H and W must be multiples of {self.downsampling}, got {x.shape[2:]}")
        check_timesteps_and_labels(t, y, batch, conditional=self.label_embed is not None)


@dataclass(frozen=True)
class AdmUnetConfig(UNetConfig):
    """`model.name: adm_unet`: attention with `num_heads` heads (or heads of
    `num_head_channels` channels, guided-diffusion), FiLM conditioning
    (`use_scale_shift_norm`), resampling in residual blocks (`resblock_updown`), a learned
    reverse-process variance (`learn_sigma`, improved DDPM Sec. 3.1), and the order in which
    attention splits its qkv channels (`attention_order`, see `AttentionOrder`)."""

    # A multiplier may be a fraction whose width is whole: guided-diffusion's 512x512 model has
    # channel_mult (0.5, 1, 1, 2, 2, 4, 4) on 256 channels (its first level 128 wide). Whole
    # multipliers stay ints, so the recipes' params and fingerprints are unchanged; the shared
    # layout check (check_unet_layout) reads either.
    channel_mult: tuple[int | float, ...] = (1, 2, 2, 2)  # type: ignore[assignment]
    num_heads: int = 4
    """attention heads (when `num_head_channels` is not > 0)"""
    num_head_channels: int = -1
    """channels per attention head when > 0 (guided-diffusion), overriding `num_heads`"""
    attention_order: AttentionOrder = "qkv_first"
    """how attention splits its qkv projection's 3·C channels: `legacy` as (heads, 3, C/heads),
    improved-diffusion's `QKVAttention` and guided-diffusion's `QKVAttentionLegacy` (their
    released models; the recipes built on `cifar10_base.yaml` and `imagenet128_base.yaml`);
    `qkv_first` as (3, heads, C/heads), guided-diffusion's `QKVAttention`
    (`use_new_attention_order=True`). Same parameters, different networks: with several heads a
    checkpoint gives other outputs in the other order"""
    use_scale_shift_norm: bool = True
    """FiLM-style timestep conditioning"""
    resblock_updown: bool = False
    """BigGAN-style resampling residual blocks (guided-diffusion)"""
    learn_sigma: bool = True
    """learn Σ; trains with the hybrid loss L_simple + VB·T/1000"""

    def learns_variance(self) -> bool:
        return self.learn_sigma


def check_recipe(recipe: Recipe) -> None:
    """The UNet layout, and every level's width split into GroupNorm's 32 groups."""
    m = model_config(recipe, AdmUnetConfig)
    check_unet_layout(m, recipe.data.resolution)
    if m.channels % 32 or any(m.channels * k % 32 for k in m.channel_mult):
        raise DmstabError(
            f"model.channels {m.channels} x channel_mult must be multiples of 32 (GroupNorm(32))"
        )


def build(recipe: Recipe, num_classes: int) -> ADMUNet:
    """The recipe's ADM UNet; `num_classes` from the dataset (used when `class_cond`)."""
    m = model_config(recipe, AdmUnetConfig)
    channels = recipe.data.channels
    return ADMUNet(
        image_size=recipe.data.resolution,
        in_channels=channels,
        model_channels=m.channels,
        out_channels=2 * channels if m.learn_sigma else channels,
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=m.attention_resolutions,
        channel_mult=m.channel_mult,
        dropout=m.dropout,
        num_heads=m.num_heads,
        num_head_channels=m.num_head_channels,
        use_scale_shift_norm=m.use_scale_shift_norm,
        resblock_updown=m.resblock_updown,
        num_classes=num_classes if m.class_cond else None,
        attention_order=m.attention_order,
    )
