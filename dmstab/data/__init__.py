"""Datasets named in recipes: `synthetic` (embedded), `cifar10`, `folder`, `npz`, `latents`."""

from __future__ import annotations

from pathlib import Path

from dmstab.config import DataConfig
from dmstab.data.base import ImageDataset, resident
from dmstab.errors import DmstabError


def build_dataset(cfg: DataConfig) -> ImageDataset:
    if cfg.name == "synthetic":
        from dmstab.data.synthetic import synthetic_dataset

        return synthetic_dataset(cfg.synthetic_size, cfg.resolution, cfg.synthetic_seed)
    assert cfg.root is not None  # recipe validation requires a root for every other dataset
    root = Path(cfg.root).expanduser()
    if cfg.name == "cifar10":
        from dmstab.data.cifar10 import cifar10_dataset

        if cfg.resolution != 32:
            raise DmstabError(f"data.resolution is {cfg.resolution}; CIFAR-10 images are 32x32")
        return cifar10_dataset(root, download=cfg.download)
    if cfg.name == "latents":
        from dmstab.data.latents import latent_dataset

        return latent_dataset(root, cfg.resolution)
    from dmstab.data.images import folder_dataset, npz_dataset

    if cfg.name == "folder":
        return folder_dataset(root, cfg.resolution)
    return npz_dataset(root, cfg.resolution)


__all__ = ["ImageDataset", "build_dataset", "resident"]
