"""DCGAN (Radford, Metz & Chintala 2016), the AAAI paper's CIFAR-10 GAN baseline.

Generator: z (as a 1×1 map) → 4×4 by a 4×4 transposed convolution, then stride-2 transposed
convolutions that halve the channels and double the size up to the resolution, batch norm and
ReLU between, tanh at the end. Discriminator: the mirror image with LeakyReLU(0.2), batch norm
on all but the first layer, and a final 4×4 convolution to one logit. No biases (batch norm
follows every hidden layer). With 64 channels at 32×32 and z of 100 dimensions these are the
≈1.07M / ≈0.66M parameter networks the AAAI paper compares against (Table 1).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from dmstab.config import Recipe
from dmstab.errors import DmstabError
from dmstab.models.gan import check_gan, gan_config


def upsamplings(resolution: int) -> int:
    """Stride-2 layers from 4×4 to `resolution` (a power of two, at least 16)."""
    levels = math.log2(resolution / 4) if resolution > 0 else 0.0
    if resolution < 16 or not levels.is_integer():
        raise DmstabError(
            f"DCGAN needs data.resolution a power of two >= 16 (16, 32, 64, ...); got {resolution}"
        )
    return int(levels)


def _init(module: nn.Module) -> None:
    """DCGAN Sec. 4: weights from N(0, 0.02); batch-norm gains from N(1, 0.02)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


class DCGANGenerator(nn.Module):
    """z (N, z_dim) → images (N, 3, R, R) in [−1, 1]; `channels` at the last hidden layer."""

    def __init__(self, resolution: int, z_dim: int, channels: int) -> None:
        super().__init__()
        levels = upsamplings(resolution)
        width = channels * 2 ** (levels - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        for _ in range(levels - 1):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(inplace=True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.z_dim = z_dim
        _init(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(z[:, :, None, None])  # type: ignore[no-any-return]


class DCGANDiscriminator(nn.Module):
    """Images (N, 3, R, R) → logits (N,)."""

    def __init__(self, resolution: int, channels: int) -> None:
        super().__init__()
        levels = upsamplings(resolution)
        layers: list[nn.Module] = [
            nn.Conv2d(3, channels, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = channels
        for _ in range(levels - 1):
            layers += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(images).flatten()  # type: ignore[no-any-return]


def check_recipe(recipe: Recipe) -> None:
    check_gan(gan_config(recipe))
    resolution = recipe.data.resolution
    if recipe.model.class_cond:
        raise DmstabError(
            "DCGAN is unconditional: set model.class_cond false "
            "(model.name biggan is the class-conditional GAN)"
        )
    if resolution < 16 or resolution & (resolution - 1):
        raise DmstabError(f"DCGAN needs data.resolution a power of two >= 16; got {resolution}")


def build_generator(recipe: Recipe, num_classes: int) -> DCGANGenerator:
    g = gan_config(recipe)
    return DCGANGenerator(recipe.data.resolution, g.z_dim, g.g_channels)


def build_discriminator(recipe: Recipe, num_classes: int) -> DCGANDiscriminator:
    return DCGANDiscriminator(recipe.data.resolution, gan_config(recipe).d_channels)
