"""Datasets from a folder of image files or from an .npz array, cropped like guided-diffusion."""

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from dmstab.data.base import ImageDataset, InMemoryDataset, uint8_to_model_range
from dmstab.errors import DmstabError
from dmstab.reading import read_image, read_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
NPZ_IMAGE_KEYS = ("arr_0", "images")
NPZ_LABEL_KEYS = ("arr_1", "labels")
IMAGE_SET_KIND = "image set"

UInt8Array = npt.NDArray[np.uint8]


def center_crop_resize(image: Image.Image, resolution: int) -> UInt8Array:
    """RGB (resolution, resolution, 3) uint8, as guided-diffusion's `center_crop_arr`: halve with
    BOX while the short side is at least 2·resolution, resize with BICUBIC so the short side is
    resolution (long side rounded), then crop the centre."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        width, height = image.size
        image = image.resize((width // 2, height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    width, height = image.size
    image = image.resize(
        (round(width * scale), round(height * scale)), resample=Image.Resampling.BICUBIC
    )
    pixels = np.array(image)
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    return np.ascontiguousarray(pixels[top : top + resolution, left : left + resolution])


def _check_resolution(resolution: int) -> None:
    if resolution < 1:
        raise DmstabError(f"data.resolution must be a positive number of pixels, got {resolution}")


def nhwc_to_nchw(images: UInt8Array) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _load_image(path: Path, resolution: int) -> UInt8Array:
    return center_crop_resize(read_image(path), resolution)


class FolderDataset:
    """Image files read and cropped on demand; only the file list is held in memory."""

    def __init__(
        self, files: list[Path], labels: torch.Tensor, num_classes: int, resolution: int
    ) -> None:
        self.name = "folder"
        self.resolution = resolution
        self.num_classes = num_classes
        self.files = files
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 images in [-1, 1], shape (B, 3, H, W), and int64 labels (B,)."""
        files = [self.files[index] for index in indices.tolist()]
        pixels = np.stack([_load_image(path, self.resolution) for path in files])
        return uint8_to_model_range(nhwc_to_nchw(pixels)), self.labels[indices]


def image_files(folder: Path, *, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_dataset(root: Path, resolution: int) -> ImageDataset:
    """Class subfolders (sorted names give labels 0..K-1), or a flat folder of unlabelled images."""
    _check_resolution(resolution)
    if not root.is_dir():
        raise DmstabError(f"image folder {root} does not exist or is not a folder")
    class_folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose_images = image_files(root, recursive=False)
    suffixes = "/".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
    if class_folders and loose_images:
        raise DmstabError(
            f"{root} holds both images and subfolders; use one subfolder per class "
            "or a flat folder of images"
        )
    if not class_folders:
        if not loose_images:
            raise DmstabError(f"image folder {root} holds no {suffixes} images")
        unlabelled = torch.zeros(len(loose_images), dtype=torch.int64)
        return FolderDataset(loose_images, unlabelled, 0, resolution)
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(class_folders):
        members = image_files(folder, recursive=True)
        if not members:
            raise DmstabError(f"class folder {folder} holds no {suffixes} images")
        files += members
        labels += [label] * len(members)
    return FolderDataset(files, torch.tensor(labels), len(class_folders), resolution)


def _read_npz(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    """The image array and the label array (if any) stored in an .npz file."""
    arrays = read_npz(path, IMAGE_SET_KIND, required=(NPZ_IMAGE_KEYS,), optional=NPZ_LABEL_KEYS)
    images = next(arrays[key] for key in NPZ_IMAGE_KEYS if key in arrays)
    labels = next((arrays[key] for key in NPZ_LABEL_KEYS if key in arrays), None)
    return images, labels


def _checked_labels(path: Path, labels: npt.NDArray[Any], count: int) -> torch.Tensor:
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (count,):
        raise DmstabError(
            f"{path}: labels must be an integer array of shape ({count},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if count and labels.min() < 0:
        raise DmstabError(f"{path}: labels must be non-negative class indices")
    return torch.from_numpy(labels.astype(np.int64))


def read_npz_images(path: Path) -> tuple[UInt8Array, npt.NDArray[Any] | None]:
    """Checked uint8 (N, H, W, 3) images under 'arr_0' or 'images', and labels if present."""
    images, labels = _read_npz(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or not len(images):
        raise DmstabError(
            f"{path}: images must be a non-empty uint8 array (N, H, W, 3), "
            f"got {images.dtype} {images.shape}"
        )
    return images, labels


def npz_dataset(path: Path, resolution: int) -> InMemoryDataset:
    """uint8 (N, H, W, 3) images under 'arr_0' or 'images', optional labels under 'arr_1' or
    'labels'; images of another size are center-cropped and resized to `resolution`."""
    _check_resolution(resolution)
    images, labels = read_npz_images(path)
    if images.shape[1:3] != (resolution, resolution):
        images = np.stack([center_crop_resize(Image.fromarray(i), resolution) for i in images])
    if labels is None:
        label_tensor, num_classes = torch.zeros(len(images), dtype=torch.int64), 0
    else:
        label_tensor = _checked_labels(path, labels, len(images))
        num_classes = int(label_tensor.max()) + 1
    return InMemoryDataset("npz", nhwc_to_nchw(images), label_tensor, num_classes)
