"""A BigGAN-style class-conditional GAN (Brock, Donahue & Simonyan 2019), the AAAI paper's
ImageNet GAN baseline.

What makes it BigGAN (Sec. 3 and Appendix B of the paper):
- a shared class embedding feeding every generator block's conditional batch norm,
- a hierarchical latent: z is split into one chunk for the first linear layer and one per
  block, each concatenated with the shared embedding ("skip-z"),
- residual up/down blocks, one SAGAN self-attention block at `attention_resolution`,
- spectral normalisation of every weight in both networks, orthogonal initialisation,
- a projection discriminator: ψ(Σ ReLU(h)) + ⟨embed(y), Σ ReLU(h)⟩, trained with the hinge loss.
Channel multipliers per resolution follow the paper's Tables 4 and 6 (128: G 16,16,8,4,2,1;
512: G 16,16,8,8,4,2,1,1, attention at 64×64 in both networks) and its CIFAR-10 networks (32:
4,4,4,4). The discriminator reads the generator's widths in reverse, as ajbrock/BigGAN-PyTorch
builds it: its first block maps RGB to ch. The paper's D columns list the same blocks one
width further on (Table 4(b) starts "ch → 2ch"), but the reversed layout is the one that gives
the paper's own D count (88.0M at 128, App. B), so 512 is read the same way. A D block that
neither changes width nor downsamples has an identity shortcut (BigGAN-PyTorch `learnable_sc`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from dmstab.config import Recipe
from dmstab.errors import DmstabError
from dmstab.models.gan import GanConfig, check_gan
from dmstab.models.network import model_config

# Generator widths (× channels) from 4×4 up; the discriminator reads them in reverse.
_WIDTHS = {
    32: (4, 4, 4, 4),
    64: (16, 8, 4, 2, 1),
    128: (16, 16, 8, 4, 2, 1),  # Table 4
    512: (16, 16, 8, 8, 4, 2, 1, 1),  # Table 6: one more block than 256 (Table 5), at 512×512
}


def widths(resolution: int) -> tuple[int, ...]:
    """Generator widths (× `model.g_channels`) from 4×4 up, one more than its blocks."""
    if resolution not in _WIDTHS:
        allowed = ", ".join(map(str, _WIDTHS))
        raise DmstabError(
            f"the BigGAN-style GAN supports data.resolution {allowed}; got {resolution}"
        )
    return _WIDTHS[resolution]


def generator_sizes(resolution: int) -> list[int]:
    """The side of each generator block's output: 8, 16, …, `resolution`."""
    return [4 * 2**i for i in range(1, len(widths(resolution)))]


def discriminator_widths(resolution: int) -> tuple[int, ...]:
    """Discriminator block output widths (× `model.d_channels`): the generator's reversed."""
    return tuple(reversed(widths(resolution)))


def discriminator_downsamplings(resolution: int) -> int:
    """How many leading discriminator blocks halve the size (the rest keep it)."""
    return len(widths(resolution)) - 1 if resolution != 32 else 2  # 32×32: 32 → 8, then 2 more


def discriminator_sizes(resolution: int) -> list[int]:
    """The side of each discriminator block's output, down to 4×4 (8×8 at 32)."""
    down = discriminator_downsamplings(resolution)
    return [resolution // 2 ** min(i + 1, down) for i in range(len(widths(resolution)))]


def z_chunk(resolution: int, z_dim: int) -> int:
    """The size of each of z's chunks: one for the input layer and one per generator block."""
    chunks = len(widths(resolution))
    if z_dim % chunks:
        raise DmstabError(
            f"model.z_dim {z_dim} must split into {chunks} equal chunks (one per generator block "
            f"and one for the input) at resolution {resolution}"
        )
    return z_dim // chunks


def check_attention(attention_resolution: int, sizes: list[int]) -> None:
    """`attention_resolution` is 0 (none) or the output side of one of the blocks."""
    if attention_resolution and attention_resolution not in sizes:
        allowed = sorted(set(sizes))
        raise DmstabError(
            f"model.attention_resolution is {attention_resolution}; 0 or one of {allowed}"
        )


def _check_attention_width(channels: int) -> None:
    if channels < 8:
        raise DmstabError(
            f"self-attention needs at least 8 channels (queries have C/8); it would get "
            f"{channels}: raise model.g_channels/d_channels or set model.attention_resolution 0"
        )


def _normalized(layer: nn.Conv2d | nn.Linear | nn.Embedding) -> nn.Module:
    """Orthogonal initialisation, then spectral normalisation (BigGAN Sec. 4, Appendix C)."""
    nn.init.orthogonal_(layer.weight)
    return spectral_norm(layer)


def _sn_conv(cin: int, cout: int, kernel: int) -> nn.Module:
    return _normalized(nn.Conv2d(cin, cout, kernel, padding=kernel // 2))


def _sn_linear(cin: int, cout: int, bias: bool = True) -> nn.Module:
    return _normalized(nn.Linear(cin, cout, bias=bias))


def _sn_embedding(classes: int, dim: int) -> nn.Module:
    return _normalized(nn.Embedding(classes, dim))


class ConditionalBatchNorm(nn.Module):
    """Batch norm without affine terms, then gain 1 + W_γ·c and bias W_β·c from the block's
    conditioning c = [shared embedding, z chunk] (BigGAN Sec. 3, Fig. 15)."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = _sn_linear(cond_dim, channels, bias=False)
        self.bias = _sn_linear(cond_dim, channels, bias=False)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gain = 1 + self.gain(cond)[:, :, None, None]
        shifted: Tensor = self.norm(x) * gain + self.bias(cond)[:, :, None, None]
        return shifted


class SelfAttention(nn.Module):
    """SAGAN attention (Zhang et al. 2019) as in BigGAN: queries and keys of C/8 channels,
    values of C/2, keys and values max-pooled by 2, and an output gain γ that starts at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        _check_attention_width(channels)
        self.query = _sn_conv(channels, channels // 8, 1)
        self.key = _sn_conv(channels, channels // 8, 1)
        self.value = _sn_conv(channels, channels // 2, 1)
        self.out = _sn_conv(channels // 2, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        query = self.query(x).flatten(2)  # (N, C/8, HW)
        key = F.max_pool2d(self.key(x), 2).flatten(2)  # (N, C/8, HW/4)
        value = F.max_pool2d(self.value(x), 2).flatten(2)  # (N, C/2, HW/4)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # (N, HW, HW/4)
        mixed = (value @ attention.transpose(1, 2)).reshape(n, c // 2, h, w)
        attended: Tensor = x + self.gamma * self.out(mixed)
        return attended


class GeneratorBlock(nn.Module):
    """CBN → ReLU → 2× nearest upsampling → 3×3 conv → CBN → ReLU → 3×3 conv, plus an
    upsampled 1×1-conv shortcut (BigGAN Fig. 15b)."""

    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1 = ConditionalBatchNorm(cin, cond_dim)
        self.conv1 = _sn_conv(cin, cout, 3)
        self.norm2 = ConditionalBatchNorm(cout, cond_dim)
        self.conv2 = _sn_conv(cout, cout, 3)
        self.shortcut = _sn_conv(cin, cout, 1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.norm1(x, cond)), scale_factor=2.0)
        h = self.conv2(F.relu(self.norm2(self.conv1(h), cond)))
        residual: Tensor = h + self.shortcut(F.interpolate(x, scale_factor=2.0))
        return residual


class DiscriminatorBlock(nn.Module):
    """(ReLU) → 3×3 conv → ReLU → 3×3 conv → 2× average pooling, plus a 1×1-conv shortcut
    (BigGAN Fig. 15c); the first block has no leading ReLU, the last ones no pooling, and a
    block that keeps both width and size adds its input unchanged."""

    def __init__(self, cin: int, cout: int, *, downsample: bool, preactivation: bool) -> None:
        super().__init__()
        self.conv1 = _sn_conv(cin, cout, 3)
        self.conv2 = _sn_conv(cout, cout, 3)
        self.shortcut = _sn_conv(cin, cout, 1) if cin != cout or downsample else nn.Identity()
        self.downsample = downsample
        self.preactivation = preactivation

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        if self.preactivation:
            return h + self._pool(self.shortcut(x))
        residual: Tensor = h + self.shortcut(self._pool(x))
        return residual


class BigGANGenerator(nn.Module):
    """(z, y) → images (N, 3, R, R) in [−1, 1]; `num_classes` 0 is unconditional."""

    def __init__(
        self,
        resolution: int,
        z_dim: int,
        channels: int,
        num_classes: int,
        shared_dim: int,
        attention_resolution: int,
    ) -> None:
        super().__init__()
        layout = widths(resolution)
        sizes = generator_sizes(resolution)
        check_attention(attention_resolution, sizes)
        self.chunk = z_chunk(resolution, z_dim)
        self.z_dim = z_dim
        self.shared = _sn_embedding(num_classes, shared_dim) if num_classes else None
        cond_dim = self.chunk + (shared_dim if num_classes else 0)
        self.first_width = layout[0] * channels
        self.linear = _sn_linear(self.chunk, self.first_width * 16)
        self.blocks = nn.ModuleList(
            GeneratorBlock(layout[i] * channels, layout[i + 1] * channels, cond_dim)
            for i in range(len(sizes))
        )
        self.attention = nn.ModuleDict(
            {
                str(i): SelfAttention(layout[i + 1] * channels)
                for i, size in enumerate(sizes)
                if size == attention_resolution
            }
        )
        self.out_norm = nn.BatchNorm2d(layout[-1] * channels)
        self.out = _sn_conv(layout[-1] * channels, 3, 3)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        chunks = torch.split(z, self.chunk, dim=1)
        shared = [self.shared(labels)] if self.shared is not None and labels is not None else []
        h = self.linear(chunks[0]).view(z.shape[0], self.first_width, 4, 4)
        for index, block in enumerate(self.blocks):
            h = block(h, torch.cat([*shared, chunks[index + 1]], dim=1))
            if str(index) in self.attention:
                h = self.attention[str(index)](h)
        return torch.tanh(self.out(F.relu(self.out_norm(h))))


class BigGANDiscriminator(nn.Module):
    """(images, y) → logits (N,), with the projection term ⟨embed(y), h⟩ when conditional."""

    def __init__(
        self, resolution: int, channels: int, num_classes: int, attention_resolution: int
    ) -> None:
        super().__init__()
        downsampling = discriminator_downsamplings(resolution)
        sizes = discriminator_sizes(resolution)
        check_attention(attention_resolution, sizes)
        layers: list[nn.Module] = []
        cin = 3
        for index, width in enumerate(discriminator_widths(resolution)):
            layers.append(
                DiscriminatorBlock(
                    cin, width * channels, downsample=index < downsampling, preactivation=index > 0
                )
            )
            cin = width * channels
            if sizes[index] == attention_resolution and sizes.index(attention_resolution) == index:
                layers.append(SelfAttention(cin))
        self.blocks = nn.Sequential(*layers)
        self.linear = _sn_linear(cin, 1)
        self.embed = _sn_embedding(num_classes, cin) if num_classes else None

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        h = F.relu(self.blocks(images)).sum(dim=(2, 3))
        logits = self.linear(h).flatten()
        if self.embed is not None and labels is not None:
            logits = logits + (self.embed(labels) * h).sum(dim=1)
        return logits  # type: ignore[no-any-return]


@dataclass(frozen=True)
class BigganConfig(GanConfig):
    """The GAN keys plus the shared class embedding's width and where self-attention is."""

    shared_dim: int = 128
    """the shared class embedding's size"""
    attention_resolution: int = 64
    """self-attention at this resolution in both networks (0: none)"""


def check_recipe(recipe: Recipe) -> None:
    g = model_config(recipe, BigganConfig)
    check_gan(g)
    if g.shared_dim < 1:
        raise DmstabError("model.shared_dim must be at least 1")
    check_layout(recipe.data.resolution, g)


def check_layout(resolution: int, g: BigganConfig) -> None:
    """What the constructors would refuse, at load time: the resolution has a layout, z splits
    into its chunks, and attention sits where both networks have a block with 8+ channels."""
    z_chunk(resolution, g.z_dim)
    if not g.attention_resolution:
        return
    g_sizes, d_sizes = generator_sizes(resolution), discriminator_sizes(resolution)
    check_attention(g.attention_resolution, g_sizes)
    check_attention(g.attention_resolution, d_sizes)
    g_width = widths(resolution)[g_sizes.index(g.attention_resolution) + 1]
    d_width = discriminator_widths(resolution)[d_sizes.index(g.attention_resolution)]
    _check_attention_width(g_width * g.g_channels)
    _check_attention_width(d_width * g.d_channels)


def _classes(recipe: Recipe, num_classes: int) -> int:
    return num_classes if recipe.model.class_cond else 0


def build_generator(recipe: Recipe, num_classes: int) -> BigGANGenerator:
    g = model_config(recipe, BigganConfig)
    classes = _classes(recipe, num_classes)
    return BigGANGenerator(
        recipe.data.resolution,
        g.z_dim,
        g.g_channels,
        classes,
        g.shared_dim,
        g.attention_resolution,
    )


def build_discriminator(recipe: Recipe, num_classes: int) -> BigGANDiscriminator:
    g = model_config(recipe, BigganConfig)
    classes = _classes(recipe, num_classes)
    return BigGANDiscriminator(
        recipe.data.resolution, g.d_channels, classes, g.attention_resolution
    )
