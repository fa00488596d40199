"""Pickles laid out as NVlabs/edm2's network snapshots and released files, written at toy
scale for the tests of the edm2 format (persistent objects whose module source would run when
unpickled the usual way, EasyDicts, tensors as plain `pickle` writes them).

Small stand-ins of edm2's `_reconstruct_persistent_obj` and `EasyDict` are put in `sys.modules`
under edm2's names only while pickling (`install_edm2_names`, the `edm2_names` fixture), so that
`pickle` emits the same globals edm2's files hold. No edm2 code is used.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import dmstab.diffusion.samplers  # noqa: F401  (the recipe's heun sampler)
from dmstab.config.loading import apply_overrides, from_mapping
from dmstab.models import build_model
from dmstab.models.edm2_unet import EDM2Block, EDM2UNet

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


def install_edm2_names(monkeypatch: pytest.MonkeyPatch) -> None:
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


def snapshot(denoiser: nn.Module, label_dim: int, source: str, channels: int = 4) -> EasyDict:
    """What edm2's training loop pickles: EasyDict(encoder, dataset_kwargs, loss_fn, ema); of
    SD-VAE latents (4 channels) or, as edm2's ImageNet-64 models, pixels (3)."""
    net = denoiser.net
    assert isinstance(net, EDM2UNet)
    interface = {"img_resolution": 8, "img_channels": channels, "label_dim": label_dim}
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
    encoder_state: dict[str, Any] = {"_init_args": (), "_init_kwargs": {}}
    if channels == 4:
        encoder_state |= {"vae_name": "stabilityai/sd-vae-ft-mse", "_vae": None}
        encoder_state |= {"scale": SCALE, "bias": np.float32(0) - RAW_MEAN * SCALE}
    encoder = "StabilityVAEEncoder" if channels == 4 else "StandardRGBEncoder"
    loss_state = {"_init_args": (), "_init_kwargs": {}, "P_mean": -0.4, "P_std": 1.0}
    dataset = EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip")
    return EasyDict(
        encoder=PersistentObject(encoder, encoder_state, source),
        dataset_kwargs=dataset,
        loss_fn=PersistentObject("EDM2Loss", loss_state, source),
        ema=precond,
    )


def network(label_dim: int, channels: int = 4, seed: int = 0) -> nn.Module:
    """A tiny dmstab EDM2 denoiser with float16-exact weights and nonzero gains, of latents
    (4 channels) or pixels (3)."""
    data = "data.name=latents" if channels == 4 else "data.name=folder"
    tree = apply_overrides(TREE, [f"model.class_cond={str(label_dim > 0).lower()}", data])
    torch.manual_seed(seed)
    denoiser = build_model(from_mapping(tree), label_dim)
    with torch.no_grad():
        for tensor in denoiser.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.5).copy_(tensor.half().float())
    return denoiser.eval()


def write_pickle(path: Path, data: object) -> Path:
    path.write_bytes(pickle.dumps(data, protocol=4))  # Python 3.8-3.13's default
    return path
