"""The EDM2 UNet (Karras et al. 2024) with every step of its Table 1 as a switch.

Config A is ADM as EDM builds it (NVlabs/edm `DhariwalUNet`); each later config turns on one
more switch of `EDM2Config`, in the order of Table 1:

- B `minor_improvements`: the learned uncertainty u(σ) of the loss (Sec. 2.1); `config_for`
  also drops attention at 32×32.
- C `streamlined`: no biases (so no shift in the conditioning either), a constant-1 input
  channel, He-uniform init, Fourier noise features, group norms without mean subtraction or
  learned scale, cosine attention.
- D `mp_learned_layers`: weight-normalised convolutions and linear layers (`MPConv`) with unit
  Gaussian init; one-hot labels scaled by √label_dim so their embedding has unit variance.
- E `forced_weight_norm`: stored weights renormalised before each training-mode use.
- F `no_group_norm`: the block of Fig. 2c: resampling and the encoder's 1×1 skip conv moved onto
  the main path, pixel norm on the encoder main path, no group norms, one embedding layer, no
  output nonlinearity.
- G `mp_fixed_layers`: √2 Fourier features, MP-SiLU, MP sums (residual and attention balance
  0.3, label balance 0.5), MP concatenation, zero-initialised gains on the output and on each
  block's conditioning, activations clipped at ±256.

All configs share the skeleton (channel mult [1,2,3,4], 3 blocks per level and 4 in the
decoder, attention heads of 64 channels); sizes and dropout follow NVlabs/edm2's presets.
"""

import itertools
import math
from dataclasses import dataclass, fields
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmstab.errors import DmstabError
from dmstab.models.adm_unet import Resample, resample, timestep_embedding, zero_init
from dmstab.models.mp_layers import FourierFeatures, MPConv, mp_cat, mp_silu, mp_sum, normalize

Flavor = Literal["enc", "dec"]

CONFIG_LETTERS = "ABCDEFG"
# Table 1 rows B..G in order: config X has the switches of every row up to X turned on.
SWITCHES = (
    "minor_improvements",
    "streamlined",
    "mp_learned_layers",
    "forced_weight_norm",
    "no_group_norm",
    "mp_fixed_layers",
)
# Base channels per size (Table 2); ImageNet-64 has S–XL (Table 3).
SIZES: dict[str, dict[str, int]] = {
    "img512": {"XS": 128, "S": 192, "M": 256, "L": 320, "XL": 384, "XXL": 448},
    "img64": {"S": 192, "M": 256, "L": 320, "XL": 384},
}
IMG_CHANNELS = {"img512": 4, "img64": 3}  # SD-VAE latents / RGB, both 64×64
NUM_CLASSES = 1000
ADM_ATTN_RESOLUTIONS = (32, 16, 8)
EDM2_ATTN_RESOLUTIONS = (16, 8)
ADM_DROPOUT = 0.1  # EDM's ADM; configs A–F keep it (Sec. 2.5 disables it from G on)
CONFIG_G_DROPOUT = {"XS": 0.0, "S": 0.0}  # NVlabs/edm2 presets; M and larger keep ADM_DROPOUT
GROUP_NORM_MAX_GROUPS = 32  # EDM's GroupNorm: min(32, channels // 4) groups, eps 1e-5
GROUP_NORM_MIN_CHANNELS = 4
GROUP_NORM_EPS = 1e-5


@dataclass(frozen=True)
class EDM2Switches:
    """EDM2 Table 1, one switch per row (B..G), and the magnitude-preserving constants.

    Each switch needs the previous one: config X turns on every row up to X (SWITCHES). A
    recipe's `model.edm2` section is this dataclass.
    """

    minor_improvements: bool = True
    """Table 1 row B: learned uncertainty u(σ), no attention at 32×32 (all six false: config A)"""
    streamlined: bool = True
    """row C, needs B: architectural streamlining"""
    mp_learned_layers: bool = True
    """row D, needs C: magnitude-preserving learned layers"""
    forced_weight_norm: bool = True
    """row E, needs D: forced weight normalisation (config E's recipe also sets the
    inverse-square-root learning rate, `optim.ref_kimg`)"""
    no_group_norm: bool = True
    """row F, needs E: no group normalisations"""
    mp_fixed_layers: bool = True
    """row G, needs F: magnitude-preserving fixed-function layers"""
    channels_per_head: int = 64
    """attention head width"""
    res_balance: float = 0.3
    """magnitude-preserving sum weight of the residual branch (config G)"""
    attn_balance: float = 0.3
    """magnitude-preserving sum weight of the attention branch (config G)"""
    label_balance: float = 0.5
    """magnitude-preserving sum weight of the label embedding (config G)"""
    concat_balance: float = 0.5
    """magnitude-preserving concatenation weight of the skip connections (config G)"""
    clip_act: float = 256.0
    """activation clip (config G)"""
    logvar_channels: int = 128
    """Fourier features of the learned uncertainty u(σ)"""


@dataclass(frozen=True)
class EDM2Config(EDM2Switches):
    """Architecture of an EDM2-family UNet: its layout and Table 1 switches; the defaults are
    EDM2-S (config G) for ImageNet-512."""

    img_resolution: int = 64
    img_channels: int = 4
    label_dim: int = NUM_CLASSES  # one-hot width; 0 = unconditional
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = EDM2_ATTN_RESOLUTIONS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Recipes give lists; tuples keep the config hashable.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        self._check_switches()
        self._check_numbers()
        self._check_layout()

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels at each resolution level."""
        return tuple(self.model_channels * mult for mult in self.channel_mult)

    @property
    def emb_channels(self) -> int:
        """Embedding width: the widest level (EDM2), which is ADM's 4× base for mult [1,2,3,4]."""
        return max(self.widths)

    def _check_switches(self) -> None:
        for earlier, later in itertools.pairwise(SWITCHES):
            if getattr(self, later) and not getattr(self, earlier):
                raise DmstabError(
                    f"{_key(later)}=true needs {_key(earlier)}=true: Table 1's steps build on "
                    f"each other in the order {', '.join(SWITCHES)}"
                )

    def _check_numbers(self) -> None:
        positive = ("img_resolution", "img_channels", "model_channels", "num_blocks")
        for name in (*positive, "channels_per_head", "logvar_channels"):
            if getattr(self, name) <= 0:
                raise DmstabError(f"{_key(name)}={getattr(self, name)} must be positive")
        if self.label_dim < 0:
            raise DmstabError(f"label_dim={self.label_dim} must be ≥ 0 (0: unconditional)")
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise DmstabError(
                f"{_key('channel_mult')}={list(self.channel_mult)} must be non-empty and positive"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise DmstabError(f"{_key('dropout')}={self.dropout} must be in [0, 1)")
        for name in ("res_balance", "attn_balance", "label_balance", "concat_balance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DmstabError(f"{_key(name)}={getattr(self, name)} must be in [0, 1]")
        if self.clip_act <= 0:
            raise DmstabError(f"{_key('clip_act')}={self.clip_act} must be positive")

    def _check_layout(self) -> None:
        levels = len(self.channel_mult)
        if self.img_resolution % 2 ** (levels - 1):
            raise DmstabError(
                f"{_key('img_resolution')}={self.img_resolution} must be a multiple of "
                f"{2 ** (levels - 1)} for {levels} levels"
            )
        resolutions = [self.img_resolution >> level for level in range(levels)]
        unreachable = sorted(set(self.attn_resolutions) - set(resolutions))
        if unreachable:
            raise DmstabError(
                f"{_key('attn_resolutions')} {unreachable} never occur; the feature maps are "
                f"{resolutions}"
            )
        levels_with_attention = zip(self.widths, resolutions, strict=True)
        attended = {w for w, r in levels_with_attention if r in self.attn_resolutions}
        attended.add(self.widths[-1])  # the decoder's first block always attends
        for width in sorted(attended):
            if width % self.channels_per_head:
                raise DmstabError(
                    f"attention over {width} channels: {_key('channels_per_head')}="
                    f"{self.channels_per_head} must divide it"
                )


# The recipe key behind each EDM2Config field (models/edm2_recipe.py builds the config from a
# recipe), so that an error names what a user sets; img_channels and label_dim follow from
# data.name and model.class_cond and keep their own names.
RECIPE_KEYS = {
    "img_resolution": "data.resolution",
    "model_channels": "model.channels",
    "channel_mult": "model.channel_mult",
    "num_blocks": "model.num_res_blocks",
    "attn_resolutions": "model.attention_resolutions",
    "dropout": "model.dropout",
    **{switch.name: f"model.edm2.{switch.name}" for switch in fields(EDM2Switches)},
}


def _key(name: str) -> str:
    return RECIPE_KEYS.get(name, name)


def config_for(letter: str, size: str, dataset: str = "img512") -> EDM2Config:
    """Table 1 config `letter` (A–G) at Table 2/3 `size` for `dataset` (img512 or img64)."""
    letters = ", ".join(CONFIG_LETTERS)
    if len(letter) != 1 or letter.upper() not in CONFIG_LETTERS:
        raise DmstabError(f"EDM2 config {letter!r}: choose one of {letters}")
    if dataset not in SIZES:
        raise DmstabError(f"EDM2 dataset {dataset!r}: choose one of {', '.join(SIZES)}")
    sizes = SIZES[dataset]
    if size.upper() not in sizes:
        raise DmstabError(f"EDM2 size {size!r} for {dataset}: choose one of {', '.join(sizes)}")
    step = CONFIG_LETTERS.index(letter.upper())
    final = step == len(SWITCHES)
    return EDM2Config(
        img_channels=IMG_CHANNELS[dataset],
        model_channels=sizes[size.upper()],
        attn_resolutions=ADM_ATTN_RESOLUTIONS if step == 0 else EDM2_ATTN_RESOLUTIONS,
        dropout=CONFIG_G_DROPOUT.get(size.upper(), ADM_DROPOUT) if final else ADM_DROPOUT,
        minor_improvements=step >= 1,
        streamlined=step >= 2,
        mp_learned_layers=step >= 3,
        forced_weight_norm=step >= 4,
        no_group_norm=step >= 5,
        mp_fixed_layers=step >= 6,
    )


class GroupRMSNorm(nn.Module):
    """Group norm without mean subtraction or learned scale (config C): x / RMS over the group."""

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.num_groups = num_groups

    def forward(self, x: Tensor) -> Tensor:
        groups = x.reshape(x.shape[0], self.num_groups, -1)
        rms = groups.square().mean(dim=2, keepdim=True)
        normalized: Tensor = groups * torch.rsqrt(rms + GROUP_NORM_EPS)
        return normalized.reshape(x.shape)


@dataclass(frozen=True)
class _Ops:
    """The layers and joins that a config's switches select."""

    config: EDM2Config

    def learned(
        self,
        cin: int,
        cout: int,
        kernel: int | None = None,
        *,
        bias: bool = True,
        zero: bool = False,
    ) -> nn.Module:
        """Conv with a `kernel`×`kernel` kernel, or a linear layer when `kernel` is None.

        A/B: PyTorch's default init (equal to EDM's ADM init), `zero` ones zero-initialised;
        C: no bias, He-uniform init; D+: `MPConv`.
        """
        c = self.config
        if c.mp_learned_layers:
            kernel_shape = () if kernel is None else (kernel, kernel)
            return MPConv(cin, cout, kernel_shape, forced_weight_norm=c.forced_weight_norm)
        with_bias = bias and not c.streamlined
        layer: nn.Linear | nn.Conv2d = (
            nn.Linear(cin, cout, bias=with_bias)
            if kernel is None
            else nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=with_bias)
        )
        if c.streamlined:
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
        elif zero:
            zero_init(layer)
        return layer

    def norm(self, channels: int) -> nn.Module:
        """EDM's group norm (A/B) or its streamlined RMS form (C–E)."""
        groups = min(GROUP_NORM_MAX_GROUPS, channels // GROUP_NORM_MIN_CHANNELS)
        if groups == 0 or channels % groups:
            raise DmstabError(
                f"group norm over {channels} channels needs {groups} groups to divide it "
                f"(configs A–E): choose model.model_channels as a multiple of 32"
            )
        if self.config.streamlined:
            return GroupRMSNorm(groups)
        return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)

    def silu(self, x: Tensor) -> Tensor:
        return mp_silu(x) if self.config.mp_fixed_layers else F.silu(x)

    def add(self, a: Tensor, b: Tensor, balance: float) -> Tensor:
        """G: MP sum with weight `balance` on b; before G: a + b."""
        return mp_sum(a, b, balance) if self.config.mp_fixed_layers else a + b

    def cat(self, main: Tensor, skip: Tensor) -> Tensor:
        if self.config.mp_fixed_layers:
            return mp_cat(main, skip, self.config.concat_balance)
        return torch.cat([main, skip], dim=1)


def _gain(ops: _Ops) -> nn.Parameter | None:
    """G's learned scalar gain, zero at init (Sec. 2.5)."""
    return nn.Parameter(torch.zeros(())) if ops.config.mp_fixed_layers else None


def _apply_gain(x: Tensor, gain: nn.Parameter | None) -> Tensor:
    return x if gain is None else x * gain


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels with heads of `channels_per_head` channels."""

    def __init__(self, channels: int, ops: _Ops) -> None:
        super().__init__()
        c = ops.config
        self.ops = ops
        self.num_heads = channels // c.channels_per_head
        self.norm = nn.Identity() if c.no_group_norm else ops.norm(channels)
        self.qkv = ops.learned(channels, 3 * channels, 1)
        self.proj = ops.learned(channels, channels, 1, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, self.num_heads, -1, 3, height * width)
        if self.ops.config.streamlined:
            qkv = normalize(qkv, dim=2)  # cosine attention (config C): unit-RMS q, k, v
        q, k, v = qkv.permute(3, 0, 1, 4, 2)  # each (B, heads, HW, C/heads)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(2, 3).reshape(batch, channels, height, width)
        return self.ops.add(x, self.proj(attended), self.ops.config.attn_balance)


class ADMBlock(nn.Module):
    """EDM's ADM residual block (Fig. 2b), configs A–E: pre-activation, group norms."""

    def __init__(
        self, cin: int, cout: int, resample_mode: Resample, attention: bool, ops: _Ops
    ) -> None:
        super().__init__()
        c = ops.config
        self.resample_mode: Resample = resample_mode
        self.shift = not c.streamlined  # A/B condition by scale and shift, C+ by scale only
        self.norm0 = ops.norm(cin)
        self.conv0 = ops.learned(cin, cout, 3)
        self.affine = ops.learned(c.emb_channels, cout * (2 if self.shift else 1))
        self.norm1 = ops.norm(cout)
        self.dropout = nn.Dropout(c.dropout)
        self.conv1 = ops.learned(cout, cout, 3, zero=True)
        self.skip = ops.learned(cin, cout, 1) if cin != cout else nn.Identity()
        self.attention = SelfAttention(cout, ops) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resample_mode))
        params = self.affine(emb)[:, :, None, None]
        if self.shift:
            scale, shift = params.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm1(h), scale + 1)
        else:
            h = self.norm1(h) * (params + 1)
        h = self.conv1(self.dropout(F.silu(h)))
        x = self.skip(resample(x, self.resample_mode)) + h
        return x if self.attention is None else self.attention(x)


class EDM2Block(nn.Module):
    """The EDM2 block (Fig. 2c), configs F–G: resampling and encoder skip on the main path."""

    def __init__(
        self,
        cin: int,
        cout: int,
        flavor: Flavor,
        resample_mode: Resample,
        attention: bool,
        ops: _Ops,
    ) -> None:
        super().__init__()
        c = ops.config
        self.ops = ops
        self.flavor: Flavor = flavor
        self.resample_mode: Resample = resample_mode
        self.conv_skip = ops.learned(cin, cout, 1) if cin != cout else None
        self.conv_res0 = ops.learned(cout if flavor == "enc" else cin, cout, 3)
        self.emb_linear = ops.learned(c.emb_channels, cout)
        self.emb_gain = _gain(ops)
        self.dropout = nn.Dropout(c.dropout)
        self.conv_res1 = ops.learned(cout, cout, 3)
        self.attention = SelfAttention(cout, ops) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm (config F)
        y = self.conv_res0(self.ops.silu(x))
        scale = _apply_gain(self.emb_linear(emb), self.emb_gain) + 1
        y = self.ops.silu(y * scale[:, :, None, None])
        y = self.conv_res1(self.dropout(y))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = self.ops.add(x, y, self.ops.config.res_balance)
        if self.attention is not None:
            x = self.attention(x)
        if self.ops.config.mp_fixed_layers:
            x = x.clamp(-self.ops.config.clip_act, self.ops.config.clip_act)
        return x


def _block(
    cin: int, cout: int, flavor: Flavor, resample_mode: Resample, attention: bool, ops: _Ops
) -> nn.Module:
    if ops.config.no_group_norm:
        return EDM2Block(cin, cout, flavor, resample_mode, attention, ops)
    return ADMBlock(cin, cout, resample_mode, attention, ops)


class NoiseLabelEmbedding(nn.Module):
    """Noise level (and one-hot class) → the embedding that conditions every block."""

    def __init__(self, ops: _Ops) -> None:
        super().__init__()
        c = ops.config
        self.ops = ops
        self.noise_channels = c.model_channels
        self.fourier = (
            FourierFeatures(c.model_channels, magnitude_preserving=c.mp_fixed_layers)
            if c.streamlined
            else None  # A/B: ADM's sinusoidal positional embedding
        )
        self.noise0 = ops.learned(c.model_channels, c.emb_channels)
        self.noise1 = None if c.no_group_norm else ops.learned(c.emb_channels, c.emb_channels)
        self.label = ops.learned(c.label_dim, c.emb_channels, bias=False) if c.label_dim else None
        if isinstance(self.label, nn.Linear) and not c.streamlined:
            nn.init.normal_(self.label.weight)  # EDM: kaiming_normal × √label_dim = N(0, 1)
        # D+: one-hot × √label_dim has unit RMS, so a normalised weight gives unit variance.
        self.label_scale = math.sqrt(c.label_dim) if c.mp_learned_layers else 1.0

    def forward(self, noise_labels: Tensor, class_labels: Tensor) -> Tensor:
        if self.fourier is None:
            features = timestep_embedding(noise_labels, self.noise_channels)
        else:
            features = self.fourier(noise_labels)
        emb: Tensor = self.noise0(features)
        if self.noise1 is not None:
            emb = self.noise1(F.silu(emb))
        if self.label is not None:
            label_emb = self.label(class_labels * self.label_scale)
            emb = self.ops.add(emb, label_emb, self.ops.config.label_balance)
        return self.ops.silu(emb)


class Uncertainty(nn.Module):
    """u(σ) of EDM2's loss (Sec. 2.1 / Eq. 21): an MP linear layer on MP Fourier features."""

    def __init__(self, config: EDM2Config) -> None:
        super().__init__()
        self.fourier = FourierFeatures(config.logvar_channels)
        self.linear = MPConv(
            config.logvar_channels, 1, forced_weight_norm=config.forced_weight_norm
        )

    def forward(self, noise_labels: Tensor) -> Tensor:
        """(B,) → (B, 1, 1, 1), to broadcast against per-pixel losses."""
        out: Tensor = self.linear(self.fourier(noise_labels))
        return out.reshape(-1, 1, 1, 1)


class EDM2UNet(nn.Module):
    """The denoiser network F(x; c_noise, class) of EDM2 for one `EDM2Config`."""

    def __init__(self, config: EDM2Config) -> None:
        super().__init__()
        c = config
        ops = _Ops(c)
        self.config = c
        self.ops = ops
        self.embedding = NoiseLabelEmbedding(ops)
        self.uncertainty = Uncertainty(c) if c.minor_improvements else None
        widths = c.widths
        in_channels = c.img_channels + (1 if c.streamlined else 0)  # C+: constant-1 channel
        self.enc_conv = ops.learned(in_channels, widths[0], 3)

        self.encoder = nn.ModuleList()
        skips = [widths[0]]
        cout = widths[0]
        for level, width in enumerate(widths):
            attention = (c.img_resolution >> level) in c.attn_resolutions
            if level > 0:
                self.encoder.append(_block(cout, cout, "enc", "down", False, ops))
                skips.append(cout)
            for _ in range(c.num_blocks):
                self.encoder.append(_block(cout, width, "enc", "none", attention, ops))
                cout = width
                skips.append(cout)

        self.decoder = nn.ModuleList()
        takes_skip: list[bool] = []
        for level, width in reversed(list(enumerate(widths))):
            attention = (c.img_resolution >> level) in c.attn_resolutions
            if level == len(widths) - 1:
                self.decoder.append(_block(cout, cout, "dec", "none", True, ops))
                self.decoder.append(_block(cout, cout, "dec", "none", False, ops))
                takes_skip += [False, False]
            else:
                self.decoder.append(_block(cout, cout, "dec", "up", False, ops))
                takes_skip.append(False)
            for _ in range(c.num_blocks + 1):
                self.decoder.append(
                    _block(cout + skips.pop(), width, "dec", "none", attention, ops)
                )
                cout = width
                takes_skip.append(True)
        self.takes_skip = tuple(takes_skip)

        self.out_norm = None if c.no_group_norm else ops.norm(cout)
        self.out_conv = ops.learned(cout, c.img_channels, 3, zero=True)
        self.out_gain = _gain(ops)

    @overload
    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        return_logvar: Literal[False] = False,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None,
        return_logvar: Literal[True],
    ) -> tuple[Tensor, Tensor]: ...

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        return_logvar: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, img_channels, H, W); noise_labels: c_noise, (B,); class_labels: one-hot
        (B, label_dim), or None for the unconditional (all-zero) label. With `return_logvar`,
        also u(σ) as (B, 1, 1, 1)."""
        labels = self._checked_labels(x, noise_labels, class_labels)
        emb = self.embedding(noise_labels, labels)
        if self.config.streamlined:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        x = self.enc_conv(x)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block, takes_skip in zip(self.decoder, self.takes_skip, strict=True):
            if takes_skip:
                x = self.ops.cat(x, skips.pop())
            x = block(x, emb)
        if self.out_norm is not None:
            x = F.silu(self.out_norm(x))
        out = _apply_gain(self.out_conv(x), self.out_gain)
        if not return_logvar:
            return out
        if self.uncertainty is None:
            raise DmstabError(
                "EDM2 config A has no learned uncertainty u(σ): use config B or later "
                "(model.minor_improvements=true)"
            )
        return out, self.uncertainty(noise_labels)

    def _checked_labels(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None
    ) -> Tensor:
        """Validate the inputs; the class labels to embed (zeros when None)."""
        c = self.config
        batch = x.shape[0]
        downsampling = 2 ** (len(c.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != c.img_channels:
            raise ValueError(f"x must be (B, {c.img_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % downsampling or x.shape[3] % downsampling:
            raise ValueError(f"H and W must be multiples of {downsampling}, got {x.shape[2:]}")
        if noise_labels.shape != (batch,):
            raise ValueError(f"noise_labels must be ({batch},), got {tuple(noise_labels.shape)}")
        if class_labels is None:
            return x.new_zeros(batch, c.label_dim)
        if c.label_dim == 0:
            raise ValueError("class_labels given to an unconditional network (label_dim=0)")
        if class_labels.shape != (batch, c.label_dim):
            raise ValueError(
                f"class_labels must be one-hot ({batch}, {c.label_dim}), "
                f"got {tuple(class_labels.shape)}"
            )
        return class_labels.to(x.dtype)
