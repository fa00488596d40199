"""Generating images from a trained network: the part `train` and `sample` share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dmstab.diffusion import GaussianDiffusion
from dmstab.diffusion.sampling import NoiseSource, sample_images
from dmstab.plots import save_grid, to_uint8
from dmstab.recipe import Recipe, SampleConfig


def class_labels(first_index: int, count: int, num_classes: int) -> torch.Tensor | None:
    """Image i gets class i mod K, so a seed fixes the labels as well as the noise."""
    if num_classes < 1:
        return None
    return torch.arange(first_index, first_index + count) % num_classes


@torch.no_grad()
def generate_images(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    cfg: SampleConfig,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """`cfg.num_images` uint8 images; image i depends only on (cfg.seed, i) and the model."""
    was_training = model.training
    model.eval()
    batches = []
    try:
        for first in range(0, cfg.num_images, cfg.batch_size):
            count = min(cfg.batch_size, cfg.num_images - first)
            labels = class_labels(first, count, num_classes)
            images = sample_images(
                model,
                diffusion,
                sampler=cfg.sampler,
                num_steps=cfg.steps,
                eta=cfg.eta,
                noise=NoiseSource(cfg.seed, first, count, image_shape),
                device=device,
                y=labels.to(device) if labels is not None else None,
                clip_denoised=cfg.clip_denoised,
                callback=callback,
            )
            batches.append(to_uint8(images).cpu())
    finally:
        model.train(was_training)
    return torch.cat(batches)


def generate_for_recipe(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    recipe: Recipe,
    *,
    dataset_classes: int,
    device: torch.device,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """`generate_images` with the image shape and class count a training recipe implies."""
    resolution = recipe.data.resolution
    return generate_images(
        model,
        diffusion,
        recipe.sample,
        image_shape=(3, resolution, resolution),
        num_classes=dataset_classes if recipe.model.class_cond else 0,
        device=device,
        callback=callback,
    )


def write_samples(images: torch.Tensor, directory: Path, stem: str) -> tuple[Path, Path]:
    """An `.npz` of uint8 NHWC images (key `arr_0`, the layout FID tools read) and a PNG grid."""
    directory.mkdir(parents=True, exist_ok=True)
    npz = directory / f"{stem}.npz"
    np.savez(npz, images.permute(0, 2, 3, 1).numpy())
    grid = save_grid(images[:64], directory / f"{stem}.png")
    return npz, grid
