"""Missing, empty, truncated, corrupt, foreign and malicious files are refused: exit 2, one line
naming the file, no store made, nothing overwritten, and no pickled code ever runs (every read
goes through dmstab.reading: weights-only torch loading, NumPy without pickles, safe YAML)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmstab.analysis.ema_profiles import SNAPSHOT_PREFIX
from dmstab.config import load_recipe
from dmstab.train.loop import SNAPSHOT_DIR, train
from tests.helpers import (
    RECIPES,
    TINY,
    CachedRun,
    Payload,
    cli,
    one_line_error,
    store,
)

from . import counts
from .conftest import InterruptAt, only_run

QUICKSTART = RECIPES / "quickstart.yaml"
RECIPE = [*TINY, "train.steps=8", "train.checkpoint_every=4"]
MARKER = "pwned"  # the file a malicious pickle would create


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _malicious(path: Path) -> None:
    torch.save({"model": {"weight": Payload(Path(MARKER).resolve())}}, path)


def _other_recipe(path: Path) -> None:
    """The checkpoint of a run with another recipe (a different learning rate)."""
    other = train(
        load_recipe(
            QUICKSTART,
            [*RECIPE, "optim.lr=0.002", "train.out_dir=other", "tracking.experiment=other"],
        )
    )
    path.write_bytes(other.checkpoint.read_bytes())


CORRUPT = "is corrupt or truncated: not a readable"
PICKLED = "refused: it holds pickled code (posix.system), which weights-only loading never runs"
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, f"{CORRUPT} torch file"),
    "random bytes": (_random_bytes, f"{CORRUPT} torch file"),
    "malicious pickle": (_malicious, PICKLED),
    "another recipe": (_other_recipe, "belongs to a different recipe"),
}


def _refused(args: list[str], expected: str, protected: Path) -> int:
    """Run `dmstab ARGS`, check the one-line refusal; returns the losses found (0 or more)."""
    before = protected.read_bytes()
    line = one_line_error(cli(*args))
    counts.record(trials=1, faults=1)
    losses = int(protected.read_bytes() != before) + int(Path(MARKER).exists())
    counts.record(losses=losses)
    assert expected in line, line
    return losses


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The malicious files below would really run code: loading one unsafely makes the marker."""
    _malicious(tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert Path(MARKER).exists()


@pytest.mark.slow
def test_damaged_checkpoint_is_refused_by_resume_and_sample_then_resume_works() -> None:
    with pytest.raises(KeyboardInterrupt):
        train(load_recipe(QUICKSTART, RECIPE), progress=InterruptAt(6))
    [checkpoint] = Path("runs").glob("*/checkpoint.pt")
    genuine = checkpoint.read_bytes()
    losses = 0
    for name, (damage, expected) in DAMAGE.items():
        damage(checkpoint)
        resume = ["train", str(QUICKSTART), *RECIPE, "--resume", "auto"]
        losses += _refused(resume, expected, checkpoint)
        if name != "another recipe":  # sampling takes the recipe the checkpoint carries
            losses += _refused(["sample", str(checkpoint)], expected, checkpoint)
        checkpoint.write_bytes(genuine)
    assert losses == 0 and not Path(MARKER).exists()
    finished = cli("train", str(QUICKSTART), *RECIPE, "--resume", "auto")
    assert finished.returncode == 0, finished.stderr[-2000:]
    counts.record(resumes=1)
    run_id = only_run().info.run_id
    steps = sorted(m.step for m in store().get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 9)), "the refused resumes lost or duplicated metric steps"


def _savez(path: Path, **arrays: object) -> None:
    with path.open("wb") as handle:  # a handle: numpy adds no .npz to a .pt name
        np.savez(handle, **arrays)  # type: ignore[arg-type]


def _images(path: Path) -> Path:
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    _savez(path, arr_0=images)
    return path


def _stats(path: Path, **overrides: object) -> Path:
    arrays: dict[str, object] = {"mu": np.zeros(4), "sigma": np.eye(4), **overrides}
    _savez(path, **arrays)
    return path


def test_statistics_of_mismatched_shapes_are_refused() -> None:
    reference = _stats(Path("ref.npz"), sigma=np.eye(3))
    args = ["fid", str(_images(Path("images.npz"))), "--ref", str(reference)]
    assert _refused([*args, "--features", "random_conv"], "sigma", reference) == 0


# ------------------------------------------- every command × every file it reads × each failure

Damage = Callable[[Path], object]


def _checkpoint(path: Path) -> None:
    torch.save({"model": {"weight": torch.zeros(64)}, "sigma_rel": 0.1}, path)


def _png(path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(17).bytes(4096))  # torch met it as an IndexError


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _whole_then_truncated(make: Damage) -> Damage:
    return lambda path: (make(path), _truncate(path))


def _pickled_stats(path: Path) -> None:
    _savez(path, mu=np.array([Payload(Path(MARKER).resolve())], dtype=object), sigma=np.eye(4))


def _pickled_images(path: Path) -> None:
    _savez(path, arr_0=np.array([Payload(Path(MARKER).resolve())], dtype=object))


def _pickled_yaml(path: Path) -> None:
    path.write_text(f"!!python/object/apply:os.system [touch {Path(MARKER).resolve()}]\n")


# Each file format: its failures, each a damage and what the one line says.
FORMATS: dict[str, dict[str, tuple[Damage, str]]] = {
    "checkpoint": {
        "missing": (_remove, "not found"),
        "empty": (_empty, "is empty (0 bytes)"),
        "truncated": (_whole_then_truncated(_checkpoint), f"{CORRUPT} torch file"),
        "garbage": (_garbage, f"{CORRUPT} torch file"),
        "pickled code": (_malicious, PICKLED),
        "statistics instead": (_stats, "(it is a NumPy .npz archive, not a torch file)"),
        "no model": (lambda p: torch.save({"step": 1}, p), "(no 'model' entry)"),
    },
    "npz": {
        "missing": (_remove, "not found"),
        "empty": (_empty, "is empty (0 bytes)"),
        "truncated": (_whole_then_truncated(_stats), f"{CORRUPT} .npz archive"),
        "garbage": (_garbage, f"{CORRUPT} .npz archive"),
        "pickled code": (_pickled_stats, PICKLED),
        "checkpoint instead": (_checkpoint, "(it is a torch file, not a NumPy .npz archive)"),
    },
    "image npz": {
        "empty": (_empty, "is empty (0 bytes)"),
        "truncated": (_whole_then_truncated(_images), f"{CORRUPT} .npz archive"),
        "garbage": (_garbage, f"{CORRUPT} .npz archive"),
        "pickled code": (_pickled_images, PICKLED),
        "checkpoint instead": (_checkpoint, "(it is a torch file, not a NumPy .npz archive)"),
    },
    "png": {
        "empty": (_empty, "is empty (0 bytes)"),
        "truncated": (_whole_then_truncated(_png), f"{CORRUPT} image"),
        "garbage": (_garbage, f"{CORRUPT} image"),
        "npz instead": (_images, f"{CORRUPT} image"),
    },
    "recipe": {
        "missing": (_remove, "not found"),
        "empty": (_empty, "is empty (0 bytes)"),
        "truncated": (lambda p: p.write_bytes(b"name: caf\xc3"), f"{CORRUPT} UTF-8 text"),
        "garbage": (_garbage, f"{CORRUPT} UTF-8 text"),
        "pickled code": (_pickled_yaml, "line 1 is not valid YAML: could not determine a constr"),
        "a list instead": (lambda p: p.write_text("- train\n"), "must be a YAML mapping"),
    },
    "sidecar": {
        "empty": (_empty, "is empty (0 bytes)"),
        "truncated": (lambda p: p.write_text('{"step": 4, "sigma'), f"{CORRUPT} JSON file"),
        "garbage": (_garbage, f"{CORRUPT} UTF-8 text"),
        "a list instead": (lambda p: p.write_text("[1, 2]"), "(not a JSON object)"),
    },
}
FORMATS["snapshot"] = {**FORMATS["checkpoint"], "missing": (_remove, "is missing (its sidecar")}
# A run killed before its first checkpoint resumes from step 0: no checkpoint is no failure.
FORMATS["resumed checkpoint"] = {k: v for k, v in FORMATS["checkpoint"].items() if k != "missing"}
FORMATS["inception"] = {
    "missing": (_remove, "not found"),
    "empty": (_empty, "is empty (0 bytes)"),
    "garbage": (_garbage, f"{CORRUPT} TorchScript archive"),
    "weights instead": (_checkpoint, "(it is a torch file, not a TorchScript archive)"),
    "statistics instead": (_stats, "(it is a NumPy .npz archive, not a TorchScript archive)"),
}

RANDOM = ["--features", "random_conv"]


@dataclass(frozen=True)
class Target:
    """One file one command reads: its format, where it lies, and the command line."""

    format: str
    file: str
    args: Callable[[Path], list[str]]


def _sweep_pair(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for index, sigma_rel in enumerate((0.05, 0.1)):
        torch.save({"model": {}, "sigma_rel": sigma_rel}, folder / f"ema_{index}.pt")
    return folder


def _snapshot(run: Path, suffix: str) -> Path:
    return sorted((run / SNAPSHOT_DIR).glob(f"{SNAPSHOT_PREFIX}-*{suffix}"))[0]


TARGETS: dict[str, Target] = {
    "sample checkpoint": Target("checkpoint", "x.pt", lambda p: ["sample", str(p)]),
    "hessian checkpoint": Target("checkpoint", "x.pt", lambda p: ["hessian", str(p)]),
    "hessian recipe": Target("recipe", "x.yaml", lambda p: ["hessian", str(p)]),
    "landscape checkpoint": Target("checkpoint", "x.pt", lambda p: ["landscape", str(p)]),
    "landscape recipe": Target("recipe", "x.yaml", lambda p: ["landscape", str(p)]),
    "consistency checkpoint": Target(
        "checkpoint", "x.pt", lambda p: ["consistency", str(p), str(p)]
    ),
    "consistency recipe": Target("recipe", "x.yaml", lambda p: ["consistency", str(p)]),
    "fid checkpoint": Target(
        "checkpoint",
        "x.pt",
        lambda p: ["fid", str(p), "--ref", str(_stats(Path("s.npz"))), *RANDOM],
    ),
    "fid images npz": Target(
        "image npz",
        "x.npz",
        lambda p: ["fid", str(p), "--ref", str(_stats(Path("s.npz"))), *RANDOM],
    ),
    "fid images folder": Target(
        "png",
        "folder/x.png",
        lambda p: ["fid", "folder", "--ref", str(_stats(Path("s.npz"))), *RANDOM],
    ),
    "fid statistics": Target(
        "npz", "x.npz", lambda p: ["fid", str(_images(Path("i.npz"))), "--ref", str(p), *RANDOM]
    ),
    "fid reference images": Target(
        "png",
        "folder/x.png",
        lambda p: ["fid", str(_images(Path("i.npz"))), "--ref", "folder", *RANDOM],
    ),
    "fid reference recipe": Target(
        "recipe", "x.yaml", lambda p: ["fid", str(_images(Path("i.npz"))), "--ref", str(p), *RANDOM]
    ),
    "fid inception weights": Target(
        "inception",
        "x.pt",
        lambda p: [
            "fid",
            str(_images(Path("i.npz"))),
            "--ref",
            str(_stats(Path("s.npz"))),
            "--inception-weights",
            str(p),
        ],
    ),
    "fid-sweep checkpoint": Target(
        "checkpoint",
        "x.pt",
        lambda p: ["fid-sweep", "--ref", str(_stats(Path("s.npz"))), str(p), *RANDOM],
    ),
    "fid-sweep reference": Target(
        "npz",
        "x.npz",
        lambda p: ["fid-sweep", "--ref", str(p), str(_sweep_pair(Path("ema"))), *RANDOM],
    ),
    "report recipe": Target("recipe", "x.yaml", lambda p: ["report", str(p)]),
    "train recipe": Target("recipe", "x.yaml", lambda p: ["train", str(p)]),
}
# The files ema-reconstruct reads from a power-EMA run (tiny_edm): a snapshot, its sidecar, and
# the run's checkpoint beside the snapshots.
RUN_FILES: dict[str, tuple[str, Callable[[CachedRun], Path]]] = {
    "snapshot": ("snapshot", lambda r: _snapshot(r.run_dir, ".pt")),
    "sidecar": ("sidecar", lambda r: _snapshot(r.run_dir, ".json")),
    "run checkpoint": ("checkpoint", lambda r: r.checkpoint),
}


def _each_failure_refused(form: str, path: Path, args: list[str], store_made: bool) -> None:
    """Every failure of `form` at `path`: exit 2, one line naming the file and saying what is
    wrong, no traceback, no store made where there was none, and no payload run."""
    for name, (damage, expected) in FORMATS[form].items():
        path.parent.mkdir(parents=True, exist_ok=True)
        damage(path)
        line = one_line_error(cli(*args))
        counts.record(trials=1, faults=1)
        assert path.name in line and expected in line, (name, line)
        assert store_made or not Path("mlflow.db").exists(), (
            name,
            "a refused command made a store",
        )
        assert not Path(MARKER).exists(), (name, "pickled code ran")


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_unreadable_file_of_every_command_is_one_line(target: str) -> None:
    spec = TARGETS[target]
    path = Path(spec.file)
    args = spec.args(path)  # writes the other, intact, files the command reads
    _each_failure_refused(spec.format, path, args, store_made=False)


@pytest.mark.parametrize("target", list(RUN_FILES))
def test_every_unreadable_file_of_ema_reconstruct_is_one_line(
    target: str, tiny_edm: CachedRun
) -> None:
    form, where = RUN_FILES[target]
    args = ["ema-reconstruct", "--snapshots", str(tiny_edm.run_dir / SNAPSHOT_DIR)]
    _each_failure_refused(form, where(tiny_edm), [*args, "--sigma-rel", "0.1"], store_made=True)
    assert not (tiny_edm.run_dir / "reconstructed").exists(), "a refused run wrote output"


def test_every_unreadable_checkpoint_of_train_resume_is_one_line(tiny_dm: CachedRun) -> None:
    store().set_terminated(tiny_dm.run_id, "KILLED")  # an interrupted run: resumable
    args = ["train", str(QUICKSTART), *TINY, "--resume", tiny_dm.run_id]
    _each_failure_refused("resumed checkpoint", tiny_dm.checkpoint, args, store_made=True)
