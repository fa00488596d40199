"""Shared fixtures: every test gets its own working directory and MLflow store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import dmstab.commands  # noqa: F401  (registers the built-in components, as the CLI does)
from dmstab.tracking import resolve_uri

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# A model of a few thousand parameters on 16x16 synthetic shapes: seconds per run on a CPU.
TINY = [
    "data.synthetic_size=256",
    "data.resolution=16",
    "model.channels=32",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[8]",
    "model.num_heads=2",
    "diffusion.steps=100",
    "timesteps.mu=30",
    "timesteps.sigma=100",
    "timesteps.target_iteration=10",
    "timesteps.histogram_every=5",
    "train.batch_size=8",
    "train.steps=12",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "train.precision=fp32",
    "sample.steps=5",
    "sample.num_images=4",
    "sample.batch_size=4",
    "tracking.flush_every=5",
    "tracking.experiment=tests",
]

TINY_GAN = [  # mini_dcgan at 16×16 with 4 channels and z of 8: a few seconds of training
    "data.synthetic_size=64",
    "data.resolution=16",
    "gan.g_channels=4",
    "gan.d_channels=4",
    "gan.z_dim=8",
    "train.batch_size=8",
    "tracking.experiment=tests",
]


@pytest.fixture(autouse=True)
def isolated_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield tmp_path


def store() -> MlflowClient:
    """A client on the default store of the current working directory (./mlflow.db)."""
    return MlflowClient(resolve_uri(None))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For tiny networks: one thread is faster, and immune to a busy machine's other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
