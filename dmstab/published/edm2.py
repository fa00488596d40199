"""`dmstab import --format edm2`: NVlabs/edm2's network pickles into dmstab's EDM2 network.

A released pickle (and every snapshot EDM2's training writes) holds `ema`, the `Precond`
denoiser (its `UNet` and the uncertainty u(σ) of Eq. 21), in float16, beside `encoder` (SD-VAE
latents or 8-bit pixels), `loss_fn` (P_mean, P_std) and `dataset_kwargs`. `safe_pickle` reads
it as records without running its code; here the constructor arguments of `Precond`, `UNet` and
the blocks become an `edm2_unet` recipe (config G, EDM2 Table 1) and the tensors are renamed to
dmstab's parameter names, after checking them, block by block, against the network that recipe
builds (on the meta device, so no memory is spent): every name and shape, each block's
resampling, flavour and attention heads, and the stored balances and clipping.

The pickle holds every setting of the network, so nothing needs to be given. Its name gives
the post-hoc EMA length (`edm2-img512-xs-2147483-0.135.pkl`: σrel 0.135), which the imported
checkpoint carries as `ema-reconstruct`'s outputs do, so `dmstab fid-sweep` scores it. A guide (EDM2
Sec. 5, or autoguidance) is a pickle of its own: import it too, and set `sample.guide` to its
checkpoint and `sample.guidance` to w on the main network (`edm2_releases` lists the pairs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import dmstab.diffusion.samplers  # noqa: F401  (registers heun, which the recipe names)
from dmstab.config.loading import from_mapping
from dmstab.data.latents import FINAL_MEAN, FINAL_STD, RAW_MEAN, RAW_STD, VAE_NAME
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.edm2_unet import SWITCHES, EDM2Block, EDM2UNet
from dmstab.published.edm2_releases import known_files, named_sigma_rel
from dmstab.published.format import ImportedModel, PublishedFormat, register_format
from dmstab.published.safe_pickle import PickledObject, read_edm2_pickle
from dmstab.reading import not_a

KIND = "EDM2 network pickle"
KNOWN_FILES = known_files()

# NVlabs/edm2 training/networks_edm2.py: each constructor's parameters in order, with the
# defaults of those a pickle's constructor call may leave out.
PRECOND_ARGS = (
    "img_resolution",
    "img_channels",
    "label_dim",
    "use_fp16",
    "sigma_data",
    "logvar_channels",
)
PRECOND_DEFAULTS = {"use_fp16": True, "sigma_data": 0.5, "logvar_channels": 128}
UNET_ARGS = (
    "img_resolution",
    "img_channels",
    "label_dim",
    "model_channels",
    "channel_mult",
    "channel_mult_noise",
    "channel_mult_emb",
    "num_blocks",
    "attn_resolutions",
    "label_balance",
    "concat_balance",
)
UNET_DEFAULTS = {
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 4],
    "channel_mult_noise": None,
    "channel_mult_emb": None,
    "num_blocks": 3,
    "attn_resolutions": [16, 8],
    "label_balance": 0.5,
    "concat_balance": 0.5,
}
BLOCK_DEFAULTS = {
    "resample_filter": [1, 1],
    "channels_per_head": 64,
    "dropout": 0.0,
    "res_balance": 0.3,
    "attn_balance": 0.3,
    "clip_act": 256,
}
BLOCK_STORED = ("resample_filter", "dropout", "res_balance", "attn_balance", "clip_act")
RESAMPLE_MODES = {"keep": "none", "up": "up", "down": "down"}

# EDM2's module paths -> dmstab's (the u(σ) module is both the UNet's and the denoiser's).
MODULES = {
    "unet.emb_fourier": ("net.embedding.fourier",),
    "unet.emb_noise": ("net.embedding.noise0",),
    "unet.emb_label": ("net.embedding.label",),
    "unet.out_conv": ("net.out_conv",),
    "unet": ("net",),  # out_gain
    "logvar_fourier": ("net.uncertainty.fourier", "uncertainty.fourier"),
    "logvar_linear": ("net.uncertainty.linear", "uncertainty.linear"),
}
BLOCK_CHILDREN = {"attn_qkv": "attention.qkv", "attn_proj": "attention.proj"}

# Data the encoder stands for, with the placeholder roots of recipes/edm2_base.yaml and
# edm2_img64_s.yaml, and the training noise levels of EDM2 Table 6 when no loss_fn is stored.
DATA = {
    "StabilityVAEEncoder": ({"name": "latents", "root": "data/imagenet512_latents.npz"}, 4),
    "StandardRGBEncoder": ({"name": "folder", "root": "data/imagenet/train"}, 3),
}
P_MEAN_STD = {"latents": (-0.4, 1.0), "folder": (-0.8, 1.6)}
SAMPLE = {  # EDM2's sampler: 32 Heun steps from σ 80 to 0.002, ρ 7 (App. D.1)
    "sampler": "heun",
    "steps": 32,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "rho": 7.0,
    "s_churn": 0.0,
    "clip_denoised": False,
}


def _arguments(
    record: PickledObject, positional: tuple[str, ...], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """A constructor's arguments by name: the defaults, then those the call gave."""
    return {
        **defaults,
        **dict(zip(positional, record.init_args, strict=False)),
        **record.init_kwargs,
    }


def _child(path: Path, record: PickledObject, name: str, class_name: str) -> PickledObject:
    child = record.submodules().get(name)
    if not isinstance(child, PickledObject) or child.class_name != class_name:
        raise not_a(path, KIND, f"its {record.class_name} has no {class_name} {name!r}")
    return child


def _precond(data: object, path: Path) -> PickledObject:
    """The `Precond` network: the pickle's `ema`, or the pickle itself."""
    network = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(network, PickledObject) or network.class_name != "Precond":
        holds = f"keys {', '.join(map(str, data))}" if isinstance(data, dict) else "no dict"
        raise not_a(path, KIND, f"no 'ema' Precond network; it holds {holds}")
    return network


def _unsupported(path: Path, what: str) -> DmstabError:
    return DmstabError(f"{KIND} {path}: {what}, which dmstab's EDM2 network cannot hold")


def _model_section(path: Path, precond: PickledObject) -> dict[str, Any]:
    """`model:` from the constructor arguments of Precond and UNet (and the blocks' through it)."""
    outer = _arguments(precond, PRECOND_ARGS, PRECOND_DEFAULTS)
    unet = _arguments(_child(path, precond, "unet", "UNet"), UNET_ARGS, UNET_DEFAULTS)
    block = {**BLOCK_DEFAULTS, **{k: v for k, v in unet.items() if k in BLOCK_DEFAULTS}}
    known = {*UNET_ARGS, *UNET_DEFAULTS, *BLOCK_DEFAULTS}
    foreign = sorted(set(unet) - known)
    if foreign:
        raise _unsupported(path, f"its UNet takes {', '.join(foreign)}")
    mult, channels = list(unet["channel_mult"]), unet["model_channels"]
    noise = channels * (unet["channel_mult_noise"] or mult[0])
    emb = channels * (unet["channel_mult_emb"] or max(mult))
    if noise != channels or emb != channels * max(mult):
        raise _unsupported(path, f"its noise and embedding widths are {noise} and {emb}")
    if list(block["resample_filter"]) != [1, 1] or block["clip_act"] is None:
        raise _unsupported(
            path, f"resample_filter {block['resample_filter']}, clip_act {block['clip_act']}"
        )
    return {
        "name": "edm2_unet",
        "channels": channels,
        "channel_mult": mult,
        "num_res_blocks": unet["num_blocks"],
        "attention_resolutions": list(unet["attn_resolutions"]),
        "dropout": float(block["dropout"]),
        "class_cond": unet["label_dim"] > 0,
        "edm2": {
            **dict.fromkeys(SWITCHES, True),  # config G
            "channels_per_head": block["channels_per_head"],
            "res_balance": block["res_balance"],
            "attn_balance": block["attn_balance"],
            "label_balance": unet["label_balance"],
            "concat_balance": unet["concat_balance"],
            "clip_act": float(block["clip_act"]),
            "logvar_channels": outer["logvar_channels"],
        },
    }


def _checked_latent_scaling(path: Path, encoder: PickledObject) -> None:
    """dmstab maps SD-VAE latents with EDM2's ImageNet-512 statistics; so must the pickle."""
    scale = np.float32(FINAL_STD) / np.asarray(RAW_STD, dtype=np.float32)
    bias = np.float32(FINAL_MEAN) - np.asarray(RAW_MEAN, dtype=np.float32) * scale
    stored = [np.asarray(encoder.state.get(key), dtype=np.float64) for key in ("scale", "bias")]
    same = all(
        s.shape == ours.shape and np.allclose(s, ours, rtol=1e-6, atol=1e-7)
        for s, ours in zip(stored, (scale, bias), strict=True)
    )
    if encoder.state.get("vae_name") != VAE_NAME or not same:
        raise _unsupported(
            path,
            f"its latents are {encoder.state.get('vae_name')} latents scaled by "
            f"{stored[0].tolist()} and shifted by {stored[1].tolist()}, not EDM2's ImageNet-512 "
            "statistics (dmstab.data.latents)",
        )


def _data_and_diffusion(
    path: Path, data: object, precond: PickledObject
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`data:` and `diffusion:` from the encoder, loss_fn and Precond the pickle holds."""
    outer = _arguments(precond, PRECOND_ARGS, PRECOND_DEFAULTS)
    stored = data if isinstance(data, dict) else {}
    encoder = stored.get("encoder")
    by_channels = {channels: name for name, (_, channels) in DATA.items()}
    name = encoder.class_name if isinstance(encoder, PickledObject) else None
    name = name or by_channels.get(outer["img_channels"])
    if name not in DATA or DATA[name][1] != outer["img_channels"]:
        raise _unsupported(path, f"its data are {outer['img_channels']}-channel {name}")
    if isinstance(encoder, PickledObject) and name == "StabilityVAEEncoder":
        _checked_latent_scaling(path, encoder)
    section = {**DATA[name][0], "resolution": outer["img_resolution"], "hflip": False}
    p_mean, p_std = P_MEAN_STD[section["name"]]
    loss = stored.get("loss_fn")
    if isinstance(loss, PickledObject):
        p_mean, p_std = loss.state.get("P_mean", p_mean), loss.state.get("P_std", p_std)
    diffusion = {
        "formulation": "edm",
        "p_mean": float(p_mean),
        "p_std": float(p_std),
        "sigma_data": float(precond.state.get("sigma_data", outer["sigma_data"])),
        "label_dropout": 0.0,
    }
    return section, diffusion


def _check_block(path: Path, name: str, record: object, ours: nn.Module, tree: Any) -> None:
    """An EDM2 block against dmstab's block at the same place in the network."""
    if not isinstance(record, PickledObject) or record.class_name != "Block":
        raise not_a(path, KIND, f"its UNet's {name} is not a Block")
    if not isinstance(ours, EDM2Block):
        raise not_a(path, KIND, f"its UNet's {name} has no counterpart in dmstab's network")
    edm2 = tree["model"]["edm2"]
    heads = 0 if ours.attention is None else ours.attention.num_heads
    expected = {
        "flavor": ours.flavor,
        "resample_mode": ours.resample_mode,
        "num_heads": heads,
        "res_balance": edm2["res_balance"],
        "attn_balance": edm2["attn_balance"],
        "clip_act": edm2["clip_act"],
        "dropout": tree["model"]["dropout"],
        "resample_filter": [1, 1],
    }
    state = dict(record.state)
    state["resample_mode"] = RESAMPLE_MODES.get(str(state.get("resample_mode")), "?")
    for key, value in expected.items():
        stored = state.get(key)
        if stored != value and not (key == "resample_filter" and list(stored or ()) == value):
            raise not_a(
                path, KIND, f"its block {name} has {key}={stored!r} where dmstab's has {value!r}"
            )


def _module_names(path: Path, precond: PickledObject, net: EDM2UNet, tree: Any) -> dict[str, Any]:
    """EDM2 module path -> dmstab's, with the encoder and decoder blocks checked in order."""
    modules: dict[str, tuple[str, ...]] = dict(MODULES)
    unet = _child(path, precond, "unet", "UNet")
    for side, ours in (("enc", net.encoder), ("dec", net.decoder)):
        blocks = dict(_child(path, unet, side, "torch.nn.ModuleDict").submodules())
        if side == "enc" and blocks:
            first = next(iter(blocks))
            modules[f"unet.enc.{first}"] = ("net.enc_conv",)
            del blocks[first]
        if len(blocks) != len(ours):
            raise not_a(
                path,
                KIND,
                f"its UNet has {len(blocks)} {side} blocks where dmstab's has {len(ours)}",
            )
        for index, ((name, record), block) in enumerate(zip(blocks.items(), ours, strict=True)):
            _check_block(path, f"{side}.{name}", record, block, tree)
            modules[f"unet.{side}.{name}"] = (
                f"net.{'encoder' if side == 'enc' else 'decoder'}.{index}",
            )
    return modules


def _renamed(name: str, modules: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """dmstab's names of the tensor EDM2 calls `name` (the longest module path that holds it)."""
    module, _, leaf = name.rpartition(".")
    owners = [path for path in modules if module == path or module.startswith(f"{path}.")]
    if not owners:
        return ()
    owner = max(owners, key=len)
    rest = module[len(owner) :]
    for theirs, ours in BLOCK_CHILDREN.items():
        rest = rest.replace(f".{theirs}", f".{ours}")
    return tuple(f"{target}{rest}.{leaf}" for target in modules[owner])


def _weights(path: Path, precond: PickledObject, tree: Any, label_dim: int) -> dict[str, Tensor]:
    """The pickle's tensors under dmstab's names, float32, checked against the network the
    recipe tree builds (on the meta device: names and shapes only)."""
    with torch.device("meta"):
        denoiser = build_model(from_mapping(tree), label_dim)
    net = getattr(denoiser, "net", None)
    if not isinstance(net, EDM2UNet):
        raise TypeError("edm2_unet builds an EDMPrecond around an EDM2UNet")
    modules = _module_names(path, precond, net, tree)
    expected = {name: tuple(t.shape) for name, t in denoiser.state_dict().items()}
    weights: dict[str, Tensor] = {}
    for name, tensor in precond.named_tensors():
        targets = _renamed(name, modules)
        if not targets or any(expected.get(t) != tuple(tensor.shape) for t in targets):
            ours = [expected.get(t) for t in targets]
            raise not_a(
                path,
                KIND,
                f"its {name} {tuple(tensor.shape)} matches no tensor of dmstab's "
                f"network ({', '.join(targets) or 'no name'}: {ours})",
            )
        for target in targets:
            weights[target] = tensor.to(torch.float32)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise not_a(path, KIND, f"no tensor for dmstab's {', '.join(missing[:3])}")
    return weights


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_edm2(path: Path, given: Mapping[str, Any]) -> ImportedModel:
    """An EDM2 network pickle as a dmstab recipe tree and state dict; `given` is not needed
    (the pickle holds every setting), the command applies it to the tree."""
    data = read_edm2_pickle(path, KIND)
    precond = _precond(data, path)
    model = _model_section(path, precond)
    data_section, diffusion = _data_and_diffusion(path, data, precond)
    tree = {"data": data_section, "model": model, "diffusion": diffusion, "sample": dict(SAMPLE)}
    label_dim = int(_arguments(precond, PRECOND_ARGS, PRECOND_DEFAULTS)["label_dim"])
    weights = _weights(path, precond, tree, label_dim)
    known = next((file for file in KNOWN_FILES if file.name == path.name), None)
    inferred = _flat({key: tree[key] for key in ("data", "model", "diffusion")})
    del inferred["data.root"]  # a placeholder, not read from the file
    return ImportedModel(tree, weights, label_dim, inferred, known, named_sigma_rel(path.name))


register_format(
    PublishedFormat(
        name="edm2",
        suffixes=(".pkl",),
        read=read_edm2,
        known_files=KNOWN_FILES,
        summary="NVlabs/edm2 network pickles (EDM2 and autoguidance), read without running "
        "their code",
    )
)
