"""The bad-input catalogue: realistic mistakes with every `dmstab` command (a file, an override,
a path or the environment wrong), each to be refused with exit code 2 and one `error:` line
before anything is written (tests/reliability/test_bad_input_catalogue.py runs them).

An argument may hold placeholders, filled in when the case runs: {recipes} (the recipes folder)
and, for a case that needs a tiny trained run (`trained`), {run} (its run id), {checkpoint}
and {run_dir} (its paths).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tests.helpers import TINY, TINY_EDM

Writer = Callable[[Path], None]  # makes the file (or folder) at the path it is given


@dataclass(frozen=True)
class Mistake:
    """One mistake: `dmstab ARGS` in a working directory holding `files`, with `env` set."""

    what: str  # the mistake in words; the test's id
    args: tuple[str, ...]
    shows: str  # a part of the one `error:` line
    files: Mapping[str, Writer] = field(default_factory=dict)  # names may hold placeholders
    env: Mapping[str, str] = field(default_factory=dict)
    trained: str | None = None  # "dm" (quickstart), "dm-no-power" (its power EMAs off) or "edm"
    # (edm2_mini): a tiny run copied in
    read_only: tuple[str, ...] = ()  # paths (files or folders; "." the working dir) made 0o555
    process: bool = False  # a real `python -m dmstab` child rather than the in-process runner


# ------------------------------------------------------------------------------------ writers


def text(content: str) -> Writer:
    def write(path: Path) -> None:
        path.write_text(content)

    return write


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    """Random bytes: no file format at all (a file overwritten, or the wrong download)."""
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def truncated_torch(path: Path) -> None:
    """The first half of a real torch file: a copy that was interrupted."""
    torch.save({"model": {"weight": torch.zeros(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def pickled_code(path: Path) -> None:
    """A .pt whose pickle runs `touch pwned` when loaded: weights-only loading must refuse it,
    and the working directory's digest would show the new file if it ran."""
    torch.save({"model": _Payload()}, path)


def plain_pickled_code(path: Path) -> None:
    """A plain pickle (as EDM2's network pickles are) that runs `touch pwned` when loaded."""
    path.write_bytes(pickle.dumps({"ema": _Payload()}))


class _Payload:
    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, ("touch pwned",)


def torch_object(value: object) -> Writer:
    def write(path: Path) -> None:
        torch.save(value, path)

    return write


def npz(**arrays: np.ndarray) -> Writer:
    def write(path: Path) -> None:
        with path.open("wb") as file:
            np.savez(file, **arrays)

    return write


def folder(**entries: Writer) -> Writer:
    def write(path: Path) -> None:
        path.mkdir()
        for name, writer in entries.items():
            writer(path / name)

    return write


def npy_folder(count: int, shape: tuple[int, ...]) -> Writer:
    """`count` float32 .npy arrays of `shape`: a folder of latents, without labels."""

    def write(path: Path) -> None:
        path.mkdir()
        for index in range(count):
            np.save(path / f"{index}.npy", np.zeros(shape, np.float32))

    return write


LATENTS = npy_folder(8, (4, 16, 16))  # Stable Diffusion VAE latents of 128x128 images
IMAGES = npz(arr_0=np.zeros((8, 16, 16, 3), np.uint8))  # uint8 NHWC, what `sample` writes
STATS = npz(mu=np.zeros(4), sigma=np.eye(4))  # FID reference statistics of 4 features

YAML_SYNTAX_ERROR = text(  # the bracket opened on line 4 is never closed
    "data:\n  name: synthetic\nmodel:\n  channel_mult: [1, 2\n  channels: 32\ntrain:\n  steps: 5\n"
)
UNKNOWN_SECTION = text("data:\n  name: synthetic\nmodle:\n  channels: 32\n")
UNKNOWN_KEY = text("optim:\n  lrr: 0.001\n")
NOT_A_MAPPING = text("- data\n- model\n")

QUICKSTART = "{recipes}/quickstart.yaml"
EDM = "{recipes}/edm2_mini.yaml"
# the recipes at test size, for mistakes that a regression would let train: seconds, not hours
SMALL = (QUICKSTART, *TINY)
SMALL_EDM = (EDM, *TINY_EDM)
RANDOM_CONV = ("--features", "random_conv")  # no Inception weights needed
UVIT = "{recipes}/mini_uvit.yaml"


# -------------------------------------------------------------------------------- the mistakes

USAGE = [
    Mistake("a misspelt command", ("trian", "x.yaml"), "No such command 'trian'"),
    Mistake("an unknown option", ("train", QUICKSTART, "--dryrun"), "No such option: --dryrun"),
    Mistake("fid with no images and no store", ("fid", "--ref", "stats.npz"), "mlflow.db"),
    Mistake("fid of images without --ref", ("fid", "a.npz"), "give --ref to score a.npz"),
    Mistake("fid-sweep without --ref", ("fid-sweep",), "give --ref"),
    Mistake(
        "a count that is no number",
        ("fid", "a.npz", "--ref", "b.npz", "--num-images", "1k"),
        "Invalid value for '--num-images'",
    ),
    Mistake(
        "an option without its value", ("report", "--metric"), "'--metric' requires an argument"
    ),
    Mistake(
        "--at that is no step",
        ("ema-reconstruct", "--sigma-rel", "0.1", "--at", "last"),
        "Invalid value for '--at'",
    ),
    Mistake("analyse without a name", ("analyse",), "Missing argument 'name'"),
    Mistake(
        "a usage mistake in a real process",
        ("sample", "--outdir", "x"),
        "No such option: --outdir",
        process=True,
    ),
]

RECIPE_FILES = [
    Mistake(
        "a recipe that does not exist",
        ("train", "recpies/quickstart.yaml"),
        "recpies/quickstart.yaml",
    ),
    Mistake("a folder as the recipe", ("train", "recipes"), "recipes", files={"recipes": folder()}),
    Mistake("an empty recipe", ("train", "empty.yaml"), "empty.yaml", files={"empty.yaml": empty}),
    Mistake(
        "a YAML syntax error names its line",
        ("train", "broken.yaml"),
        "that starts on line 4",
        files={"broken.yaml": YAML_SYNTAX_ERROR},
    ),
    Mistake(
        "a misspelt section in the recipe",
        ("train", "r.yaml"),
        "modle",
        files={"r.yaml": UNKNOWN_SECTION},
    ),
    Mistake(
        "a misspelt key in the recipe",
        ("train", "r.yaml"),
        "did you mean 'optim.lr'",
        files={"r.yaml": UNKNOWN_KEY},
    ),
    Mistake(
        "a recipe that is a list", ("train", "r.yaml"), "r.yaml", files={"r.yaml": NOT_A_MAPPING}
    ),
    Mistake(
        "a checkpoint given to train",
        ("train", "model.pt"),
        "model.pt",
        files={"model.pt": garbage},
    ),
]

OVERRIDES = [
    Mistake("an override without '='", ("train", QUICKSTART, "optim.lr"), "optim.lr"),
    Mistake("an override without a key", ("train", QUICKSTART, "=0.1"), "=0.1"),
    Mistake(
        "an unclosed bracket in an override",
        ("train", QUICKSTART, "optim.betas=[0.9,0.99"),
        "optim.betas",
    ),
    Mistake(
        "DDIM steps no stride gives",
        ("train", QUICKSTART, "sample.steps=300"),
        "the nearest counts one gives are 250 and 334",
    ),
    Mistake("one sampling step", ("train", QUICKSTART, "sample.steps=1"), "sample.steps is 1"),
    Mistake(
        "DDIM's eta with ddpm",
        ("train", QUICKSTART, "sample.sampler=ddpm", "sample.eta=0.5"),
        "sample.eta=0.5 is DDIM's η",
    ),
    Mistake(
        "latents with the ADM UNet but no data.root",
        ("train", QUICKSTART, "data.name=latents"),
        "data.root is required for data.name='latents'",
    ),
    Mistake(
        "unlabelled latents for the class-conditional ADM UNet",
        ("train", *SMALL, "data.name=latents", "data.root=latents", "sample.clip_denoised=false"),
        "model.class_cond is true but the dataset has no labels",
        files={"latents": LATENTS},
    ),
    Mistake(
        "unlabelled latents for the class-conditional U-ViT",
        (
            "train",
            UVIT,
            "data.name=latents",
            "data.root=latents",
            "data.resolution=16",
            "train.steps=2",
            "train.batch_size=4",
            "sample.clip_denoised=false",
        ),
        "model.class_cond is true but the dataset has no labels",
        files={"latents": LATENTS},
    ),
    Mistake("train.steps beside train.kimg", ("train", *SMALL, "train.kimg=1"), "train.kimg"),
    Mistake(
        "train.steps at its default beside train.kimg",
        ("train", *SMALL_EDM, "train.steps=500000"),
        "train.kimg",
    ),
    Mistake(
        "an unclosed quote in consistency.members",
        ("consistency", QUICKSTART, 'consistency.members=["train.seed=1", "a=\'b"]'),
        "No closing quotation",
    ),
    Mistake(
        "EDM2's own key name channels_per_head misspelt",
        ("train", EDM, "model.edm2.channel_per_head=16"),
        "model.edm2.channels_per_head",
    ),
    Mistake("EDM2's config name for the EMA length", ("train", EDM, "ema.std=0.05"), "ema.std"),
    Mistake(
        "EDM2's lr_ref for the learning rate", ("train", EDM, "optim.lr_ref=0.01"), "optim.lr_ref"
    ),
    Mistake(
        "EDM2's total_kimg for the length",
        ("train", EDM, "train.total_kimg=100"),
        "train.total_kimg",
    ),
    Mistake(
        "a dry run with a bad override",
        ("train", QUICKSTART, "--dry-run", "optim.lr=fast"),
        "'optim.lr' is 'fast'",
    ),
    Mistake(
        "a sweep over a key that does not exist",
        ("train", "sweep.yaml"),
        "optim.lrr",
        files={"sweep.yaml": text("sweep:\n  grid:\n    optim.lrr: [0.001, 0.002]\n")},
    ),
]

PATHS_AND_ENVIRONMENT = [
    Mistake(
        "a CIFAR-10 root that does not exist",
        ("train", QUICKSTART, "data.name=cifar10", "data.root=nowhere"),
        "nowhere",
    ),
    Mistake(
        "an image folder with no images",
        ("train", *SMALL, "data.name=folder", "data.root=photos"),
        "photos",
        files={"photos": folder()},
    ),
    Mistake(
        "a file where the runs folder goes",
        ("train", *SMALL, "train.out_dir=runs"),
        "runs",
        files={"runs": text("not a folder\n")},
    ),
    Mistake(
        "a CUDA device index as train.device",
        ("train", *SMALL, "train.device=cuda:7"),
        "'train.device' is 'cuda:7'; allowed:",
    ),
    Mistake(
        "a read-only working directory",
        ("train", *SMALL),
        "read-only",
        read_only=(".",),
    ),
    Mistake(
        "a read-only runs folder",
        ("train", *SMALL),
        "runs",
        files={"runs": folder()},
        read_only=("runs",),
    ),
    Mistake(
        "a tracking URI of an unknown scheme",
        ("train", *SMALL),
        "bogus://",
        env={"MLFLOW_TRACKING_URI": "bogus://nowhere"},
    ),
    Mistake(
        "a plugin module that does not exist",
        ("train", *SMALL),
        "nonexistent.module",
        env={"DMSTAB_PLUGINS": "nonexistent.module"},
    ),
    Mistake(
        "a plugin for an analysis that does not exist",
        ("analyse", "probe", "RUN"),
        "nonexistent.probes",
        env={"DMSTAB_PLUGINS": "nonexistent.probes"},
    ),
    Mistake(
        "torchrun's variables without torchrun",
        ("train", *SMALL),
        "torchrun",
        env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"},
    ),
]

SAMPLE = [
    Mistake("sample with no store at all", ("sample",), "mlflow.db"),
    Mistake(
        "sample a run id that does not exist", ("sample", "0123456789abcdef"), "0123456789abcdef"
    ),
    Mistake(
        "--resume a run id that does not exist", ("train", *SMALL, "--resume", "abc123"), "abc123"
    ),
    Mistake(
        "sample a checkpoint that does not exist",
        ("sample", "runs/x/checkpoint.pt"),
        "checkpoint not found: runs/x/checkpoint.pt",
    ),
    Mistake(
        "sample a garbage .pt",
        ("sample", "model.pt"),
        "model.pt is corrupt or truncated",
        files={"model.pt": garbage},
    ),
    Mistake(
        "sample a truncated .pt",
        ("sample", "model.pt"),
        "model.pt is corrupt or truncated",
        files={"model.pt": truncated_torch},
    ),
    Mistake(
        "sample an empty .pt",
        ("sample", "model.pt"),
        "model.pt is empty (0 bytes)",
        files={"model.pt": empty},
    ),
    Mistake(
        "sample a .pt holding pickled code",
        ("sample", "model.pt"),
        "refused: it holds pickled code",
        files={"model.pt": pickled_code},
    ),
    Mistake(
        "sample a .pt that is a bare tensor",
        ("sample", "model.pt"),
        "model.pt",
        files={"model.pt": torch_object(torch.zeros(3))},
    ),
    Mistake(
        "sample an empty folder",
        ("sample", "runs/abc"),
        "runs/abc",
        files={"runs": folder(abc=folder())},
    ),
    Mistake(
        "sample a run with DDIM steps no stride gives",
        ("sample", "{run}", "sample.steps=30"),
        "the nearest counts one gives are 25 and 34",
        trained="dm",
    ),
    Mistake(
        "sample a run with an unknown sampler",
        ("sample", "{run}", "sample.sampler=euler"),
        "euler",
        trained="dm",
    ),
    Mistake(
        "sample a run with a model override",
        ("sample", "{run}", "model.channels=64"),
        "model.channels",
        trained="dm",
    ),
    Mistake(
        "sample a checkpoint with no images",
        ("sample", "{checkpoint}", "sample.num_images=0"),
        "sample.num_images",
        trained="dm",
    ),
    Mistake(
        "sample into a file",
        ("sample", "{run}", "--out", "notes.txt"),
        "--out notes.txt is a file",
        files={"notes.txt": text("mine\n")},
        trained="dm",
    ),
    Mistake(
        "sample the latest run of an experiment that does not exist",
        ("sample", "--experiment", "nosuch"),
        "nosuch",
        trained="dm",
    ),
]

EMA = [
    Mistake(
        "an EMA length above the largest possible",
        ("ema-reconstruct", "--sigma-rel", "5"),
        "sigma_rel is 5.0",
    ),
    Mistake("ema-reconstruct with no length", ("ema-reconstruct",), "--sigma-rel"),
    Mistake("a sweep written as a-b", ("ema-reconstruct", "--sweep", "0.03-0.2"), "0.03-0.2"),
    Mistake(
        "a sweep running backwards",
        ("ema-reconstruct", "--sweep", "0.2:0.03:0.01"),
        "0.2:0.03:0.01",
    ),
    Mistake(
        "ema-reconstruct a run id that does not exist",
        ("ema-reconstruct", "--sigma-rel", "0.1", "--run", "abc123"),
        "abc123",
    ),
    Mistake(
        "snapshots from a folder that does not exist",
        ("ema-reconstruct", "--sigma-rel", "0.1", "--snapshots", "snaps"),
        "snaps",
    ),
    Mistake(
        "snapshots from an empty folder",
        ("ema-reconstruct", "--sigma-rel", "0.1", "--snapshots", "snaps"),
        "snaps",
        files={"snaps": folder()},
    ),
    Mistake(
        "a run's last snapshot damaged",
        ("ema-reconstruct", "--sigma-rel", "0.1"),
        "is corrupt or truncated",
        files={"{run_dir}/snapshots/phema-0000000012-0.0500.pt": garbage},
        trained="edm",
    ),
    Mistake(
        "a snapshot sidecar that is no JSON",
        ("ema-reconstruct", "--sigma-rel", "0.1", "--snapshots", "snaps"),
        "is corrupt or truncated",
        files={
            "snaps": folder(
                **{"phema-0000000016-0.0500.pt": garbage, "phema-0000000016-0.0500.json": garbage}
            )
        },
    ),
    Mistake(
        "post-hoc EMA of a run trained with its power EMAs turned off",
        ("ema-reconstruct", "--sigma-rel", "0.1", "--run", "{run}"),
        "power",
        trained="dm-no-power",
    ),
    Mistake(
        "post-hoc EMA at a step never snapshotted",
        ("ema-reconstruct", "--sigma-rel", "0.1", "--at", "999999"),
        "999999",
        trained="edm",
    ),
]

FID = [
    Mistake(
        "fid of images that do not exist",
        ("fid", "missing.npz", "--ref", "stats.npz", "--features", "random_conv"),
        "missing.npz",
        files={"stats.npz": STATS},
    ),
    Mistake(
        "fid of images that do not exist, nor the reference",
        ("fid", "missing.npz", "--ref", "nostats.npz", "--features", "random_conv"),
        "missing.npz",
    ),
    Mistake(
        "fid against a reference that does not exist",
        ("fid", "images.npz", "--ref", "stats.npz", "--features", "random_conv"),
        "stats.npz",
        files={"images.npz": IMAGES},
    ),
    Mistake(
        "fid against statistics saved as mean and cov",
        ("fid", "images.npz", "--ref", "stats.npz", "--features", "random_conv"),
        "stats.npz",
        files={"images.npz": IMAGES, "stats.npz": npz(mean=np.zeros(64), cov=np.eye(64))},
    ),
    Mistake(
        "fid of float NCHW images",
        ("fid", "images.npz", "--ref", "stats.npz", "--features", "random_conv"),
        "images.npz",
        files={"images.npz": npz(arr_0=np.zeros((8, 3, 16, 16), np.float32)), "stats.npz": STATS},
    ),
    Mistake(
        "fid against statistics without sigma",
        ("fid", "images.npz", "--ref", "stats.npz", "--features", "random_conv"),
        "stats.npz",
        files={"images.npz": IMAGES, "stats.npz": npz(mu=np.zeros(4))},
    ),
    Mistake(
        "fid of an empty .npz",
        ("fid", "images.npz", "--ref", "stats.npz", *RANDOM_CONV),
        "images.npz is empty (0 bytes)",
        files={"images.npz": empty, "stats.npz": STATS},
    ),
    Mistake(
        "fid against a broken recipe",
        ("fid", "images.npz", "--ref", "broken.yaml", "--features", "random_conv"),
        "recipe broken.yaml line 5 is not valid YAML",
        files={"images.npz": IMAGES, "broken.yaml": YAML_SYNTAX_ERROR},
    ),
    Mistake(
        "a clean-fid mode that does not exist",
        ("fid", "images.npz", "--ref", "stats.npz", "--mode", "legacy"),
        "legacy",
        files={"images.npz": IMAGES, "stats.npz": STATS},
    ),
    Mistake(
        "a feature network that does not exist",
        ("fid", "images.npz", "--ref", "stats.npz", "--features", "clip"),
        "clip",
        files={"images.npz": IMAGES, "stats.npz": STATS},
    ),
    Mistake(
        "a batch size of 0",
        (
            "fid",
            "images.npz",
            "--ref",
            "stats.npz",
            "--batch-size",
            "0",
            "--features",
            "random_conv",
        ),
        "batch",
        files={"images.npz": IMAGES, "stats.npz": STATS},
    ),
    Mistake(
        "Inception weights that do not exist",
        ("fid", "images.npz", "--ref", "stats.npz", "--inception-weights", "incep.pt"),
        "incep.pt",
        files={"images.npz": IMAGES, "stats.npz": STATS},
    ),
    Mistake(
        "$DMSTAB_INCEPTION_WEIGHTS that does not exist",
        ("fid", "images.npz", "--ref", "stats.npz"),
        "incep.pt",
        files={"images.npz": IMAGES, "stats.npz": STATS},
        env={"DMSTAB_INCEPTION_WEIGHTS": "incep.pt"},
    ),
    Mistake(
        "garbage Inception weights",
        ("fid", "images.npz", "--ref", "stats.npz", "--inception-weights", "incep.pt"),
        "incep.pt",
        files={"images.npz": IMAGES, "stats.npz": STATS, "incep.pt": garbage},
    ),
    Mistake(
        "fid of a run id that does not exist",
        ("fid", "abc123", "--ref", "stats.npz", "--features", "random_conv"),
        "abc123",
        files={"stats.npz": STATS},
    ),
    Mistake(
        "fid of a run sampling no images",
        ("fid", "{run}", "--ref", "stats.npz", "--features", "random_conv", "--num-images", "0"),
        "got 0",
        files={"stats.npz": STATS},
        trained="dm",
    ),
]

FID_SWEEP = [
    Mistake(
        "fid-sweep with no run",
        ("fid-sweep", "--ref", "stats.npz", *RANDOM_CONV),
        "mlflow.db",
        files={"stats.npz": STATS},
    ),
    Mistake(
        "fid-sweep of a folder that does not exist",
        ("fid-sweep", "recon", "--ref", "stats.npz", *RANDOM_CONV),
        "recon",
        files={"stats.npz": STATS},
    ),
    Mistake(
        "fid-sweep of an empty folder",
        ("fid-sweep", "recon", "--ref", "stats.npz", *RANDOM_CONV),
        "recon",
        files={"stats.npz": STATS, "recon": folder()},
    ),
    Mistake(
        "fid-sweep of a garbage checkpoint",
        ("fid-sweep", "phema.pt", "--ref", "stats.npz", *RANDOM_CONV),
        "phema.pt is corrupt or truncated",
        files={"stats.npz": STATS, "phema.pt": garbage},
    ),
    Mistake(
        "fid-sweep of a training run's own folder",
        ("fid-sweep", "{run_dir}", "--ref", "stats.npz", *RANDOM_CONV),
        "carries no σrel: give outputs of dmstab ema-reconstruct",
        files={"stats.npz": STATS},
        trained="edm",
    ),
]

REPORT_AND_SYNC = [
    Mistake("report of nothing", ("report",), "nothing to report"),
    Mistake(
        "report an experiment with no store",
        ("report", "--experiment", "dmstab"),
        "has no dmstab training runs",
    ),
    Mistake(
        "report a recipe that does not exist",
        ("report", "recipes/nosuch.yaml"),
        "recipes/nosuch.yaml",
    ),
    Mistake("report a run id that does not exist", ("report", "abc123"), "abc123", trained="dm"),
    Mistake(
        "report an experiment that does not exist",
        ("report", "--experiment", "nosuch"),
        "nosuch",
        trained="dm",
    ),
    Mistake(
        "report a metric nobody logs",
        ("report", "{run}", "--metric", "fdi"),
        "--metric fdi: no reported run logged fdi; they logged: ",
        trained="dm",
    ),
    Mistake(
        "a speed-up baseline that is nothing",
        ("report", "{run}", "--baseline", "nosuch"),
        "nosuch",
        trained="dm",
    ),
    Mistake("sync with no spool", ("sync",), "runs/.mlflow-spool"),
    Mistake("sync a spool folder that does not exist", ("sync", "spool"), "spool"),
    Mistake(
        "sync a folder that is no spool",
        ("sync", "spool"),
        "spool",
        files={"spool": folder(**{"notes.txt": text("mine\n")})},
    ),
    Mistake(
        "sync a spool holding garbage",
        ("sync", "spool"),
        "spool",
        files={"spool": folder(**{"run.json": garbage})},
    ),
]

ANALYSES = [
    Mistake(
        "an analysis that does not exist",
        ("analyse", "hesian", "{recipes}/quickstart.yaml"),
        "hesian",
    ),
    Mistake("consistency with no run", ("consistency",), "at least two trained models"),
    Mistake(
        "consistency of one run",
        ("consistency", "{run}"),
        "at least two trained models",
        trained="dm",
    ),
    Mistake(
        "consistency of a recipe that does not exist", ("consistency", "nosuch.yaml"), "nosuch.yaml"
    ),
    Mistake(
        "consistency of no images",
        ("consistency", "{run}", "{run}", "consistency.num_images=0"),
        "consistency.num_images",
        trained="dm",
    ),
    Mistake(
        "consistency with an unknown sampler",
        ("consistency", "{run}", "{run}", "consistency.samplers=[ddpm,dpm]"),
        "dpm",
        trained="dm",
    ),
    Mistake(
        "hessian of a garbage .pt",
        ("hessian", "model.pt"),
        "model.pt is corrupt or truncated",
        files={"model.pt": garbage},
    ),
    Mistake(
        "landscape of a garbage .pt",
        ("landscape", "model.pt"),
        "model.pt is corrupt or truncated",
        files={"model.pt": garbage},
    ),
    Mistake(
        "landscape of a checkpoint that does not exist",
        ("landscape", "early.pt", "late.pt"),
        "early.pt",
    ),
    Mistake(
        "hessian with no eigenvalues",
        ("hessian", "{run}", "hessian.top_k=0"),
        "hessian.top_k",
        trained="dm",
    ),
    Mistake(
        "a Hessian method that does not exist",
        ("hessian", "{run}", "hessian.method=lanczos"),
        "lanczos",
        trained="dm",
    ),
    Mistake(
        "a model override on a trained run",
        ("hessian", "{run}", "model.channels=8"),
        "model.channels",
        trained="dm",
    ),
    Mistake(
        "a landscape of one point",
        ("landscape", "{run}", "landscape.points=1"),
        "landscape.points",
        trained="dm",
    ),
    Mistake(
        "a landscape section misspelt",
        ("landscape", "{run}", "landscap.points=5"),
        "landscap",
        trained="dm",
    ),
]

IMPORT = [
    Mistake("import a file that is not there", ("import", "model.pt"), "not found: model.pt"),
    Mistake(
        "import a garbage .pt",
        ("import", "model.pt", "data.resolution=16"),
        "corrupt or truncated",
        files={"model.pt": garbage},
    ),
    Mistake(
        "import a .pt holding pickled code",
        ("import", "model.pt", "data.resolution=16"),
        "refused",
        files={"model.pt": pickled_code},
    ),
    Mistake(
        "import a .pkl holding pickled code",
        ("import", "network.pkl"),
        "refused",
        files={"network.pkl": plain_pickled_code},
    ),
    Mistake(
        "import a .pth holding pickled code",
        ("import", "uvit.pth", "model.num_heads=2"),
        "refused",
        files={"uvit.pth": pickled_code},
    ),
    Mistake(
        "import a file of an unknown format",
        ("import", "weights.bin"),
        "pass --format",
        files={"weights.bin": garbage},
    ),
    Mistake(
        "import with an unknown --format",
        ("import", "model.pt", "--format", "onnx"),
        "unknown --format 'onnx'",
        files={"model.pt": garbage},
    ),
]

LISTING = [
    Mistake("runs with no store", ("runs",), "no MLflow store at sqlite:///"),
    Mistake("runs of no runs", ("runs", "--limit", "0"), "--limit"),
    Mistake(
        "runs of a kind that was never logged",
        ("runs", "--kind", "trian"),
        "no run of kind 'trian' in sqlite:///",
        trained="dm",
    ),
    Mistake(
        "runs of an experiment that does not exist",
        ("runs", "--experiment", "nosuch"),
        "no MLflow experiment 'nosuch'",
        trained="dm",
    ),
    Mistake("recipes of a folder that does not exist", ("recipes", "nosuch"), "nosuch"),
]

CATALOGUE = [
    *USAGE,
    *RECIPE_FILES,
    *OVERRIDES,
    *PATHS_AND_ENVIRONMENT,
    *SAMPLE,
    *EMA,
    *FID,
    *FID_SWEEP,
    *REPORT_AND_SYNC,
    *ANALYSES,
    *IMPORT,
    *LISTING,
]
