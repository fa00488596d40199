"""Generating images from a trained network: the part `train`, `sample` and `fid` share.

Image i depends only on (sample.seed, i) and the model: its class is i mod K and its noise
comes from its own NoiseSource stream, whatever the batch split. Under `torchrun` each rank
generates a contiguous share of the indices, so the gathered images equal one process's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmstab.config import Recipe, SampleConfig
from dmstab.data.latents import latent_image_decoder
from dmstab.diffusion import build_diffusion
from dmstab.diffusion.ddpm_sampling import DiscreteSchedule
from dmstab.diffusion.edm import Denoiser
from dmstab.diffusion.edm_sampling import Churn, SigmaSchedule, karras_sigmas
from dmstab.diffusion.objectives import one_hot_labels
from dmstab.diffusion.samplers import find_sampler
from dmstab.diffusion.sampling import NoiseSource, guided, unconditional, with_labels
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError
from dmstab.models.gan import is_gan, latent_shape, sample_gan
from dmstab.plots import save_grid, to_uint8


def class_labels(first_index: int, count: int, num_classes: int) -> torch.Tensor | None:
    """Image i gets class i mod K, so a seed fixes the labels as well as the noise."""
    if num_classes < 1:
        return None
    return torch.arange(first_index, first_index + count) % num_classes


BatchSampler = Callable[[NoiseSource, torch.Tensor | None], torch.Tensor]


def sampler_label(recipe: Recipe, cfg: SampleConfig) -> str:
    """How images were drawn, for file and metric names: "ddim50", "heun32", "gan", or
    "ddpm10-15-20" for sample.sections [10, 15, 20]."""
    if is_gan(recipe):
        return "gan"
    return cfg.sampler + ("-".join(map(str, cfg.sections)) if cfg.sections else str(cfg.steps))


def noise_shape(recipe: Recipe) -> tuple[int, int, int]:
    """Each image's noise draws: x_T's shape for a diffusion model, z's for a GAN."""
    if is_gan(recipe):
        return latent_shape(recipe)
    return (recipe.data.channels, recipe.data.resolution, recipe.data.resolution)


def sampling_schedule(recipe: Recipe, cfg: SampleConfig) -> DiscreteSchedule | SigmaSchedule:
    """What `cfg.sampler` walks: the recipe's β schedule respaced to `cfg.steps` (ddpm
    formulation; by `cfg.sections` when given), or `cfg.steps` Karras noise levels (EDM Eq. 5)
    with optional churn (edm)."""
    if recipe.diffusion.formulation == "edm":
        sigmas = karras_sigmas(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        churn = Churn(cfg.s_churn, cfg.s_min, cfg.s_max, cfg.s_noise) if cfg.s_churn else None
        return SigmaSchedule(sigmas, churn)
    return DiscreteSchedule(
        build_diffusion(recipe),
        cfg.steps,
        eta=cfg.eta,
        clip_denoised=cfg.clip_denoised,
        sections=cfg.sections,
    )


def _batch_sampler(
    model: nn.Module,
    recipe: Recipe,
    cfg: SampleConfig,
    num_classes: int,
    guide: Denoiser | None,
    device: torch.device,
    callback: Callable[[int, int], None] | None,
) -> BatchSampler:
    """(noise, labels) → one batch in data space, float32: the sampler `cfg.sampler` names
    over the model with the batch's labels bound and `guide` mixed in, or a GAN generator's
    G(z, y); the schedule is built once for all batches."""
    if is_gan(recipe):
        return lambda noise, labels: sample_gan(model, noise, labels)
    sampler, schedule = find_sampler(cfg.sampler), sampling_schedule(recipe, cfg)
    one_hot = recipe.diffusion.formulation == "edm"  # the EDM2 UNet takes one-hot labels

    def sample(noise: NoiseSource, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is not None:
            labels = (one_hot_labels(labels, num_classes) if one_hot else labels).to(device)
        bound_guide = None if guide is None else with_labels(guide, labels)
        denoise = guided(with_labels(model, labels), bound_guide, cfg.guidance)
        return sampler(denoise, noise, schedule, callback=callback)

    return sample


@torch.no_grad()
def generated_batches(
    model: nn.Module,
    recipe: Recipe,
    *,
    dataset_classes: int,
    device: torch.device,
    callback: Callable[[int, int], None] | None = None,
    sample: SampleConfig | None = None,
    guide: Denoiser | None = None,
    preview_latents_without_vae: bool = False,
    context: DistributedContext = SINGLE_PROCESS,
) -> Iterator[torch.Tensor]:
    """This rank's share of `sample.num_images` uint8 images (n, 3, H, W) from `model` trained
    with `recipe`, one batch of at most `sample.batch_size` at a time, on `device` (scoring
    feeds them to the feature network where they were made).

    `sample` replaces `recipe.sample` (evaluation draws its own count). `guide` is the guide
    denoiser when `sample.guide` names a checkpoint; `guide: self` uses `model` without labels.
    Latents are decoded with the SD VAE; without one this fails before sampling, unless
    `preview_latents_without_vae` asks for `latent_preview` pictures instead. Under `context`
    every rank samples `context.shard(num_images)`.
    """
    cfg = sample or recipe.sample
    if cfg.num_images < context.world_size:
        raise DmstabError(
            f"{cfg.num_images} images cannot be shared by {context.world_size} ranks; "
            f"sample at least {context.world_size}"
        )
    share = context.shard(cfg.num_images)
    num_classes = dataset_classes if recipe.model.class_cond else 0
    shape = noise_shape(recipe)
    guide_denoiser = unconditional(model) if cfg.guide == "self" else guide
    decode = (
        latent_image_decoder(recipe.data, device, preview_without_vae=preview_latents_without_vae)
        if recipe.data.name == "latents"
        else None
    )
    sample_batch = _batch_sampler(model, recipe, cfg, num_classes, guide_denoiser, device, callback)
    was_training = model.training
    model.eval()
    try:
        for first in range(share.start, share.stop, cfg.batch_size):
            count = min(cfg.batch_size, share.stop - first)
            noise = NoiseSource(cfg.seed, first, count, shape, device)
            labels = class_labels(first, count, num_classes)
            x = sample_batch(noise, labels)
            if decode is not None:
                x = decode(x)
            yield to_uint8(x)
    finally:
        model.train(was_training)


def generate_for_recipe(
    model: nn.Module,
    recipe: Recipe,
    *,
    dataset_classes: int,
    device: torch.device,
    callback: Callable[[int, int], None] | None = None,
    sample: SampleConfig | None = None,
    guide: Denoiser | None = None,
    preview_latents_without_vae: bool = False,
    context: DistributedContext = SINGLE_PROCESS,
) -> torch.Tensor:
    """`sample.num_images` uint8 images (N, 3, H, W) on the CPU, `generated_batches` of every
    rank gathered in index order on each."""
    batches = generated_batches(
        model,
        recipe,
        dataset_classes=dataset_classes,
        device=device,
        callback=callback,
        sample=sample,
        guide=guide,
        preview_latents_without_vae=preview_latents_without_vae,
        context=context,
    )
    images = torch.cat([batch.cpu() for batch in batches])
    return gather_rows(images, device, context)


def gather_rows(
    rows: torch.Tensor, device: torch.device, context: DistributedContext
) -> torch.Tensor:
    """Every rank's `rows` concatenated in rank order, on the device `rows` are on. NCCL
    carries CUDA tensors only, so on CUDA they travel through `device`; gloo uses the CPU."""
    carrier = device if device.type == "cuda" else torch.device("cpu")
    return context.all_gather_cat(rows.to(carrier)).to(rows.device)


def write_samples(images: torch.Tensor, directory: Path, stem: str) -> tuple[Path, Path]:
    """An `.npz` of uint8 NHWC images (key `arr_0`, the layout FID tools read) and a PNG grid."""
    directory.mkdir(parents=True, exist_ok=True)
    npz = directory / f"{stem}.npz"
    np.savez(npz, images.permute(0, 2, 3, 1).numpy())
    grid = save_grid(images[:64], directory / f"{stem}.png")
    return npz, grid
