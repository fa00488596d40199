"""The edm2 format: a pickle laid out as NVlabs/edm2's snapshots (persistent objects whose
module source would run when unpickled the usual way, EasyDicts, tensors as plain `pickle`
writes them) reads back into a dmstab network that computes exactly what the original did, and
no code in the file ever runs: a foreign global is refused by name, the module source is
never executed, a broken file is one line.

The pickles are written here: small stand-ins of edm2's `_reconstruct_persistent_obj` and
`EasyDict` are put in `sys.modules` under edm2's names only while pickling, so that `pickle`
emits the same globals edm2's files hold. No edm2 code is used.
"""

from __future__ import annotations

import builtins
import pickle
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import dmstab.diffusion.samplers  # noqa: F401  (the recipe's heun sampler)
from dmstab.checkpoint import load_checkpoint
from dmstab.config.loading import apply_overrides, from_mapping
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.edm2_unet import EDM2Block, EDM2UNet
from dmstab.published import FORMATS
from dmstab.published.edm2_releases import URL_ROOT
from dmstab.tracking import TAG_RUN_DIR
from dmstab.train.restore import network_from_state, stored_recipe
from tests.helpers import Payload, Runner, one_line_error, store

LABELS = 10
# The tiny network: 8×8×4 latents, widths 16 and 32, one block per level, attention at 4×4.
TREE: dict[str, Any] = {
    "data": {"name": "latents", "root": "latents.npz", "resolution": 8},
    "model": {
        "name": "edm2_unet",
        "channels": 16,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [4],
        "dropout": 0.0,
        "class_cond": True,
        "edm2": {"channels_per_head": 8, "logvar_channels": 8},
    },
    "diffusion": {"formulation": "edm", "p_mean": -0.4, "p_std": 1.0},
    "sample": {"sampler": "heun", "steps": 4, "clip_denoised": False},
}
UNET_KWARGS = {
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
    "channels_per_head": 8,
    "dropout": 0.0,
}
# edm2's ModuleDict keys of that network, in its order: (key, flavor, resample, attention).
ENCODER = [("8x8_block0", "enc", "keep", False), ("4x4_down", "enc", "down", False)]
ENCODER += [("4x4_block0", "enc", "keep", True)]
DECODER = [("4x4_in0", "dec", "keep", True), ("4x4_in1", "dec", "keep", False)]
DECODER += [("4x4_block0", "dec", "keep", True), ("4x4_block1", "dec", "keep", True)]
DECODER += [("8x8_up", "dec", "up", False), ("8x8_block0", "dec", "keep", False)]
DECODER += [("8x8_block1", "dec", "keep", False)]
# StabilityVAEEncoder's defaults: final = raw·scale + bias, scale = 0.5/raw_std.
RAW_MEAN = np.float32([5.81, 3.25, 0.12, -2.15])
SCALE = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])


def _reconstruct_persistent_obj(meta: object) -> None:
    raise AssertionError("the reader called edm2's reconstruct function")


class EasyDict(dict[str, Any]):
    """dnnlib.util.EasyDict's shape: a dict subclass."""


@pytest.fixture
def edm2_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """edm2's module names, importable while pickling, so `pickle` names them as edm2 does."""
    for name, attributes in (
        ("torch_utils", {}),
        ("torch_utils.persistence", {"_reconstruct_persistent_obj": _reconstruct_persistent_obj}),
        ("dnnlib", {}),
        ("dnnlib.util", {"EasyDict": EasyDict}),
    ):
        module = types.ModuleType(name)
        for attribute, value in attributes.items():
            monkeypatch.setattr(value, "__module__", name)
            setattr(module, attribute, value)
        monkeypatch.setitem(sys.modules, name, module)


def _meta(class_name: str, state: dict[str, Any], source: str) -> tuple[Callable[..., Any], Any]:
    meta = {"type": "class", "version": 6, "module_src": source, "class_name": class_name}
    return _reconstruct_persistent_obj, ({**meta, "state": state},)


class Persistent(nn.Module):
    """A module pickled as edm2's persistent classes are: `_reconstruct_persistent_obj(meta)`
    with its module's source and its attribute dict (with `_init_args`/`_init_kwargs`)."""

    def __init__(self, class_name: str, kwargs: dict[str, Any], source: str, **attrs: Any):
        super().__init__()
        self._init_args: tuple[Any, ...] = ()
        self._init_kwargs = kwargs
        for name, value in attrs.items():
            setattr(self, name, value)
        self.__dict__["_persistent"] = (class_name, source)

    def __reduce__(self) -> Any:
        class_name, source = self.__dict__["_persistent"]
        state = {k: v for k, v in self.__dict__.items() if k != "_persistent"}
        return _meta(class_name, state, source)


class PersistentObject:
    """A persistent object that is no module (the encoder, the loss)."""

    def __init__(self, class_name: str, state: dict[str, Any], source: str) -> None:
        self.args = class_name, state, source

    def __reduce__(self) -> Any:
        return _meta(*self.args)


def _half(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().half(), requires_grad=False)


def _conv(layer: nn.Module, source: str) -> Persistent:
    kernel = list(layer.weight.shape[2:])
    shape = {"in_channels": layer.weight.shape[1], "kernel": kernel}
    return Persistent("MPConv", shape, source, weight=_half(layer.weight))


def _fourier(layer: nn.Module, source: str) -> Persistent:
    fourier = Persistent("MPFourier", {"num_channels": layer.freqs.numel()}, source)
    fourier.register_buffer("freqs", layer.freqs.half())
    fourier.register_buffer("phases", layer.phases.half())
    return fourier


def _block(ours: nn.Module, layout: tuple[str, str, str, bool], source: str) -> Persistent:
    assert isinstance(ours, EDM2Block)
    _, flavor, mode, attention = layout
    out = ours.conv_res1.weight.shape[0]
    attrs: dict[str, Any] = {"out_channels": out, "flavor": flavor, "resample_mode": mode}
    attrs |= {"resample_filter": [1, 1], "num_heads": out // 8 if attention else 0}
    attrs |= {"dropout": 0.0, "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256}
    block = Persistent("Block", {"flavor": flavor, "resample_mode": mode}, source, **attrs)
    block.emb_gain = _half(ours.emb_gain)
    for name in ("conv_res0", "emb_linear", "conv_res1"):
        setattr(block, name, _conv(getattr(ours, name), source))
    skip = ours.conv_skip
    block.conv_skip = None if skip is None else _conv(skip, source)
    block.attn_qkv = _conv(ours.attention.qkv, source) if ours.attention else None
    block.attn_proj = _conv(ours.attention.proj, source) if ours.attention else None
    return block


def _snapshot(denoiser: nn.Module, label_dim: int, source: str) -> EasyDict:
    """What edm2's training loop pickles: EasyDict(encoder, dataset_kwargs, loss_fn, ema)."""
    net = denoiser.net
    assert isinstance(net, EDM2UNet)
    interface = {"img_resolution": 8, "img_channels": 4, "label_dim": label_dim}
    unet = Persistent("UNet", {**interface, **UNET_KWARGS}, source)
    unet.label_balance, unet.concat_balance = 0.5, 0.5
    unet.out_gain = _half(net.out_gain)
    unet.emb_fourier = _fourier(net.embedding.fourier, source)
    unet.emb_noise = _conv(net.embedding.noise0, source)
    unet.emb_label = _conv(net.embedding.label, source) if label_dim else None
    enc = {"8x8_conv": _conv(net.enc_conv, source)}
    enc |= {key[0]: _block(b, key, source) for key, b in zip(ENCODER, net.encoder, strict=True)}
    unet.enc = nn.ModuleDict(enc)
    dec = {key[0]: _block(b, key, source) for key, b in zip(DECODER, net.decoder, strict=True)}
    unet.dec = nn.ModuleDict(dec)
    unet.out_conv = _conv(net.out_conv, source)
    kwargs = {**interface, **UNET_KWARGS, "logvar_channels": 8, "use_fp16": True}
    precond = Persistent("Precond", kwargs, source, **interface, use_fp16=True, sigma_data=0.5)
    precond.unet = unet
    precond.logvar_fourier = _fourier(net.uncertainty.fourier, source)
    precond.logvar_linear = _conv(net.uncertainty.linear, source)
    encoder_state = {"_init_args": (), "_init_kwargs": {}, "vae_name": "stabilityai/sd-vae-ft-mse"}
    encoder_state |= {"scale": SCALE, "bias": np.float32(0) - RAW_MEAN * SCALE, "_vae": None}
    loss_state = {"_init_args": (), "_init_kwargs": {}, "P_mean": -0.4, "P_std": 1.0}
    dataset = EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip")
    return EasyDict(
        encoder=PersistentObject("StabilityVAEEncoder", encoder_state, source),
        dataset_kwargs=dataset,
        loss_fn=PersistentObject("EDM2Loss", loss_state, source),
        ema=precond,
    )


def _network(label_dim: int) -> nn.Module:
    """A tiny dmstab EDM2 denoiser with float16-exact weights and nonzero gains."""
    tree = apply_overrides(TREE, [f"model.class_cond={str(label_dim > 0).lower()}"])
    torch.manual_seed(0)
    denoiser = build_model(from_mapping(tree), label_dim)
    with torch.no_grad():
        for tensor in denoiser.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.5).copy_(tensor.half().float())
    return denoiser.eval()


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Module source that would write `marker` if anything executed it."""
    marker = tmp_path / "module_src_ran"
    yield f"open({str(marker)!r}, 'w').write('ran')\n", marker


def _write(path: Path, data: object) -> Path:
    path.write_bytes(pickle.dumps(data, protocol=4))  # Python 3.8-3.13's default
    return path


def _outputs(denoiser: nn.Module, label_dim: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator) * 2
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    labels = torch.eye(LABELS)[[1, 3, 5, 9]] if label_dim else None
    with torch.no_grad():
        return [denoiser(x, sigma, labels), denoiser.logvar(sigma)]


@pytest.mark.parametrize("label_dim", [LABELS, 0], ids=["conditional", "unconditional guide"])
def test_the_imported_network_computes_what_the_original_did(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], label_dim: int
) -> None:
    original = _network(label_dim)
    snapshot = _snapshot(original, label_dim, source[0])
    path = _write(tmp_path / "edm2-img512-xs-2147483-0.135.pkl", snapshot)
    imported = FORMATS["edm2"].read(path, {})
    assert not source[1].exists(), "the pickled module source ran"
    assert imported.num_classes == label_dim
    assert imported.known is not None and imported.known.url == f"{URL_ROOT}/{path.name}"
    assert imported.inferred["model.edm2.channels_per_head"] == 8
    assert imported.recipe["model"]["class_cond"] == (label_dim > 0)
    assert all(tensor.dtype == torch.float32 for tensor in imported.weights.values())
    rebuilt = build_model(from_mapping(imported.recipe), label_dim).eval()
    rebuilt.load_state_dict(imported.weights, strict=True)
    expected = _outputs(original, label_dim)
    for ours, theirs in zip(_outputs(rebuilt, label_dim), expected, strict=True):
        assert torch.equal(ours, theirs)
    if not label_dim:  # the guide is named on the main network's recipe
        guided = ["sample.guide=guide.pt", "sample.guidance=1.4"]
        assert from_mapping(apply_overrides(imported.recipe, guided)).sample.guidance == 1.4


class Exec:
    """A pickle that calls builtins.exec on code writing a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class PersistentId(pickle.Pickler):
    def persistent_id(self, obj: object) -> str | None:
        return "storage" if isinstance(obj, bytes) else None


def _with_persistent_id(path: Path, marker: Path) -> None:
    with path.open("wb") as stream:
        PersistentId(stream).dump({"ema": b"weights"})


@pytest.mark.parametrize(
    ("write", "named"),
    [
        (lambda path, marker: _write(path, Payload(marker)), "posix.system"),
        (lambda path, marker: _write(path, EasyDict(ema=Exec(marker))), "builtins.exec"),
        (_with_persistent_id, "persistent_load"),
    ],
    ids=["os.system", "builtins.exec inside an EasyDict", "persistent id"],
)
def test_code_in_the_pickle_is_refused_by_name(
    tmp_path: Path, edm2_names: None, write: Callable[[Path, Path], object], named: str
) -> None:
    path, marker = tmp_path / "net.pkl", tmp_path / "pwned"
    write(path, marker)
    with pytest.raises(DmstabError) as refusal:
        FORMATS["edm2"].read(path, {})
    assert str(refusal.value) == (
        f"EDM2 network pickle {path} refused: it holds pickled code ({named}), "
        "which weights-only loading never runs"
    )
    assert not marker.exists()


def _truncated(path: Path, good: bytes) -> None:
    path.write_bytes(good[: len(good) // 2])


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncated, "is corrupt or truncated: not a readable pickle"),
        (lambda path, good: path.write_bytes(b""), "is empty (0 bytes)"),
        (lambda path, good: _write(path, {"net": [1, 2]}), "is not an EDM2 network pickle (no"),
        (lambda path, good: torch.save({}, path), "(it is a torch file, not a pickle)"),
    ],
    ids=["truncated", "empty", "no network", "a torch file"],
)
def test_a_broken_file_is_one_line(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], damage: Any, says: str
) -> None:
    good = pickle.dumps(_snapshot(_network(LABELS), LABELS, source[0]), protocol=4)
    path = tmp_path / "net.pkl"
    damage(path, good)
    with pytest.raises(DmstabError) as error:
        FORMATS["edm2"].read(path, {})
    assert says in str(error.value) and "\n" not in str(error.value)
    assert not source[1].exists()


def _down_block_kept(data: EasyDict) -> None:
    data["ema"].unet.enc["4x4_down"].resample_mode = "keep"


def _other_latent_statistics(data: EasyDict) -> None:
    data["encoder"].args[1]["scale"] = SCALE * 2


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_down_block_kept, "its block enc.4x4_down has resample_mode='none' where dmstab's has"),
        (_other_latent_statistics, "not EDM2's ImageNet-512 statistics"),
    ],
    ids=["a block's resampling", "the latents' statistics"],
)
def test_what_dmstab_cannot_hold_is_one_line(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], change: Any, says: str
) -> None:
    data = _snapshot(_network(LABELS), LABELS, source[0])
    change(data)
    path = _write(tmp_path / "net.pkl", data)
    with pytest.raises(DmstabError) as error:
        FORMATS["edm2"].read(path, {})
    assert says in str(error.value) and "\n" not in str(error.value)


def test_dmstab_import_writes_a_checkpoint_that_computes_what_the_original_did(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], dmstab: Runner
) -> None:
    original = _network(LABELS)
    path = _write(tmp_path / "net.pkl", _snapshot(original, LABELS, source[0]))
    result = dmstab("import", str(path), "tracking.experiment=tests")
    assert result.returncode == 0, result.stderr
    assert not source[1].exists(), "the pickled module source ran"
    (run,) = store().search_runs([store().get_experiment_by_name("tests").experiment_id])
    assert run.data.tags["dmstab.import.format"] == "edm2"
    checkpoint = Path(run.data.tags[TAG_RUN_DIR]) / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    rebuilt = network_from_state(
        state, stored_recipe(state, checkpoint), use_ema=True, source=checkpoint
    )
    for ours, theirs in zip(_outputs(rebuilt, LABELS), _outputs(original, LABELS), strict=True):
        assert torch.equal(ours, theirs)


def test_dmstab_import_refuses_code_in_a_pickle_in_one_line(tmp_path: Path, dmstab: Runner) -> None:
    marker = tmp_path / "pwned"
    _write(Path("evil.pkl"), Payload(marker))
    line = one_line_error(dmstab("import", "evil.pkl"))
    assert "refused" in line and "posix.system" in line
    assert not marker.exists()
    assert not Path("runs").exists() and not Path("mlflow.db").exists()
