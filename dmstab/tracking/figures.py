"""Matplotlib figures logged to a run: as an artifact file, or as MLflow's image at a step."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmstab.tracking.tracker import Tracker


@contextmanager
def _png(figure: Any, filename: str) -> Iterator[Path]:
    """`figure` saved as a PNG in a temporary folder while the block runs, then closed."""
    from matplotlib import pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        figure.savefig(path, dpi=110, bbox_inches="tight")
        yield path
    plt.close(figure)


def save_figure(tracker: Tracker, figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG artifact (kept under its directory), then close it."""
    directory, _, filename = artifact_file.rpartition("/")
    with _png(figure, filename) as path:
        tracker.log_artifact(path, directory or None)


def log_figure_at_step(tracker: Tracker, figure: Any, key: str, step: int) -> None:
    """Log a matplotlib figure as MLflow's image `key` at training step `step`, then close it."""
    with _png(figure, "figure.png") as path:
        tracker.log_image(path, key, step)
