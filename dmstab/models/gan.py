"""GANs as the AAAI paper's baselines: networks from a recipe, latents, and the losses.

A GAN recipe has `model.name` dcgan or biggan and a `gan:` section. Its generator plays the
role a diffusion model's network plays elsewhere (`build_model`, checkpoint["model"] and
["ema"]); the discriminator is checkpoint["discriminator"]. Image i's latent z is the first
draw of image i's noise stream (dmstab.diffusion.sampling.NoiseSource), so one seed gives every
GAN with the same z_dim the same z, as it gives every diffusion model the same x_T.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmstab.checkpoint import load_weights
from dmstab.config import GAN_MODELS, GanLoss, Recipe
from dmstab.diffusion.sampling import NoiseSource
from dmstab.errors import DmstabError


def is_gan(recipe: Recipe) -> bool:
    return recipe.model.name in GAN_MODELS


def _classes(recipe: Recipe, num_classes: int) -> int:
    return num_classes if recipe.model.class_cond else 0


def build_generator(recipe: Recipe, num_classes: int) -> nn.Module:
    g, resolution = recipe.gan, recipe.data.resolution
    if recipe.model.name == "dcgan":
        from dmstab.models.dcgan import DCGANGenerator

        return DCGANGenerator(resolution, g.z_dim, g.g_channels)
    from dmstab.models.biggan import BigGANGenerator

    classes = _classes(recipe, num_classes)
    return BigGANGenerator(
        resolution, g.z_dim, g.g_channels, classes, g.shared_dim, g.attention_resolution
    )


def build_discriminator(recipe: Recipe, num_classes: int) -> nn.Module:
    g, resolution = recipe.gan, recipe.data.resolution
    if recipe.model.name == "dcgan":
        from dmstab.models.dcgan import DCGANDiscriminator

        return DCGANDiscriminator(resolution, g.d_channels)
    from dmstab.models.biggan import BigGANDiscriminator

    classes = _classes(recipe, num_classes)
    return BigGANDiscriminator(resolution, g.d_channels, classes, g.attention_resolution)


def discriminator_from_state(state: dict[str, Any], recipe: Recipe, source: Path) -> nn.Module:
    """The checkpoint's discriminator, in eval mode."""
    weights = state.get("discriminator")
    if not isinstance(weights, dict):
        raise DmstabError(f"checkpoint {source} has no discriminator; it is not a GAN checkpoint")
    model = build_discriminator(recipe, int(state.get("num_classes", 0)))
    return load_weights(model, weights, source)


def latent_shape(recipe: Recipe) -> tuple[int, int, int]:
    """The per-image noise shape a GAN draws z from: (z_dim, 1, 1)."""
    return (recipe.gan.z_dim, 1, 1)


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
