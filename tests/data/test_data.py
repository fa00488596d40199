"""Datasets: synthetic shapes, CIFAR-10 batches, image folders and .npz arrays."""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dmstab.data.base import ImageDataset, InMemoryDataset
from dmstab.data.cifar10 import cifar10_dataset
from dmstab.data.images import center_crop_resize, folder_dataset, npz_dataset
from dmstab.data.synthetic import (
    CLASS_NAMES,
    GRADIENT,
    PLAIN,
    TEXTURE,
    generate_shapes,
    luma,
    pixel_centres,
    sample_scenes,
    shape_coverage,
    synthetic_dataset,
)
from dmstab.errors import DmstabError

# ---------------------------------------------------------------- synthetic shapes


def test_same_seed_gives_identical_images_and_another_seed_does_not() -> None:
    images, labels = generate_shapes(64, 32, seed=3)
    again, again_labels = generate_shapes(64, 32, seed=3)
    other, _ = generate_shapes(64, 32, seed=4)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert (images.float() - other.float()).abs().mean() > 20


def test_generation_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate_shapes(8, 16, seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_shapes_dtypes_and_label_range(resolution: int) -> None:
    images, labels = generate_shapes(40, resolution, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (40, 3, resolution, resolution)
    assert labels.dtype == torch.int64 and labels.shape == (40,)
    assert int(labels.min()) >= 0 and int(labels.max()) < len(CLASS_NAMES) == 10


def test_classes_are_balanced_and_all_present() -> None:
    _, labels = generate_shapes(1003, 16, seed=0)
    counts = torch.bincount(labels, minlength=10)
    assert int(counts.min()) >= 100 and int(counts.max()) <= 101


def test_images_are_scenes_at_any_resolution() -> None:
    """Scenes are drawn in resolution-free coordinates: 64 pixels box-filtered to 32 match 32."""
    fine, fine_labels = generate_shapes(50, 64, seed=7)
    coarse, coarse_labels = generate_shapes(50, 32, seed=7)
    pooled = F.avg_pool2d(fine.float(), 2)
    assert torch.equal(fine_labels, coarse_labels)
    assert (pooled - coarse.float()).abs().mean() < 0.5


# Probe points in a unit shape's coordinates (x right, y down) and, per class, whether the shape
# covers each one, worked out by hand from the geometry (every probe is >= 0.04 from an edge).
PROBES = [(0, 0), (0.78, -0.78), (0, -0.8), (0, 0.8), (-0.8, 0), (0.8, 0), (0, -0.6), (0.6, 0.6)]
PROBES += [(0.45, 0.45)]
COVERED = {
    "disk": "101111111",
    "square": "111111111",
    "triangle": "101000111",
    "ring": "001111111",
    "plus": "101111100",
    "diamond": "101111101",
    "star": "101000101",
    "frame": "011111110",
    "bars": "000000111",
    "crescent": "001110000",
}


def test_each_class_covers_its_own_probe_pattern() -> None:
    resolution, size = 128, 0.9
    labels = torch.arange(10)
    coverage = shape_coverage(labels, torch.zeros(10, 2), torch.full((10,), size), resolution)
    for label, name in enumerate(CLASS_NAMES):
        found = ""
        for x, y in PROBES:
            column = math.floor((x * size + 1) / 2 * resolution)
            row = math.floor((y * size + 1) / 2 * resolution)
            value = float(coverage[label, row, column])
            assert value < 0.01 or value > 0.99, (name, x, y, value)
            found += "1" if value > 0.5 else "0"
        assert found == COVERED[name], name
    assert len(set(COVERED.values())) == 10  # the probes tell every pair of classes apart


def _lens_area(r1: float, r2: float, d: float) -> float:
    """Area where two circles with radii r1, r2 and centres d apart overlap."""
    part1 = r1**2 * math.acos((d**2 + r1**2 - r2**2) / (2 * d * r1))
    part2 = r2**2 * math.acos((d**2 + r2**2 - r1**2) / (2 * d * r2))
    kite = 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))
    return part1 + part2 - kite


# Closed-form areas of the unit shapes (extent within [-1, 1]²).
UNIT_AREAS = {
    "disk": math.pi,
    "square": 1.7**2,
    "triangle": 1.7**2 / math.sqrt(3),  # equilateral, height 1.7
    "ring": math.pi * (1.0**2 - 0.44**2),
    "plus": 2 * (2 * 0.64) - 0.64**2,
    "diamond": 2.0,
    "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5),  # ten triangles centre-tip-inner vertex
    "frame": 1.9**2 - 1.1**2,
    "bars": 2 * 1.9 * 0.5,
    "crescent": math.pi - _lens_area(1.0, 0.8, 0.45),
}


def test_coverage_sums_to_the_closed_form_area_of_every_shape() -> None:
    """Anti-aliased coverage integrates to the true area, and sampled shapes lie in the frame."""
    resolution = 64
    scenes = sample_scenes(400, seed=5)
    coverage = shape_coverage(scenes.labels, scenes.centres, scenes.sizes, resolution)
    pixel_area = (2 / resolution) ** 2
    expected = torch.tensor([UNIT_AREAS[n] for n in CLASS_NAMES])[scenes.labels] * scenes.sizes**2
    ratio = coverage.sum(dim=(1, 2)) * pixel_area / expected
    assert float((ratio - 1).abs().max()) < 0.03
    partial = ((coverage > 0) & (coverage < 1)).float().sum(dim=(1, 2))
    assert bool((partial > 0).all())  # edges are anti-aliased


def test_foreground_is_its_colour_and_contrasts_with_the_background() -> None:
    resolution, seed = 32, 11
    images, labels = generate_shapes(300, resolution, seed)
    scenes = sample_scenes(300, seed)
    assert torch.equal(labels, scenes.labels)
    coverage = shape_coverage(scenes.labels, scenes.centres, scenes.sizes, resolution)
    pixels = images.permute(0, 2, 3, 1).float()
    foreground = (scenes.foreground * 255).round()
    inside, outside = coverage == 1, coverage == 0
    for i in range(len(images)):
        assert torch.equal(pixels[i][inside[i]], foreground[i].expand(int(inside[i].sum()), 3))
        gap = (luma(pixels[i][outside[i]]) - luma(foreground[i])).abs()
        assert float(gap.min()) >= 0.3 * 255 - 1.5  # 1.5: uint8 rounding of both colours


def test_backgrounds_are_plain_linear_gradients_or_texture() -> None:
    resolution, seed = 32, 2
    images, _ = generate_shapes(120, resolution, seed)
    scenes = sample_scenes(120, seed)
    outside = shape_coverage(scenes.labels, scenes.centres, scenes.sizes, resolution) == 0
    coords = pixel_centres(resolution)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    kinds = scenes.background_kind.tolist()
    assert {PLAIN, GRADIENT, TEXTURE} <= set(kinds)
    for i, kind in enumerate(kinds):
        background = images[i].permute(1, 2, 0)[outside[i]].double()
        if kind == PLAIN:
            assert float((background - background[0]).abs().max()) == 0
            continue
        design = torch.stack([torch.ones_like(x), x, y], dim=-1)[outside[i]].double()
        fit = torch.linalg.lstsq(design, background).solution
        residual = float((design @ fit - background).abs().max())
        if kind == GRADIENT:
            assert residual <= 1.0  # linear up to uint8 rounding
        assert float(background.std(dim=0).max()) > 0  # not plain


def test_get_batch_returns_unit_range_floats_and_labels() -> None:
    dataset = synthetic_dataset(30, 16, seed=1)
    images, labels = generate_shapes(30, 16, seed=1)
    batch, batch_labels = dataset.get_batch(torch.tensor([4, 0, 4]))
    assert isinstance(dataset, ImageDataset)
    assert (dataset.name, dataset.resolution, dataset.num_classes, len(dataset)) == (
        "synthetic",
        16,
        10,
        30,
    )
    assert batch.dtype == torch.float32 and batch.shape == (3, 3, 16, 16)
    assert float(batch.min()) >= -1 and float(batch.max()) <= 1
    assert torch.allclose((batch + 1) * 127.5, images[[4, 0, 4]].float(), atol=1e-4)
    assert torch.equal(batch_labels, labels[[4, 0, 4]])
    assert batch_labels.dtype == torch.int64


@pytest.mark.parametrize(("num_images", "resolution"), [(0, 32), (10, 4)])
def test_synthetic_rejects_bad_sizes(num_images: int, resolution: int) -> None:
    with pytest.raises(DmstabError):
        generate_shapes(num_images, resolution)


def test_in_memory_dataset_rejects_inconsistent_tensors() -> None:
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError):
        InMemoryDataset("x", images.float(), torch.zeros(4, dtype=torch.int64), 1)
    with pytest.raises(ValueError):
        InMemoryDataset("x", images, torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(ValueError):
        InMemoryDataset("x", images, torch.full((4,), 2, dtype=torch.int64), 2)


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batch(first_label: int, count: int, *, bytes_keys: bool = True) -> dict[object, object]:
    data = np.zeros((count, 3072), dtype=np.uint8)
    data[:, 0] = 200  # red at row 0, column 0
    data[:, 1024 + 5] = 100  # green at row 0, column 5
    data[:, 2048 + 32] = np.arange(count)  # blue at row 1, column 0
    fields = {
        "batch_label": "testing batch",
        "data": data,
        "labels": [(first_label + i) % 10 for i in range(count)],
        "filenames": [f"image_{i}.png" for i in range(count)],
    }
    return {key.encode() if bytes_keys else key: value for key, value in fields.items()}


def _write_cifar(root: Path, *, bytes_keys: bool = True) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        batch = _cifar_batch(2 * index, 2, bytes_keys=bytes_keys)
        # Protocol 2, like the published files (written by Python 2).
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_reads_python_batches(tmp_path: Path, bytes_keys: bool) -> None:
    _write_cifar(tmp_path, bytes_keys=bytes_keys)
    train = cifar10_dataset(tmp_path, download=False)
    test = cifar10_dataset(tmp_path, download=False, train=False)
    assert (len(train), len(test), train.num_classes, train.resolution) == (10, 2, 10, 32)
    assert train.labels.tolist() == list(range(10))
    assert test.labels.tolist() == [0, 1]  # test_batch is the sixth file: labels 10, 11 mod 10
    assert train.images.dtype == torch.uint8 and train.images.shape == (10, 3, 32, 32)
    assert train.images[:, 0, 0, 0].tolist() == [200] * 10
    assert train.images[:, 1, 0, 5].tolist() == [100] * 10
    assert train.images[:, 2, 1, 0].tolist() == [0, 1] * 5
    assert int(train.images.sum(dtype=torch.int64)) == 10 * 300 + 5


def test_cifar10_missing_without_download_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DmstabError, match=r"not found in .*cifar-10-batches-py.*data\.download"):
        cifar10_dataset(tmp_path / "nowhere", download=False)


class _RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = _cifar_batch(0, 2)
    batch[b"labels"] = _RunsAShellCommand(marker)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch))
    with pytest.raises(DmstabError, match="data_batch_3"):
        cifar10_dataset(tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [pickle.dumps([1, 2, 3], protocol=2), b"not a pickle", pickle.dumps({b"data": b"x"})],
)
def test_cifar10_rejects_files_that_are_not_batches(tmp_path: Path, content: bytes) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(content)
    with pytest.raises(DmstabError, match="data_batch_1"):
        cifar10_dataset(tmp_path, download=False)


# ---------------------------------------------------------------- center crop and resize


def _ramp_image(width: int, height: int) -> Image.Image:
    """Red rises linearly with x, green with y: pixel values reveal where they came from."""
    red = np.broadcast_to(np.linspace(0, 255, width), (height, width))
    green = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    pixels = np.stack([red, green, np.zeros((height, width))], axis=-1)
    return Image.fromarray(pixels.round().astype(np.uint8))


@pytest.mark.parametrize(
    # (source width, height) -> size after BOX halvings and BICUBIC resize, per guided-diffusion
    ("width", "height", "resized_width", "resized_height"),
    [(100, 60, 53, 32), (60, 100, 32, 53), (300, 200, 48, 32), (32, 32, 32, 32)],
)
def test_center_crop_resize_takes_the_centre_of_the_resized_image(
    width: int, height: int, resized_width: int, resized_height: int
) -> None:
    out = center_crop_resize(_ramp_image(width, height), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    left, top = (resized_width - 32) // 2, (resized_height - 32) // 2
    # Output pixel j samples source x = (j + left + 0.5) · width / resized_width - 0.5 (pixel
    # centres); a linear ramp survives BOX halving and BICUBIC resampling away from the borders.
    inner = np.arange(3, 29)
    source_x = (inner + left + 0.5) * width / resized_width - 0.5
    source_y = (inner + top + 0.5) * height / resized_height - 0.5
    expected_red = source_x * 255 / (width - 1)
    expected_green = source_y * 255 / (height - 1)
    assert np.abs(out[16, inner, 0] - expected_red).max() <= 2.5
    assert np.abs(out[inner, 16, 1] - expected_green).max() <= 2.5


def test_center_crop_resize_halves_with_box_filters() -> None:
    """128 -> 64 -> 32 by BOX halving, then no resize: each output pixel is a 4x4 block mean."""
    source = np.random.default_rng(0).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    block_means = source.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    out = center_crop_resize(Image.fromarray(source), 32)
    # PIL rounds after each pass (rows, then columns) of each halving: four roundings.
    assert np.abs(out - block_means).max() <= 2.0


def test_center_crop_resize_converts_to_rgb() -> None:
    grey = Image.new("L", (40, 40), color=90)
    out = center_crop_resize(grey, 16)
    assert out.shape == (16, 16, 3) and (out == 90).all()


# ---------------------------------------------------------------- image folders


def _save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 50)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    _save_solid(tmp_path / "dogs" / "c.png", (0, 0, 255))
    _save_solid(tmp_path / "cats" / "b.webp", (0, 255, 0))
    _save_solid(tmp_path / "cats" / "a.png", (255, 0, 0))
    _save_solid(tmp_path / "cats" / "nested" / "d.jpeg", (255, 255, 255))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    dataset = folder_dataset(tmp_path, 16)
    assert isinstance(dataset, ImageDataset)
    assert (len(dataset), dataset.num_classes, dataset.resolution) == (4, 2, 16)
    images, labels = dataset.get_batch(torch.tensor([0, 1, 2, 3]))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 16, 16)
    assert labels.tolist() == [0, 0, 0, 1]  # cats (a.png, b.webp, nested/d.jpeg), then dogs
    expected = torch.tensor([[1, -1, -1], [-1, 1, -1], [1, 1, 1], [-1, -1, 1]]).float()
    assert torch.allclose(images.mean(dim=(2, 3)), expected, atol=0.02)


def test_flat_folder_is_unlabelled_and_read_lazily(tmp_path: Path) -> None:
    _save_solid(tmp_path / "one.png", (255, 255, 255))
    _save_solid(tmp_path / "two.JPG", (0, 0, 0))
    dataset = folder_dataset(tmp_path, 8)
    assert (len(dataset), dataset.num_classes) == (2, 0)
    _save_solid(tmp_path / "one.png", (0, 0, 0))  # replaced after the dataset was built
    images, labels = dataset.get_batch(torch.tensor([0]))
    assert float(images.max()) == -1.0 and labels.tolist() == [0]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DmstabError, match="does not exist"):
        folder_dataset(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DmstabError, match="holds no"):
        folder_dataset(tmp_path / "empty", 16)
    _save_solid(tmp_path / "mixed" / "loose.png", (1, 2, 3))
    _save_solid(tmp_path / "mixed" / "class" / "a.png", (1, 2, 3))
    with pytest.raises(DmstabError, match="both images and subfolders"):
        folder_dataset(tmp_path / "mixed", 16)
    _save_solid(tmp_path / "classes" / "full" / "a.png", (1, 2, 3))
    (tmp_path / "classes" / "bare").mkdir()
    with pytest.raises(DmstabError, match="bare"):
        folder_dataset(tmp_path / "classes", 16)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "garbage.png").write_bytes(b"definitely not a png")
    dataset = folder_dataset(tmp_path / "broken", 16)
    with pytest.raises(DmstabError, match=re.escape("garbage.png")):
        dataset.get_batch(torch.tensor([0]))


# ---------------------------------------------------------------- npz arrays


def test_npz_round_trip_with_either_key_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    labels = np.array([3, 0, 1, 3, 2])
    np.savez(tmp_path / "positional.npz", images, labels)
    np.savez(tmp_path / "named.npz", images=images, labels=labels)
    for name in ("positional.npz", "named.npz"):
        dataset = npz_dataset(tmp_path / name, 16)
        batch, batch_labels = dataset.get_batch(torch.arange(5))
        assert (dataset.num_classes, len(dataset)) == (4, 5)
        assert torch.equal(((batch + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1),
                           torch.from_numpy(images))  # fmt: skip
        assert batch_labels.tolist() == labels.tolist()


def test_npz_without_labels_and_at_another_resolution(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 40, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    dataset = npz_dataset(tmp_path / "images.npz", 16)
    assert dataset.num_classes == 0 and dataset.labels.tolist() == [0, 0, 0]
    for i in range(3):
        expected = center_crop_resize(Image.fromarray(images[i]), 16)
        assert torch.equal(dataset.images[i].permute(1, 2, 0), torch.from_numpy(expected))


def test_npz_errors(tmp_path: Path) -> None:
    good = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    cases = {
        "missing.npz": None,
        "wrong_key.npz": {"pictures": good},
        "float.npz": {"images": good.astype(np.float32)},
        "no_channels.npz": {"images": good[..., 0]},
        "short_labels.npz": {"images": good, "labels": np.array([1])},
        "float_labels.npz": {"images": good, "labels": np.array([0.5, 1.0])},
        "objects.npz": {"images": np.array([object(), object()], dtype=object)},
    }
    for name, arrays in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(DmstabError, match=re.escape(name)):
            npz_dataset(tmp_path / name, 8)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip archive")
    np.save(tmp_path / "single.npy", good)
    for name in ("garbage.npz", "single.npy"):
        with pytest.raises(DmstabError, match=re.escape(name)):
            npz_dataset(tmp_path / name, 8)
