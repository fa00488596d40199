"""The statistics cache of a dataset reference: KID's features cached beside the statistics,
and writes that are all or nothing."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch

from dmstab.analysis.frechet import FeatureStats
from dmstab.analysis.scoring import features_cache_file, load_reference, network_pipeline
from dmstab.config import DataConfig
from dmstab.errors import DmstabError

CPU = torch.device("cpu")
DATA = DataConfig(name="synthetic", resolution=16, synthetic_size=12)


def test_kid_featurises_the_dataset_once_then_reads_its_cached_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second KID reference passes no image through the network, and gives the same
    features (float64, bit for bit) and statistics as the first."""
    monkeypatch.setenv("HOME", str(tmp_path))
    pipeline = network_pipeline("random_conv", "clean", None, CPU, 5)
    images_seen: list[int] = []
    pipeline.extractor.network.register_forward_hook(
        lambda module, inputs, output: images_seen.append(inputs[0].shape[0])
    )
    first = load_reference(DATA, pipeline, with_features=True)
    assert sum(images_seen) == 12
    assert first.cache is not None and features_cache_file(first.cache).is_file()

    images_seen.clear()
    second = load_reference(DATA, pipeline, with_features=True)
    assert images_seen == []
    assert first.features is not None and second.features is not None
    assert second.features.dtype == torch.float64
    assert torch.equal(second.features, first.features)
    np.testing.assert_array_equal(second.stats.mu, first.stats.mu)
    np.testing.assert_array_equal(second.stats.sigma, first.stats.sigma)


def _write_half_then_fail(handle: BinaryIO, *args: object, **kwargs: object) -> None:
    handle.write(b"PK\x03\x04 half an archive")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_statistics_write_that_fails_midway_leaves_the_cached_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stats.npz"
    FeatureStats(np.zeros(2), np.eye(2)).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", _write_half_then_fail)
    with pytest.raises(DmstabError, match=r"the previous stats\.npz is intact"):
        FeatureStats(np.ones(2), 2 * np.eye(2)).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]  # no temporary file left
    np.testing.assert_array_equal(FeatureStats.load(path).mu, np.zeros(2))
