"""GANs as the AAAI paper's baselines: networks from a recipe, latents, and the losses.

A GAN recipe has `model.name` dcgan or biggan, whose keys (`GanConfig`) include the GAN's
training settings: its loss, the two Adams and the discriminator steps. Its generator plays the
role a diffusion model's network plays elsewhere (`build_model`, checkpoint["model"] and
["ema"]); the discriminator is checkpoint["discriminator"]. Image i's latent z is the first
draw of image i's noise stream (dmstab.diffusion.sampling.NoiseSource), so one seed gives every
GAN with the same z_dim the same z, as it gives every diffusion model the same x_T.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmstab.checkpoint import load_weights
from dmstab.config import ModelConfig, Recipe
from dmstab.diffusion.sampling import NoiseSource
from dmstab.errors import DmstabError
from dmstab.models.network import model_config, network

GanLoss = Literal["bce", "hinge"]


@dataclass(frozen=True)
class GanConfig(ModelConfig):
    """A GAN's keys (AAAI Table 1's baselines): z of `z_dim`, `g_channels`/`d_channels` wide
    networks, each with its own Adam (`g_lr`, `d_lr`, `betas`), `d_steps` discriminator steps
    per generator step, and the `loss` (bce for DCGAN, hinge for BigGAN). The recipe's `optim`,
    `diffusion` and `timesteps` sections are not used."""

    adversarial: ClassVar[bool] = True

    loss: GanLoss = "bce"
    """`bce` (DCGAN's non-saturating loss) or `hinge` (BigGAN)"""
    z_dim: int = 100
    """latent size; biggan splits it into equal chunks, one per generator block plus one"""
    g_channels: int = 64
    """the generator's base width (DCGAN: its last layer; BigGAN: ch)"""
    d_channels: int = 64
    """the discriminator's base width (DCGAN: its first layer; BigGAN: ch)"""
    g_lr: float = 2e-4
    """the generator's Adam learning rate"""
    d_lr: float = 2e-4
    """the discriminator's Adam learning rate"""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam β for both"""
    d_steps: int = 1
    """discriminator updates per generator update"""


def gan_config(recipe: Recipe) -> GanConfig:
    return model_config(recipe, GanConfig)


def check_gan(g: GanConfig) -> None:
    """Sizes and optimiser settings every GAN shares."""
    if min(g.z_dim, g.g_channels, g.d_channels, g.d_steps) < 1:
        raise DmstabError("model.z_dim, g_channels, d_channels and d_steps must be at least 1")
    if g.g_lr <= 0 or g.d_lr <= 0:
        raise DmstabError("model.g_lr and model.d_lr must be positive")
    if not all(0 <= b < 1 for b in g.betas):
        raise DmstabError(f"model.betas {list(g.betas)} must lie in [0, 1)")


def is_gan(recipe: Recipe) -> bool:
    return recipe.model.adversarial


def build_discriminator(recipe: Recipe, num_classes: int) -> nn.Module:
    build = network(recipe.model.name).build_discriminator
    assert build is not None, f"model.name {recipe.model.name} has no discriminator"
    return build(recipe, num_classes)


def discriminator_from_state(state: dict[str, Any], recipe: Recipe, source: Path) -> nn.Module:
    """The checkpoint's discriminator, in eval mode."""
    weights = state.get("discriminator")
    if not isinstance(weights, dict):
        raise DmstabError(f"checkpoint {source} has no discriminator; it is not a GAN checkpoint")
    model = build_discriminator(recipe, int(state.get("num_classes", 0)))
    return load_weights(model, weights, source)


def latent_shape(recipe: Recipe) -> tuple[int, int, int]:
    """The per-image noise shape a GAN draws z from: (z_dim, 1, 1)."""
    return (gan_config(recipe).z_dim, 1, 1)


def latents(noise: NoiseSource) -> Tensor:
    """z (count, z_dim): the first draw of each image's noise stream."""
    return noise.next().flatten(1)


def seeded_latents(recipe: Recipe, first_index: int, count: int, seed: int) -> Tensor:
    """z of images first_index … first_index+count−1 for `seed` (on the CPU)."""
    return latents(NoiseSource(seed, first_index, count, latent_shape(recipe)))


@dataclass(frozen=True, eq=False)
class GanLosses:
    """Scalar means over the batch; differentiable in both networks' parameters."""

    generator: Tensor
    discriminator: Tensor


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, loss: GanLoss) -> Tensor:
    """bce (DCGAN): −log σ(D(x)) − log(1 − σ(D(G(z)))); hinge (BigGAN, Lim & Ye 2017):
    max(0, 1 − D(x)) + max(0, 1 + D(G(z)))."""
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor, loss: GanLoss) -> Tensor:
    """bce: the non-saturating −log σ(D(G(z))) (Goodfellow et al. 2014); hinge: −D(G(z))."""
    if loss == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def gan_losses(
    generator: nn.Module,
    discriminator: nn.Module,
    real: Tensor,
    labels: Tensor | None,
    z: Tensor,
    loss: GanLoss,
) -> GanLosses:
    """Both losses on one batch of real images and one z (the same fake images in both)."""
    fake_logits = discriminator(generator(z, labels), labels)
    real_logits = discriminator(real, labels)
    return GanLosses(
        generator=generator_loss(fake_logits, loss),
        discriminator=discriminator_loss(real_logits, fake_logits, loss),
    )


class GanPair(nn.Module):
    """Generator and discriminator as one module, so one state dict holds both (for
    interpolating whole GANs between checkpoints)."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator


def sample_gan(generator: nn.Module, noise: NoiseSource, labels: Tensor | None) -> Tensor:
    """Images in [−1, 1] for the batch `noise` describes, on the generator's device."""
    device = next(generator.parameters()).device
    with torch.no_grad():
        z = latents(noise).to(device)
        return generator(z, None if labels is None else labels.to(device))  # type: ignore[no-any-return]
