"""The dataset interface the training loop draws batches from, its in-memory form, and how a
batch reaches the training device: a small in-memory dataset moves there once (`resident`),
other batches travel from pinned memory without waiting (`upload`)."""

from typing import Protocol, runtime_checkable

import torch

from dmstab.devices import upload


@runtime_checkable
class ImageDataset(Protocol):
    """Images addressed by index; the training loop draws the indices and flips the images."""

    name: str
    resolution: int
    num_classes: int  # 0 when unlabelled

    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 images in [-1, 1], shape (B, 3, H, W), and int64 labels (B,)."""
        ...


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels 0..255 to float32 in [-1, 1] (x / 127.5 - 1, as guided-diffusion does)."""
    return images.to(torch.float32) / 127.5 - 1.0


class InMemoryDataset:
    """An ImageDataset over a uint8 (N, 3, H, W) tensor and int64 labels (N,), held in memory."""

    def __init__(
        self, name: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {images.dtype} {images.shape}"
            )
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be square, got {images.shape[2]}x{images.shape[3]}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 ({images.shape[0]},), got {labels.dtype}")
        if len(labels) > 0 and (int(labels.min()) < 0 or int(labels.max()) >= max(num_classes, 1)):
            raise ValueError(f"labels must lie in 0..{max(num_classes - 1, 0)}")
        self.name = name
        self.resolution = int(images.shape[2])
        self.num_classes = num_classes
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 images in [-1, 1], shape (B, 3, H, W), and int64 labels (B,), on the device
        the dataset is held on."""
        indices = upload(indices, self.images.device)
        return uint8_to_model_range(self.images[indices]), self.labels[indices]


RESIDENT_BYTES = 2 << 30  # in-memory datasets up to 2 GiB (CIFAR-10: 150 MiB) move to the GPU


def resident(dataset: ImageDataset, device: torch.device) -> ImageDataset:
    """`dataset`, held on the CUDA `device` when it is an in-memory one of RESIDENT_BYTES or
    less: batches are then gathered there (the same pixels and order as on the host)."""
    if device.type != "cuda" or not isinstance(dataset, InMemoryDataset):
        return dataset
    if dataset.images.numel() > RESIDENT_BYTES:
        return dataset
    dataset.images, dataset.labels = dataset.images.to(device), dataset.labels.to(device)
    return dataset
