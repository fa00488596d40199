"""dmstab.reading: each reader against a missing, empty, truncated, garbage, foreign and malicious
file gives its one fixed line, and no pickled code runs (the payload's marker never appears)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dmstab.errors import DmstabError
from dmstab.reading import (
    npz_names,
    read_image,
    read_json,
    read_npy,
    read_npz,
    read_text,
    read_torch,
    read_torchscript,
)
from tests.helpers import Payload

MARKER = "pwned"  # the file the malicious pickles would create when unpickled
Maker = Callable[[Path], object]


def _payload() -> Payload:
    return Payload(Path(MARKER).resolve())


def _torch(path: Path) -> None:
    torch.save({"model": {"weight": torch.arange(64.0)}, "step": 3}, path)


def _savez(path: Path, **arrays: Any) -> None:
    with path.open("wb") as handle:  # a handle: numpy adds no .npz to the name
        np.savez(handle, **arrays)


def _save(path: Path, array: Any) -> None:
    with path.open("wb") as handle:
        np.save(handle, array)


def _npz(path: Path) -> None:
    _savez(path, mu=np.arange(32.0), sigma=np.eye(32))


def _npy(path: Path) -> None:
    _save(path, np.arange(256.0))


def _png(path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def _json(path: Path) -> None:
    path.write_text(json.dumps({"step": 7, "sigma_rel": 0.1, "text": "é" * 20}))


def _truncated(make: Maker) -> Maker:
    def damaged(path: Path) -> None:
        make(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 1])

    return damaged


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(17).bytes(4096))  # the seed torch met as IndexError


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _torch_payload(path: Path) -> None:
    torch.save({"model": {"weight": _payload()}}, path)


def _npz_payload(path: Path) -> None:
    _savez(path, mu=np.array([_payload()], dtype=object), sigma=np.eye(2))


def _npy_payload(path: Path) -> None:
    _save(path, np.array([_payload()], dtype=object))


def _bare_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"model": _payload()}, protocol=4))


CORRUPT = "is corrupt or truncated: not a readable"
PICKLED = "refused: it holds pickled code (posix.system), which weights-only loading never runs"
READ = Callable[[Path], Any]
CHECKPOINT: READ = lambda p: read_torch(p, "checkpoint", required=("model",))  # noqa: E731
STATS: READ = lambda p: read_npz(p, "statistics file", required=("mu", "sigma"))  # noqa: E731

# (reader, how the file is made, what the one line must hold): every reader × every failure.
CASES: dict[str, tuple[READ, Maker, str]] = {
    "torch truncated": (CHECKPOINT, _truncated(_torch), f"checkpoint {{}} {CORRUPT} torch file"),
    "torch garbage": (CHECKPOINT, _garbage, f"checkpoint {{}} {CORRUPT} torch file"),
    "torch empty": (CHECKPOINT, _empty, "checkpoint {} is empty (0 bytes)"),
    "torch pickled code": (CHECKPOINT, _torch_payload, f"checkpoint {{}} {PICKLED}"),
    "torch bare pickle": (CHECKPOINT, _bare_pickle, f"checkpoint {{}} {PICKLED}"),
    "torch given an npz": (CHECKPOINT, _npz, "{} is not a checkpoint (it is a NumPy .npz archive"),
    "torch without model": (
        CHECKPOINT,
        lambda p: torch.save({"step": 1}, p),
        "{} is not a checkpoint (no 'model' entry)",
    ),
    "torch not a dict": (
        CHECKPOINT,
        lambda p: torch.save(torch.zeros(2), p),
        "{} is not a checkpoint (it holds Tensor, not a dictionary)",
    ),
    "npz truncated": (STATS, _truncated(_npz), f"statistics file {{}} {CORRUPT} .npz archive"),
    "npz garbage": (STATS, _garbage, f"statistics file {{}} {CORRUPT} .npz archive"),
    "npz empty": (STATS, _empty, "statistics file {} is empty (0 bytes)"),
    "npz pickled code": (STATS, _npz_payload, f"statistics file {{}} {PICKLED}"),
    "npz bare pickle": (STATS, _bare_pickle, f"statistics file {{}} {PICKLED}"),
    "npz given a checkpoint": (STATS, _torch, "{} is not a statistics file (it is a torch file"),
    "npz given an npy": (STATS, _npy, "{} is not a statistics file (it is a single .npy array"),
    "npz missing arrays": (
        STATS,
        lambda p: _savez(p, arr_0=np.zeros(3)),
        "{} is not a statistics file (no 'mu', 'sigma' array; it holds arr_0)",
    ),
    "npz names garbage": (
        lambda p: npz_names(p, "image set"),
        _garbage,
        f"image set {{}} {CORRUPT} .npz archive",
    ),
    "npy truncated": (lambda p: read_npy(p, "latent"), _truncated(_npy), f"{CORRUPT} .npy array"),
    "npy garbage": (lambda p: read_npy(p, "latent"), _garbage, f"latent {{}} {CORRUPT} .npy array"),
    "npy empty": (lambda p: read_npy(p, "latent"), _empty, "latent {} is empty (0 bytes)"),
    "npy pickled code": (lambda p: read_npy(p, "latent"), _npy_payload, f"latent {{}} {PICKLED}"),
    "npy bare pickle": (lambda p: read_npy(p, "latent"), _bare_pickle, f"latent {{}} {PICKLED}"),
    "npy given an npz": (
        lambda p: read_npy(p, "latent"),
        _npz,
        "{} is not a latent (it is an .npz archive, not a single .npy array)",
    ),
    "image truncated": (read_image, _truncated(_png), f"image {{}} {CORRUPT} image"),
    "image garbage": (read_image, _garbage, f"image {{}} {CORRUPT} image (UnidentifiedImageError)"),
    "image empty": (read_image, _empty, "image {} is empty (0 bytes)"),
    "image given an npz": (read_image, _npz, f"image {{}} {CORRUPT} image"),
    "text garbage": (lambda p: read_text(p, "recipe file"), _garbage, f"{CORRUPT} UTF-8 text"),
    "text empty": (lambda p: read_text(p, "recipe file"), _empty, "recipe file {} is empty"),
    "json truncated": (lambda p: read_json(p, "sidecar"), _truncated(_json), f"{CORRUPT} JSON"),
    "json garbage": (lambda p: read_json(p, "sidecar"), _garbage, f"{CORRUPT} UTF-8 text"),
    "json empty": (lambda p: read_json(p, "sidecar"), _empty, "sidecar {} is empty (0 bytes)"),
    "torchscript garbage": (
        lambda p: read_torchscript(p, "Inception", torch.device("cpu")),
        _garbage,
        f"Inception {{}} {CORRUPT} TorchScript archive",
    ),
    "torchscript given weights": (
        lambda p: read_torchscript(p, "Inception", torch.device("cpu")),
        _torch,
        "{} is not an Inception (it is a torch file, not a TorchScript archive)",
    ),
}


def test_the_payload_is_live_when_unpickled_unsafely() -> None:
    """The malicious files below would really run code: plain pickle.loads makes the marker."""
    pickle.loads(pickle.dumps(_payload()))
    assert Path(MARKER).exists()


@pytest.mark.parametrize("case", list(CASES))
def test_every_failure_is_one_fixed_line_and_runs_no_code(case: str) -> None:
    read, make, expected = CASES[case]
    path = Path("file.bin").resolve()
    make(path)
    with pytest.raises(DmstabError) as caught:
        read(path)
    message = str(caught.value)
    assert expected.format(path) in message and "\n" not in message, message
    assert not Path(MARKER).exists(), "a pickled payload ran"


@pytest.mark.parametrize(
    "read",
    [CHECKPOINT, STATS, read_image, lambda p: read_npy(p, "latent"), lambda p: read_text(p, "x")],
)
def test_missing_and_folder_paths(read: READ) -> None:
    with pytest.raises(DmstabError, match=r"not found: absent\.bin$"):
        read(Path("absent.bin"))
    Path("folder").mkdir()
    with pytest.raises(DmstabError, match=r" folder is a directory, not a file$"):
        read(Path("folder"))


def test_good_files_read_back() -> None:
    _torch(Path("a.pt"))
    assert torch.equal(CHECKPOINT(Path("a.pt"))["model"]["weight"], torch.arange(64.0))
    np.savez(Path("images.npz"), images=np.zeros((2, 4, 4, 3), np.uint8), arr_1=np.arange(2))
    arrays = read_npz(Path("images.npz"), "image set", [("arr_0", "images")], ["arr_1", "x"])
    assert sorted(arrays) == ["arr_1", "images"] and arrays["images"].shape == (2, 4, 4, 3)
    assert npz_names(Path("images.npz"), "image set") == ["images", "arr_1"]
    _npy(Path("a.npy"))
    assert np.array_equal(read_npy(Path("a.npy"), "latent"), np.arange(256.0))
    _png(Path("a.png"))
    assert read_image(Path("a.png")).mode == "RGB" and read_image(Path("a.png")).size == (32, 32)
    _json(Path("a.json"))
    assert read_json(Path("a.json"), "sidecar")["text"] == "é" * 20
