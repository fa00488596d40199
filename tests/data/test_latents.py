"""Latent data for EDM2's ImageNet-512 setting: normalisation, both layouts, bad files, the VAE."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmstab.checkpoint import load_checkpoint
from dmstab.cli import app
from dmstab.config import DataConfig, from_mapping, load_recipe
from dmstab.data import build_dataset
from dmstab.data.latents import (
    FINAL_STD,
    RAW_MEAN,
    RAW_STD,
    VAE_PATH_VARIABLE,
    VaeUnavailable,
    decode_latents,
    denormalise_latents,
    latent_image_decoder,
    latent_preview,
    normalise_latents,
)
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.generate import generate_for_recipe
from tests.helpers import RECIPES, store

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
RESOLUTION = 8
# EDM2-XS on 8×8 latents, a few thousand parameters: four steps of training on a CPU.
TINY_LATENT = [
    f"data.resolution={RESOLUTION}",
    "model.channels=32",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[4]",
    "train.kimg=0.032",
    "train.batch_size=8",
    "train.precision=fp32",
    "train.device=cpu",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.sample_every=0",
    "sample.steps=4",
    "sample.num_images=4",
    "sample.batch_size=4",
    "tracking.experiment=tests",
]
# The per-channel affine of EDM2 training/encoders.py, written out: (raw − mean) · 0.5 / std.
OFFSET = np.array([5.81, 3.25, 0.12, -2.15])
SPREAD = np.array([4.17, 4.62, 3.71, 3.28])
SCALE = 0.5 / SPREAD


def _data(root: Path) -> DataConfig:
    return DataConfig(name="latents", root=str(root), resolution=RESOLUTION)


def _write_npz(path: Path, count: int = 64, channels: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latents = rng.normal(3.0, 2.0, (count, channels, RESOLUTION, RESOLUTION)).astype(np.float32)
    if channels == 8:
        latents[:, 4:] = np.abs(latents[:, 4:])
    np.savez(path, latents=latents, labels=rng.integers(0, 5, count))
    return latents


def test_normalisation_is_edm2s_per_channel_affine() -> None:
    raw = torch.tensor(np.stack([OFFSET, OFFSET + SPREAD]))[:, :, None, None]  # μ, μ + σ
    final = normalise_latents(raw)[:, :, 0, 0]
    torch.testing.assert_close(final[0], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(final[1], torch.full((4,), FINAL_STD, dtype=torch.float64))
    assert (tuple(OFFSET), tuple(SPREAD)) == (RAW_MEAN, RAW_STD)


def test_normalisation_round_trip() -> None:
    raw = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    raw = raw * 4 + 2
    torch.testing.assert_close(denormalise_latents(normalise_latents(raw)), raw, rtol=0, atol=1e-12)
    single = raw.to(torch.float32)
    torch.testing.assert_close(denormalise_latents(normalise_latents(single)), single)


def test_npz_dataset_normalises_with_the_closed_form(isolated_workdir: Path) -> None:
    stored = _write_npz(isolated_workdir / "latents.npz")
    dataset = build_dataset(_data(isolated_workdir / "latents.npz"))
    labels = np.load(isolated_workdir / "latents.npz")["labels"]
    assert (len(dataset), dataset.resolution, dataset.num_classes) == (64, 8, labels.max() + 1)
    final, got_labels = dataset.get_batch(torch.arange(64))
    assert final.dtype == torch.float32 and final.shape == (64, 4, 8, 8)
    assert got_labels.dtype == torch.int64 and got_labels.tolist() == labels.tolist()
    raw = stored.astype(np.float64)
    expected_mean = (raw.mean(axis=(0, 2, 3)) - OFFSET) * SCALE
    expected_std = raw.std(axis=(0, 2, 3)) * SCALE
    final64 = final.double()
    np.testing.assert_allclose(final64.mean(dim=(0, 2, 3)).numpy(), expected_mean, atol=1e-5)
    np.testing.assert_allclose(final64.std(dim=(0, 2, 3), correction=0), expected_std, rtol=1e-5)


def test_unlabelled_npz_has_no_classes(isolated_workdir: Path) -> None:
    np.savez("plain.npz", latents=np.zeros((3, 4, RESOLUTION, RESOLUTION), np.float16))
    dataset = build_dataset(_data(isolated_workdir / "plain.npz"))
    assert dataset.num_classes == 0 and dataset.get_batch(torch.tensor([2]))[1].tolist() == [0]


def test_mean_std_latents_are_drawn_each_batch(isolated_workdir: Path) -> None:
    mean = np.broadcast_to(OFFSET[None, :, None, None], (512, 4, RESOLUTION, RESOLUTION))
    std = np.broadcast_to(np.array([1.0, 2.0, 0.0, 0.5])[None, :, None, None], mean.shape)
    np.savez("ms.npz", latents=np.concatenate([mean, std], axis=1).astype(np.float32))
    dataset = build_dataset(_data(isolated_workdir / "ms.npz"))
    everything = torch.arange(512)
    torch.manual_seed(7)
    first, _ = dataset.get_batch(everything)
    torch.manual_seed(7)
    again, _ = dataset.get_batch(everything)
    other, _ = dataset.get_batch(everything)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # final = (mean + std·ε − mean) · scale: N(0, (std · scale)²) per channel.
    drawn_std = first.double().std(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(drawn_std, [1.0, 2.0, 0.0, 0.5] * SCALE, rtol=0.02)
    assert first.double().mean(dim=(0, 2, 3)).abs().max() < 0.01


def test_folder_in_edm2_dataset_tool_layout(isolated_workdir: Path) -> None:
    root = isolated_workdir / "edm2"
    rng = np.random.default_rng(1)
    names, arrays = [], []
    for index in range(5):
        name = f"{index // 3:05d}/img-mean-std-{index:08d}.npy"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        array = rng.normal(size=(4, RESOLUTION, RESOLUTION)).astype(np.float32)
        np.save(root / name, array)
        names.append(name)
        arrays.append(array)
    labels = [4, 0, 2, 1, 3]
    pairs = [[n, label] for n, label in zip(names, labels, strict=True)]
    (root / "dataset.json").write_text(json.dumps({"labels": pairs[::-1]}))
    dataset = build_dataset(_data(root))
    assert (len(dataset), dataset.num_classes) == (5, 5)
    final, got = dataset.get_batch(torch.tensor([3, 0]))
    assert got.tolist() == [labels[3], labels[0]]
    expected = (np.stack([arrays[3], arrays[0]]) - OFFSET[:, None, None]) * SCALE[:, None, None]
    np.testing.assert_allclose(final.numpy(), expected, atol=1e-6)


def _write(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)


def _latents(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def _nan() -> np.ndarray:
    array = _latents(2, 4, 8, 8)
    array[1, 2, 3, 4] = np.nan
    return array


def _negative_std() -> np.ndarray:
    array = _latents(2, 8, 8, 8)
    array[0, 5] = -1
    return array


BAD_NPZ = {
    "three channels": ({"latents": _latents(2, 3, 8, 8)}, "C = 4 (latents) or 8"),
    "not images": ({"latents": _latents(2, 4, 8)}, "(N, C, R, R)"),
    "integers": ({"latents": np.zeros((2, 4, 8, 8), np.int32)}, "float array"),
    "empty": ({"latents": _latents(0, 4, 8, 8)}, "non-empty"),
    "wrong resolution": ({"latents": _latents(2, 4, 16, 16)}, "16x16 but data.resolution is 8"),
    "NaN": ({"latents": _nan()}, "NaN or infinite"),
    "negative std": ({"latents": _negative_std()}, "std channels 4-7"),
    "negative label": ({"latents": _latents(2, 4, 8, 8), "labels": np.array([0, -1])}, "non-neg"),
    "float labels": ({"latents": _latents(2, 4, 8, 8), "labels": np.array([0.0, 1.0])}, "integer"),
    "label count": ({"latents": _latents(2, 4, 8, 8), "labels": np.array([0])}, "shape (2,)"),
    "missing key": ({"images": _latents(2, 4, 8, 8)}, "(no 'latents' array; it holds images)"),
}


def _one_line_error(data: DataConfig) -> str:
    with pytest.raises(DmstabError) as caught:
        build_dataset(data)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("case", BAD_NPZ)
def test_bad_npz_is_a_one_line_error(case: str, isolated_workdir: Path) -> None:
    arrays, expected = BAD_NPZ[case]
    _write(isolated_workdir / "bad.npz", **arrays)
    assert expected in _one_line_error(_data(isolated_workdir / "bad.npz"))


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_npz_is_a_one_line_error(keep: float, isolated_workdir: Path) -> None:
    whole = isolated_workdir / "whole.npz"
    _write_npz(whole)
    payload = whole.read_bytes()
    (isolated_workdir / "cut.npz").write_bytes(payload[: int(len(payload) * keep)])
    assert "cut.npz" in _one_line_error(_data(isolated_workdir / "cut.npz"))


def test_bad_paths_and_folders_are_one_line_errors(isolated_workdir: Path) -> None:
    assert "does not exist" in _one_line_error(_data(isolated_workdir / "nowhere.npz"))
    (isolated_workdir / "text.npz").write_text("not a zip")
    expected = "is corrupt or truncated: not a readable .npz archive"
    assert expected in _one_line_error(_data(isolated_workdir / "text.npz"))
    folder = isolated_workdir / "folder"
    folder.mkdir()
    assert "holds no .npy files" in _one_line_error(_data(folder))
    np.save(folder / "a.npy", _latents(4, 8, 8))
    np.save(folder / "b.npy", _latents(4, 8, 8))
    (folder / "dataset.json").write_text(json.dumps({"labels": [["a.npy", 1]]}))
    assert "no label for b.npy" in _one_line_error(_data(folder))
    (folder / "dataset.json").write_text("{")
    assert "dataset.json" in _one_line_error(_data(folder))
    (folder / "dataset.json").unlink()
    (folder / "a.npy").write_bytes(b"\x93NUMPY broken")
    assert "a.npy" in _one_line_error(_data(folder))
    mean_std = _latents(8, 8, 8)
    mean_std[7, 0, 0] = -1
    np.save(folder / "a.npy", mean_std)
    assert "std channels 4-7" in _one_line_error(_data(folder))
    np.save(folder / "a.npy", _latents(8, 8, 8))
    dataset = build_dataset(_data(folder))
    with pytest.raises(DmstabError, match=r"b\.npy has 4 channels"):
        dataset.get_batch(torch.tensor([0, 1]))


def _tiny_latent_recipe(root: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_recipe(RECIPES / "edm2_img512_xs.yaml", [f"data.root={root}", *TINY_LATENT, *extra])


@pytest.mark.skipif(HAS_DIFFUSERS, reason="checks the message shown when diffusers is missing")
def test_decoding_without_diffusers_says_what_to_install(isolated_workdir: Path) -> None:
    with pytest.raises(VaeUnavailable, match=r"needs `pip install dmstab\[latent\]`"):
        decode_latents(torch.zeros(1, 4, RESOLUTION, RESOLUTION), _data(isolated_workdir))


def test_sampling_needs_the_vae_unless_a_preview_is_asked_for(
    isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAE_PATH_VARIABLE, str(isolated_workdir / "no-vae-here"))
    _write_npz(isolated_workdir / "latents.npz")
    recipe = _tiny_latent_recipe(isolated_workdir / "latents.npz")
    model = build_model(recipe, num_classes=5)
    cpu = torch.device("cpu")
    with pytest.raises(VaeUnavailable, match=r"pip install dmstab|huggingface\.co/stabilityai"):
        generate_for_recipe(model, recipe, dataset_classes=5, device=cpu)
    images = generate_for_recipe(
        model, recipe, dataset_classes=5, device=cpu, preview_latents_without_vae=True
    )
    assert images.dtype == torch.uint8 and images.shape == (4, 3, RESOLUTION, RESOLUTION)
    preview = latent_preview(torch.tensor([[[[-2.0]], [[0.75]], [[0.0]], [[9.0]]]]))
    torch.testing.assert_close(preview.flatten(), torch.tensor([-1.0, 0.5, 0.0]))


def _tiny_vae(folder: Path) -> torch.nn.Module:
    """A randomly initialised AutoencoderKL with SD's layout (4 latent channels, 8× down)."""
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )
    vae.save_pretrained(folder)
    return vae.eval()  # type: ignore[no-any-return]


def test_decoding_with_a_local_vae(isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vae = _tiny_vae(isolated_workdir / "vae")
    data = _data(isolated_workdir)
    monkeypatch.setenv(VAE_PATH_VARIABLE, str(isolated_workdir / "missing"))
    with pytest.raises(VaeUnavailable, match=f"{VAE_PATH_VARIABLE}=.*missing holds no"):
        decode_latents(torch.zeros(1, 4, RESOLUTION, RESOLUTION), data)
    monkeypatch.setenv(VAE_PATH_VARIABLE, str(isolated_workdir / "vae"))
    final = torch.randn(3, 4, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    images = decode_latents(final, data)
    assert images.shape == (3, 3, 8 * RESOLUTION, 8 * RESOLUTION)
    raw = final.double().numpy() / SCALE[:, None, None] + OFFSET[:, None, None]
    with torch.no_grad():
        pixels = vae.decode(torch.from_numpy(raw).float()).sample
    torch.testing.assert_close(images, pixels.clamp(0, 1) * 2 - 1, atol=1e-5, rtol=1e-4)
    decoder = latent_image_decoder(data, torch.device("cpu"), preview_without_vae=True)
    torch.testing.assert_close(decoder(final), images)


def test_tiny_edm_training_on_latents_through_the_cli(
    isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VAE_PATH_VARIABLE, str(isolated_workdir / "no-vae-here"))
    _write_npz(isolated_workdir / "latents.npz")
    overrides = [f"data.root={isolated_workdir / 'latents.npz'}", *TINY_LATENT]
    recipe = str(RECIPES / "edm2_img512_xs.yaml")
    result = CliRunner().invoke(app, ["train", recipe, *overrides])
    assert result.exit_code == 0, result.output
    (run,) = store().search_runs([store().get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    run_dir = isolated_workdir / "runs" / run.info.run_id
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == 4 and state["num_classes"] == 5
    assert state["model"]["net.enc_conv.weight"].shape[1] == 4 + 1  # latents + EDM2's constant 1
    assert state["model"]["net.out_conv.weight"].shape[0] == 4
    # No VAE here: the end-of-training samples are latent previews, R×R rather than 8R×8R.
    previews = np.load(run_dir / "samples" / "step_00000004.npz")["arr_0"]
    assert previews.shape == (4, RESOLUTION, RESOLUTION, 3) and previews.dtype == np.uint8


PIXEL_NETWORKS = {  # networks written for RGB, at a few thousand parameters on 8×8 latents
    "adm_unet": (RECIPES / "quickstart.yaml", ["model.channel_mult=[1,2]"]),
    "uvit": (RECIPES / "mini_uvit.yaml", ["model.patch_size=2"]),
}


@pytest.mark.parametrize(("recipe", "extra"), PIXEL_NETWORKS.values(), ids=PIXEL_NETWORKS)
def test_pixel_space_networks_take_the_latents_four_channels(
    recipe: Path, extra: list[str], isolated_workdir: Path
) -> None:
    """`data.name: latents` gives adm_unet and uvit 4 input and output channels (they were
    fixed at 3 once: a shape error at step 1, after the MLflow run existed): one step trains."""
    _write_npz(isolated_workdir / "latents.npz", count=8)
    result = CliRunner().invoke(
        app,
        [
            "train", str(recipe), "data.name=latents", "data.root=latents.npz",
            f"data.resolution={RESOLUTION}", "train.steps=1", "train.batch_size=4",
            "train.device=cpu", "train.precision=fp32", "sample.num_images=2",
            "sample.batch_size=2", "sample.steps=5", "sample.clip_denoised=false",
            "tracking.experiment=tests", *extra,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (checkpoint,) = Path("runs").glob("*/checkpoint.pt")
    state = load_checkpoint(checkpoint)
    model = build_model(from_mapping(state["recipe"]), num_classes=5)
    model.load_state_dict(state["model"])
    latents = torch.randn(2, 4, RESOLUTION, RESOLUTION)
    with torch.no_grad():
        out = model(latents, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == latents.shape
