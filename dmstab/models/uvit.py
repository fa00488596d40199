"""U-ViT (Bao et al., CVPR 2023, "All are Worth Words: A ViT Backbone for Diffusion Models").

Every input is a token: the noisy image cut into p×p patches (a stride-p conv), the timestep and,
when class-conditional, the label. After learned position embeddings come depth//2 in-blocks,
one mid-block and depth//2 out-blocks; out-block i first merges the output of the matching
in-block through Linear(2D → D) on the concatenation (the long skips). A final LayerNorm, a
Linear to patch pixels, unpatchify and a 3×3 conv give the prediction.

Facts checked in baofff/U-ViT (libs/uvit.py, configs/*.py):
- pre-LayerNorm blocks x + Attn(LN x), x + MLP(LN x); MLP D → mlp_ratio·D → D with exact GELU;
  qkv without bias in every published config;
- tokens are ordered [label, time, patches]; the time token is the sinusoidal timestep embedding
  itself (every published config sets mlp_time_embed=False);
- init: Linear weights truncated normal σ = 0.02, biases 0; position embedding the same;
- the code's `depth` counts half the blocks twice: UViT(depth=12) builds 6 + 1 + 6 = 13. Here
  `depth` is the paper's count of all blocks: U-ViT-S 13 (code 12, width 512, 8 heads), U-ViT-M
  17 (code 16, 768, 12 heads), U-ViT-L 21 (code 20, 1024, 16 heads), U-ViT-H 29 (code 28, 1152,
  16 heads); CIFAR-10 uses U-ViT-S/2 (patch 2), ImageNet-64 M/4 and L/4, ImageNet-512 latents
  L/4 and H/4 (configs/imagenet512_uvit_{large,huge}.py); the latent-space U-ViT-H drops the
  final conv (conv=False): `model.conv_out: false` here;
- its class-conditional latent models have one label embedding more than classes: the last,
  label K, is "no label" for classifier-free guidance (`model.null_class: true` here; a forward
  without labels then uses it, as U-ViT's sampler passes K for the unconditional half);
- the time token embeds the timestep as the network's forward receives it: 999·t for its
  continuous VP SDE (t in (0, 1]), n in 1…1000 for its discrete schedule. dmstab's model time
  is the 0-based step index i (·1000/T), and step i is U-ViT's n = i + 1 (t = (i+1)/1000), so
  its released models are run with `model.time_shift: 1` (embedding i + 1).
Unlike the official model, `out_channels` may be 2 × `in_channels`: ADM's learned Σ.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmstab.config import ModelConfig, Recipe
from dmstab.errors import DmstabError
from dmstab.models.adm_unet import check_timesteps_and_labels, timestep_embedding
from dmstab.models.network import check_dropout, model_config

INIT_STD = 0.02  # U-ViT's truncated-normal init of Linear weights and position embeddings


def check_uvit_config(
    image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float
) -> None:
    """Reject layouts U-ViT cannot build, naming the recipe key to change."""
    if patch_size < 1 or image_size % patch_size:
        raise DmstabError(
            f"model.patch_size {patch_size} must be positive and divide the image size "
            f"{image_size} (data.resolution)"
        )
    if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
        raise DmstabError(
            f"model.embed_dim {embed_dim} must be a positive multiple of model.num_heads "
            f"{num_heads}"
        )
    if depth < 1 or depth % 2 == 0:
        raise DmstabError(
            f"model.depth {depth} must be odd: depth//2 in-blocks, a mid-block, depth//2 "
            "out-blocks (U-ViT-S: 13)"
        )
    if not math.isfinite(mlp_ratio) or embed_dim * mlp_ratio < 1:
        raise DmstabError(
            f"model.mlp_ratio {mlp_ratio} must be finite and give an MLP width "
            f"model.embed_dim × mlp_ratio of at least 1"
        )


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, L, D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x).unflatten(2, (3, self.num_heads, -1))  # (B, L, 3, heads, D/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, D/heads)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out: Tensor = self.dropout(self.proj(attended))
        return out


class TransformerBlock(nn.Module):
    """Pre-LayerNorm ViT block: attention, then an MLP, each added to the residual stream."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, dropout: float
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        out: Tensor = x + self.mlp(self.norm2(x))
        return out


class SkipBlock(nn.Module):
    """An out-block: Linear(2D → D) on [x, skip] (the long skip), then a TransformerBlock."""

    def __init__(self, dim: int, block: TransformerBlock) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim)
        self.block = block

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        out: Tensor = self.block(self.skip_linear(torch.cat([x, skip], dim=-1)))
        return out


class UViT(nn.Module):
    """U-ViT predicting from (x_t, t[, y]), a drop-in for the ADM UNet's forward."""

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int = 3,
        out_channels: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        qkv_bias: bool = False,
        conv_out: bool = True,
        dropout: float = 0.0,
        null_class: bool = False,
        time_shift: float = 0.0,
    ) -> None:
        super().__init__()
        check_uvit_config(image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
        if num_classes is not None and num_classes <= 0:
            raise DmstabError(f"num_classes={num_classes} must be positive (or None)")
        self.image_size, self.patch_size, self.embed_dim = image_size, patch_size, embed_dim
        self.in_channels, self.out_channels = in_channels, out_channels
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        # with null_class, row num_classes is "no label" (classifier-free guidance)
        self.null_label = num_classes if null_class and num_classes is not None else None
        self.label_embed = (
            None if num_classes is None else nn.Embedding(num_classes + null_class, embed_dim)
        )
        self.time_shift = time_shift
        self.extra_tokens = 1 if num_classes is None else 2  # time [+ label]
        patches = (image_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extra_tokens + patches, embed_dim))

        def block() -> TransformerBlock:
            return TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, dropout)

        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([SkipBlock(embed_dim, block()) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.to_pixels = nn.Linear(embed_dim, patch_size**2 * out_channels)
        self.conv_out: nn.Module = (
            nn.Conv2d(out_channels, out_channels, 3, padding=1) if conv_out else nn.Identity()
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, in_channels, H, W) at the built size; t: (B,) timesteps; y: (B,) labels."""
        self._check_inputs(x, t, y)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, HW/p², D)
        time = t + self.time_shift if self.time_shift else t
        tokens = [timestep_embedding(time, self.embed_dim)[:, None], patches]
        if self.label_embed is not None:
            labels = self._null_labels(t) if y is None else y
            tokens.insert(0, self.label_embed(labels)[:, None])
        h = torch.cat(tokens, dim=1) + self.pos_embed
        skips = []
        for in_block in self.in_blocks:
            h = in_block(h)
            skips.append(h)
        h = self.mid_block(h)
        for out_block in self.out_blocks:
            h = out_block(h, skips.pop())
        pixels = self.to_pixels(self.norm(h)[:, self.extra_tokens :])
        out: Tensor = self.conv_out(self._unpatchify(pixels))
        return out

    def _unpatchify(self, pixels: Tensor) -> Tensor:
        """(B, h·w, p·p·C) → (B, C, h·p, w·p), each token's vector laid out (p1, p2, C)."""
        p, side = self.patch_size, self.image_size // self.patch_size
        grid = pixels.reshape(-1, side, side, p, p, self.out_channels)
        return grid.permute(0, 5, 1, 3, 2, 4).reshape(-1, self.out_channels, side * p, side * p)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor | None) -> None:
        batch, size = x.shape[0], self.image_size
        if x.shape[1:] != (self.in_channels, size, size):
            raise ValueError(
                f"x must be (B, {self.in_channels}, {size}, {size}) (position embeddings fix "
                f"the size), got {tuple(x.shape)}"
            )
        # with a null class, labels may be left out: the "no label" token stands in
        conditional = self.label_embed is not None and (y is not None or self.null_label is None)
        check_timesteps_and_labels(t, y, batch, conditional=conditional)

    def _null_labels(self, t: Tensor) -> Tensor:
        """The null class for every image (_check_inputs lets y be None only when there is one)."""
        assert self.null_label is not None
        return torch.full(t.shape, self.null_label, dtype=torch.long, device=t.device)


@dataclass(frozen=True)
class UvitConfig(ModelConfig):
    """`model.name: uvit`, a ddpm backbone; the defaults are U-ViT-S/2 (CIFAR-10)."""

    patch_size: int = 2
    """p×p patches, one token each; must divide `data.resolution`"""
    embed_dim: int = 512
    """token width D, a multiple of `num_heads`"""
    depth: int = 13
    """transformer blocks in all, odd: depth//2 in-blocks, a mid-block, depth//2 out-blocks joined
    to the in-blocks by long skips"""
    num_heads: int = 4
    """attention heads"""
    mlp_ratio: float = 4.0
    """MLP width / D"""
    qkv_bias: bool = False
    """a bias on the attention's q, k, v projection (every published U-ViT config: false)"""
    dropout: float = 0.3
    """dropout in the transformer blocks"""
    learn_sigma: bool = True
    """learn Σ, as `adm_unet`"""
    conv_out: bool = True
    """the final 3×3 conv on the unpatchified output (the official `conv`; `false` for U-ViT-H/4 on
    latents)"""
    null_class: bool = False
    """with `class_cond`: one more label embedding, "no label" (the official K-th class, for
    classifier-free guidance); a forward call without labels uses it"""
    time_shift: float = 0.0
    """added to the model time before its embedding (U-ViT's released models: 1, as they embed
    the step n = i + 1)"""

    def learns_variance(self) -> bool:
        return self.learn_sigma


def check_recipe(recipe: Recipe) -> None:
    m = model_config(recipe, UvitConfig)
    check_dropout(m.dropout)
    check_uvit_config(
        recipe.data.resolution, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio
    )
    if recipe.train.magnitudes_every:
        raise DmstabError(
            "train.magnitudes_every works for adm_unet and edm2_unet, not uvit (set it to 0)"
        )


def build(recipe: Recipe, num_classes: int) -> UViT:
    m = model_config(recipe, UvitConfig)
    channels = recipe.data.channels
    return UViT(
        image_size=recipe.data.resolution,
        in_channels=channels,
        out_channels=2 * channels if m.learn_sigma else channels,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        num_classes=num_classes if m.class_cond else None,
        qkv_bias=m.qkv_bias,
        conv_out=m.conv_out,
        dropout=m.dropout,
        null_class=m.null_class,
        time_shift=m.time_shift,
    )
