"""Pre-encoded Stable Diffusion VAE latents: EDM2's ImageNet-512 training data.

Stored latents are *raw*: what sd-vae-ft-mse's encoder returns (no 0.18215 scaling) for pixels
given to it in [0, 1], as EDM2 does (training/encoders.py; NVlabs/edm2 issue 9). The network
sees *final* latents: raw latents mapped per channel to mean 0 and std 0.5 (= σ_data) with
EDM2's ImageNet-512 statistics. Two layouts are read:

- an `.npz` with `latents` (N, C, R, R) floats and optional integer `labels` (N,), in memory;
- a folder as EDM2's dataset tool writes it: one (C, R, R) `.npy` per image, at any depth,
  and an optional `dataset.json` {"labels": [[relative path, label], ...]}, read on demand.

C is 4 (latents) or 8 (EDM2's dataset tool: the encoder's per-pixel mean and std). From 8
channels every batch draws its latents as mean + std·ε, as EDM2's `encode_latents` does, from
torch's global generator, which the training loop seeds from (train.seed, step).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dmstab.config import DataConfig
from dmstab.data.images import _checked_labels
from dmstab.errors import DmstabError
from dmstab.reading import not_a, read_json, read_npy, read_npz

LATENT_CHANNELS = 4
MEAN_STD_CHANNELS = 2 * LATENT_CHANNELS  # EDM2 dataset tool: encoder mean ‖ std
VAE_DOWNSAMPLING = 8  # SD-VAE: a 512×512 image is a 4×64×64 latent
# EDM2 training/encoders.py, StabilityVAEEncoder defaults: per-channel mean and std of raw
# sd-vae-ft-mse latents of ImageNet-512, and the mean and std wanted of the final latents.
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN = 0.0
FINAL_STD = 0.5
PREVIEW_RANGE = 3 * FINAL_STD  # a preview maps ±3 std of final latents onto [-1, 1]

NPZ_LATENT_KEY = "latents"
NPZ_LABEL_KEY = "labels"
LABELS_FILE = "dataset.json"

VAE_NAME = "stabilityai/sd-vae-ft-mse"  # the VAE EDM2 uses
VAE_PATH_VARIABLE = "DMSTAB_VAE_PATH"
VAE_FILES = "config.json and diffusion_pytorch_model.safetensors"
VAE_BATCH = 8  # images per VAE decoder call, as EDM2


class VaeUnavailable(DmstabError):
    """diffusers or the VAE weights are missing on this machine."""


# ---------------------------------------------------------------- normalisation


def _raw_to_final(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and bias (1, 4, 1, 1): final = raw · scale + bias (EDM2 encoders.py)."""
    raw_mean = torch.tensor(RAW_MEAN, dtype=like.dtype, device=like.device)
    raw_std = torch.tensor(RAW_STD, dtype=like.dtype, device=like.device)
    scale = FINAL_STD / raw_std
    bias = FINAL_MEAN - raw_mean * scale
    return scale.view(1, -1, 1, 1), bias.view(1, -1, 1, 1)


def normalise_latents(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (B, 4, R, R) -> final latents, the network's data space."""
    scale, bias = _raw_to_final(raw)
    return raw * scale + bias


def denormalise_latents(final: torch.Tensor) -> torch.Tensor:
    """Final latents (B, 4, R, R) -> raw VAE latents, the inverse of `normalise_latents`."""
    scale, bias = _raw_to_final(final)
    return (final - bias) / scale


def draw_raw_latents(stored: torch.Tensor) -> torch.Tensor:
    """(B, 4, R, R) raw latents from stored ones: as they are, or mean + std·ε from 8 channels."""
    if stored.shape[1] == LATENT_CHANNELS:
        return stored
    mean, std = stored.chunk(2, dim=1)
    return mean + torch.randn_like(mean) * std


# ---------------------------------------------------------------- the dataset


class LatentDataset:
    """An ImageDataset whose batches are final latents (B, 4, R, R) rather than pixels."""

    def __init__(
        self,
        read: Callable[[torch.Tensor], torch.Tensor],
        labels: torch.Tensor,
        num_classes: int,
        resolution: int,
    ) -> None:
        self.name = "latents"
        self.resolution = resolution
        self.num_classes = num_classes
        self.read = read
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 final latents (B, 4, R, R) and int64 labels (B,)."""
        stored = self.read(indices).to(torch.float32)
        return normalise_latents(draw_raw_latents(stored)), self.labels[indices]


def _check_layout(where: str, array: npt.NDArray[Any], resolution: int, batched: bool) -> None:
    """`array` holds finite latents (C, R, R), or (N, C, R, R) when `batched`, at `resolution`."""
    layout = "(N, C, R, R)" if batched else "(C, R, R)"
    shape = array.shape[1:] if batched else array.shape
    if (
        not np.issubdtype(array.dtype, np.floating)
        or len(shape) != 3
        or shape[0] not in (LATENT_CHANNELS, MEAN_STD_CHANNELS)
        or shape[1] != shape[2]
        or (batched and not len(array))
    ):
        raise DmstabError(
            f"{where}: latents must be a non-empty float array {layout} with C = 4 (latents) "
            f"or 8 (mean and std), got {array.dtype} {array.shape}"
        )
    if shape[1] != resolution:
        raise DmstabError(
            f"{where}: latents are {shape[1]}x{shape[1]} but data.resolution is {resolution} "
            "(data.resolution is the latent resolution: 64 for ImageNet-512)"
        )
    if not np.isfinite(array).all():
        raise DmstabError(f"{where}: latents contain NaN or infinite values")
    std = array[:, LATENT_CHANNELS:] if batched else array[LATENT_CHANNELS:]
    if shape[0] == MEAN_STD_CHANNELS and (std < 0).any():
        raise DmstabError(f"{where}: the std channels 4-7 of mean/std latents must be >= 0")


def _unlabelled(count: int) -> tuple[torch.Tensor, int]:
    return torch.zeros(count, dtype=torch.int64), 0


def _labelled(where: Path, labels: npt.NDArray[Any], count: int) -> tuple[torch.Tensor, int]:
    checked = _checked_labels(where, labels, count)
    return checked, int(checked.max()) + 1


def _read_npz_latents(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    arrays = read_npz(path, "latent set", required=(NPZ_LATENT_KEY,), optional=(NPZ_LABEL_KEY,))
    return arrays[NPZ_LATENT_KEY], arrays.get(NPZ_LABEL_KEY)


def npz_latent_dataset(path: Path, resolution: int) -> LatentDataset:
    """Latents (N, 4 or 8, R, R) under `latents` and optional labels under `labels`, in memory."""
    latents, labels = _read_npz_latents(path)
    _check_layout(str(path), latents, resolution, batched=True)
    count = len(latents)
    label_tensor, num_classes = (
        _unlabelled(count) if labels is None else _labelled(path, labels, count)
    )
    stored = torch.from_numpy(latents)
    return LatentDataset(stored.__getitem__, label_tensor, num_classes, resolution)


def _load_npy(path: Path, resolution: int) -> npt.NDArray[Any]:
    latent = read_npy(path, "latent file")
    _check_layout(str(path), latent, resolution, batched=False)
    return latent


class _NpyFiles:
    """Reads a batch from one `.npy` file per image; the first file is checked at once."""

    def __init__(self, files: list[Path], resolution: int) -> None:
        self.files = files
        self.resolution = resolution
        self.channels = int(_load_npy(files[0], resolution).shape[0])

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        latents = []
        for index in indices.tolist():
            latent = _load_npy(self.files[index], self.resolution)
            if latent.shape[0] != self.channels:
                raise DmstabError(
                    f"{self.files[index]} has {latent.shape[0]} channels, "
                    f"{self.files[0]} {self.channels}; one folder holds one kind"
                )
            latents.append(latent)
        return torch.from_numpy(np.stack(latents))


def _folder_labels(root: Path, files: list[Path]) -> tuple[torch.Tensor, int]:
    """Labels from EDM2's `dataset.json` ({"labels": [[path, label], ...] or null}), if any."""
    meta = root / LABELS_FILE
    if not meta.is_file():
        return _unlabelled(len(files))
    content = read_json(meta, "latent labels file")
    if not isinstance(content, dict):
        raise not_a(meta, "latent labels file", 'not a JSON object {"labels": [...]}')
    entries = content.get("labels")
    if entries is None:
        return _unlabelled(len(files))
    try:
        by_name = {str(name): label for name, label in entries}
    except (TypeError, ValueError):
        raise DmstabError(f"{meta}: 'labels' must be a list of [file, label] pairs") from None
    names = [file.relative_to(root).as_posix() for file in files]
    missing = next((name for name in names if name not in by_name), None)
    if missing is not None:
        raise DmstabError(f"{meta} has no label for {missing}")
    return _labelled(meta, np.array([by_name[name] for name in names]), len(files))


def folder_latent_dataset(root: Path, resolution: int) -> LatentDataset:
    """One latent (4 or 8, R, R) per `.npy` file under `root`, in EDM2's dataset-tool layout."""
    files = sorted(root.rglob("*.npy"))
    if not files:
        raise DmstabError(f"latent folder {root} holds no .npy files")
    reader = _NpyFiles(files, resolution)
    labels, num_classes = _folder_labels(root, files)
    return LatentDataset(reader, labels, num_classes, resolution)


def latent_dataset(root: Path, resolution: int) -> LatentDataset:
    """`data.name: latents`: an `.npz` file or a folder of `.npy` files (see the module doc)."""
    if root.is_dir():
        return folder_latent_dataset(root, resolution)
    if not root.is_file():
        raise DmstabError(f"latent data {root} does not exist (an .npz file or a folder of .npy)")
    return npz_latent_dataset(root, resolution)


# ---------------------------------------------------------------- decoding with the SD VAE


def _missing_vae(folder: str | None) -> VaeUnavailable:
    where = (
        f"{VAE_PATH_VARIABLE}={folder} holds no loadable VAE"
        if folder
        else f"the VAE {VAE_NAME} is not in the Hugging Face cache"
    )
    return VaeUnavailable(
        f"{where}; dmstab never downloads weights: put {VAE_FILES} from "
        f"https://huggingface.co/{VAE_NAME} in a folder and set {VAE_PATH_VARIABLE} to it, "
        f"or run `huggingface-cli download {VAE_NAME}` on a machine with internet"
    )


@functools.cache
def _load_vae(source: str) -> Any:
    """diffusers' AutoencoderKL from a local folder or the offline Hugging Face cache."""
    try:
        diffusers = importlib.import_module("diffusers")
    except ImportError:
        raise VaeUnavailable(
            "latent decoding needs `pip install dmstab[latent]` (diffusers)"
        ) from None
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        raise _missing_vae(os.environ.get(VAE_PATH_VARIABLE)) from None
    return vae.eval().requires_grad_(False)


def load_vae(device: torch.device) -> Any:
    """The SD VAE on `device`, from $DMSTAB_VAE_PATH or else the offline Hugging Face cache."""
    folder = os.environ.get(VAE_PATH_VARIABLE)
    source = str(Path(folder).expanduser()) if folder else VAE_NAME
    return _load_vae(source).to(device)


def require_vae(data: DataConfig, device: torch.device) -> None:
    """Stop before any compute when `data` are latents and the VAE that decodes them is missing
    (the optional `latent` extra, or its local weights): one line saying what to install."""
    if data.name == "latents":
        load_vae(device)


def _check_latent_batch(latents: torch.Tensor, data: DataConfig) -> None:
    expected = (LATENT_CHANNELS, data.resolution, data.resolution)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
        raise ValueError(
            f"latents must be (B, {', '.join(map(str, expected))}), got {latents.shape}"
        )


@torch.no_grad()
def decode_with(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, 8R, 8R), from final latents (B, 4, R, R) with a loaded VAE."""
    raw = denormalise_latents(latents.to(torch.float32))
    pixels = torch.cat([vae.decode(batch).sample for batch in torch.split(raw, VAE_BATCH)])
    return pixels.clamp(0, 1) * 2 - 1  # EDM2's VAE pixels are in [0, 1] (encoders.py `decode`)


def decode_latents(latents: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, 8R, 8R), from final latents (B, 4, R, R) of `data`."""
    _check_latent_batch(latents, data)
    return decode_with(load_vae(latents.device), latents)


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """A stand-in picture in [-1, 1], (B, 3, R, R): final latent channels 0-2 over ±3 std."""
    return (latents[:, :3].to(torch.float32) / PREVIEW_RANGE).clamp(-1, 1)


def latent_image_decoder(
    data: DataConfig, device: torch.device, *, preview_without_vae: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final latents -> images in [-1, 1]. The VAE is loaded now, so a missing one fails before
    any sampling; with `preview_without_vae`, a missing VAE gives `latent_preview` instead."""
    try:
        vae = load_vae(device)
    except VaeUnavailable:
        if preview_without_vae:
            return latent_preview
        raise

    def decode(latents: torch.Tensor) -> torch.Tensor:
        _check_latent_batch(latents, data)
        return decode_with(vae, latents)

    return decode
