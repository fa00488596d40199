"""CIFAR-10 from its python-format batches, unpickled with an allow-list (no code runs)."""

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmstab.data.base import InMemoryDataset
from dmstab.errors import DmstabError

BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
NUM_CLASSES = 10
RESOLUTION = 32

# ndarray.__reduce__ names numpy's array reconstructor under "numpy.core.multiarray" (NumPy 1)
# or "numpy._core.multiarray" (NumPy 2); asking an array for it finds it under either NumPy.
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]

# Everything the CIFAR batch pickles reference: numpy's array and dtype reconstruction, plus
# _codecs.encode, which protocol-2 pickles written by Python 3 use for bytes.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the globals in _ALLOWED_GLOBALS; anything else is refused before it runs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _field(batch: dict[Any, Any], key: str) -> Any:
    """A batch field under its bytes key (Python 2 pickles) or str key (re-saved ones)."""
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 3, 32, 32) and int64 labels (n,) from one python-format batch file."""
    try:
        with path.open("rb") as file:
            # latin1 is how NumPy arrays pickled by Python 2 must be decoded.
            batch = _AllowListUnpickler(file, encoding="latin1").load()
    except FileNotFoundError:
        raise DmstabError(f"CIFAR-10 batch {path} is missing") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DmstabError(f"{path} is not a CIFAR-10 batch: {error}") from None
    data = _field(batch, "data") if isinstance(batch, dict) else None
    labels = _field(batch, "labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DmstabError(f"{path} is not a CIFAR-10 batch: needs a uint8 (n, 3072) 'data' array")
    if data.shape[1] != 3 * RESOLUTION * RESOLUTION or labels is None or len(labels) != len(data):
        raise DmstabError(f"{path} is not a CIFAR-10 batch: needs (n, 3072) data and n labels")
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= NUM_CLASSES):
        raise DmstabError(f"{path} has labels outside 0..{NUM_CLASSES - 1}")
    # Each row is the red plane, then green, then blue, each 32x32 in row-major order.
    return data.reshape(-1, 3, RESOLUTION, RESOLUTION), label_array


def _download(root: Path, train: bool) -> None:
    """Fetch and extract the archive into root with torchvision (checks its MD5)."""
    import torchvision

    try:
        torchvision.datasets.CIFAR10(str(root), train=train, download=True)
    except (OSError, RuntimeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DmstabError(f"could not download CIFAR-10 into {root}: {message}") from None


def cifar10_dataset(root: Path, *, download: bool, train: bool = True) -> InMemoryDataset:
    """The 50,000 training (or 10,000 test) images of CIFAR-10 found under root."""
    folder = root / BATCHES_FOLDER
    if not folder.is_dir():
        if not download:
            raise DmstabError(
                f"CIFAR-10 not found in {folder}; set data.download=true (needs network) "
                "or put the extracted python version there"
            )
        _download(root, train)
    batches = [read_batch(folder / name) for name in (TRAIN_BATCHES if train else TEST_BATCHES)]
    images = torch.from_numpy(np.concatenate([images for images, _ in batches]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
    return InMemoryDataset("cifar10", images, labels, num_classes=NUM_CLASSES)
