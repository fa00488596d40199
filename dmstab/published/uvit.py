"""U-ViT's released `.pth` files (baofff/U-ViT; Bao et al., CVPR 2023) read into dmstab's `uvit`.

A released file is the bare state dict of U-ViT's `libs/uvit.py` `UViT` (`torch.save(
nnet.state_dict())`, read by its eval scripts with `load_state_dict(torch.load(path))`).
Everything but the number of attention heads is read from the tensors:

- `patch_embed.proj.weight` (D, C, p, p): the width D, the input channels C (3 pixels, 4 SD-VAE
  latents) and the patch size p;
- `in_blocks.*` / `out_blocks.*`: depth//2 blocks each (dmstab's `depth` counts all blocks,
  in + mid + out; the official config's `depth` counts in + out);
- `*.mlp.fc1.weight` (hidden, D): `mlp_ratio`; a `qkv.bias`: `qkv_bias`;
- `label_emb.weight` (rows, D): class-conditional. The latent models (C = 4) were trained with
  classifier-free guidance and have one row more than classes, the null class K
  (`model.null_class`); the pixel ones have one row a class. `model.null_class` in the given
  settings says otherwise;
- `pos_embed` (1, extras + (R/p)², D): the resolution R (the latent grid for latent models);
- `decoder_pred.weight` (p²·C_out, D): learned Σ when C_out = 2C (never, officially);
- `final_layer.weight`: the final 3×3 conv (`model.conv_out`).

Names: U-ViT's `Mlp` (fc1, fc2) is dmstab's nn.Sequential (0, 3); its out-block holds the long
skip's `skip_linear` beside its transformer parts, dmstab's `SkipBlock` holds `skip_linear` and
`block`; `patch_embed.proj` is `patch_embed`, `label_emb` `label_embed`, `decoder_pred`
`to_pixels`, `final_layer` `conv_out`.

Time: U-ViT's forward embeds the timestep it is given: 999·t for its continuous VP SDE (pixel
models and U-ViT-L on latents), n in 1…1000 for its discrete schedule (U-ViT-H on latents).
dmstab's DDPM model time is the 0-based step index i, and step i is U-ViT's n = i + 1 (or
t = (i+1)/1000, embedded 0.999·(i+1)), so every imported model gets `model.time_shift: 1`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmstab.config import apply_overrides, parse_override, set_key
from dmstab.errors import DmstabError
from dmstab.published.format import (
    ImportedModel,
    KnownFile,
    PublishedFormat,
    register_format,
)
from dmstab.published.uvit_files import KNOWN_FILES, U_VIT_PAPER
from dmstab.reading import read_torch

KIND = "U-ViT checkpoint"
LATENT_CHANNELS = 4  # SD-VAE latents; 3 = pixels
TIME_SHIFT = 1.0  # U-ViT's n = dmstab's 0-based step index + 1 (module doc)

# (U-ViT's name, dmstab's), applied in order to every parameter name.
RENAMES = (
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"^label_emb\.", "label_embed."),
    (r"^decoder_pred\.", "to_pixels."),
    (r"^final_layer\.", "conv_out."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
    (r"^out_blocks\.(\d+)\.(?!skip_linear\.)", r"out_blocks.\1.block."),
)
BLOCK_PARTS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


def dmstab_name(uvit_name: str) -> str:
    """The dmstab `UViT` parameter that U-ViT's parameter `uvit_name` is."""
    for pattern, replacement in RENAMES:
        uvit_name = re.sub(pattern, replacement, uvit_name)
    return uvit_name


def _tensor(state: Mapping[str, Tensor], name: str, ndim: int, path: Path) -> Tensor:
    value = state.get(name)
    if value is None:
        raise DmstabError(f"{KIND} {path} has no {name}: not a U-ViT state dict")
    if value.ndim != ndim:
        raise DmstabError(f"{KIND} {path}: {name} has shape {tuple(value.shape)}, not {ndim}-D")
    return value


def _blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for n in state if (m := re.match(rf"{prefix}\.(\d+)\.", n))}
    return len(indices)


def infer_settings(
    state: Mapping[str, Tensor], path: Path, null_class: bool | None
) -> dict[str, Any]:
    """The architecture the tensors show, as flat recipe keys (`model.*`, `data.resolution`),
    plus `channels` (3 or 4) and, when class-conditional, `num_classes` (null class excluded).
    `null_class`: whether the label table ends with the null class (None: latent models do)."""
    if any(name.startswith("time_embed.") for name in state):
        raise DmstabError(
            f"{KIND} {path} has a time-embedding MLP (mlp_time_embed=True), which dmstab's "
            "uvit does not build (no released U-ViT has one)"
        )
    width, channels, patch, _ = _tensor(state, "patch_embed.proj.weight", 4, path).shape
    half = _blocks(state, "in_blocks")
    if half != _blocks(state, "out_blocks"):
        raise DmstabError(f"{KIND} {path}: in- and out-blocks differ in number")
    if half and "out_blocks.0.skip_linear.weight" not in state:
        raise DmstabError(f"{KIND} {path} has no long skips (skip=False); dmstab's uvit has them")
    hidden = _tensor(state, "mid_block.mlp.fc1.weight", 2, path).shape[0]
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:
        raise DmstabError(f"{KIND} {path}: MLP width {hidden} is no ratio of the width {width}")
    labels = state.get("label_emb.weight")
    class_cond = labels is not None
    extras = 2 if class_cond else 1  # label token, time token
    tokens = _tensor(state, "pos_embed", 3, path).shape[1] - extras
    side = round(tokens**0.5)
    if side * side != tokens:
        raise DmstabError(f"{KIND} {path}: pos_embed holds {tokens} patches, not a square grid")
    out_channels = _tensor(state, "decoder_pred.weight", 2, path).shape[0] // (patch * patch)
    if out_channels not in (channels, 2 * channels):
        raise DmstabError(
            f"{KIND} {path}: decoder_pred gives {out_channels} channels for {channels} in"
        )
    settings = {
        "data.resolution": side * patch,
        "model.patch_size": patch,
        "model.embed_dim": width,
        "model.depth": 2 * half + 1,
        "model.mlp_ratio": mlp_ratio,
        "model.qkv_bias": "mid_block.attn.qkv.bias" in state,
        "model.learn_sigma": out_channels == 2 * channels,
        "model.conv_out": "final_layer.weight" in state,
        "model.class_cond": class_cond,
        "model.null_class": False,
    }
    if labels is not None:
        with_null = channels == LATENT_CHANNELS if null_class is None else null_class
        settings["model.null_class"] = with_null
        settings["num_classes"] = labels.shape[0] - with_null
    settings["channels"] = channels
    return settings


def _weights(state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """float32 copies under dmstab's names; anything U-ViT's UViT does not hold is refused."""
    parts = "|".join(map(re.escape, (*BLOCK_PARTS, "attn.qkv.bias")))
    expected = re.compile(
        r"^(pos_embed|patch_embed\.proj\.(weight|bias)|label_emb\.weight|norm\.(weight|bias)"
        r"|decoder_pred\.(weight|bias)|final_layer\.(weight|bias)"
        rf"|(in_blocks\.\d+\.|mid_block\.|out_blocks\.\d+\.)({parts})"
        r"|out_blocks\.\d+\.skip_linear\.(weight|bias))$"
    )
    strange = sorted(name for name in state if not expected.match(name))
    if strange:
        raise DmstabError(f"{KIND} {path} holds parameters U-ViT's UViT has not: {strange[:3]}")
    return {dmstab_name(name): value.to(torch.float32) for name, value in state.items()}


def _check_given(given: Mapping[str, Any], inferred: Mapping[str, Any], path: Path) -> None:
    for key, value in inferred.items():
        if key in given and given[key] != value:
            raise DmstabError(f"{key}={given[key]} disagrees with {path.name}, which holds {value}")


def _data(given: Mapping[str, Any], channels: int, resolution: int) -> dict[str, Any]:
    """The data section: SD-VAE latents for 4 channels, else the given (default folder) images."""
    name = given.get("data.name", "latents" if channels == LATENT_CHANNELS else "folder")
    if (name == "latents") != (channels == LATENT_CHANNELS):
        raise DmstabError(
            f"data.name={name} disagrees with the file's {channels} input channels "
            "(4: data.name=latents; 3: images)"
        )
    root = given.get("data.root", f"data/{name}")
    return {"name": name, "root": root, "resolution": resolution}


def read_uvit(path: Path, given: Mapping[str, Any]) -> ImportedModel:
    """A released U-ViT `.pth` as a dmstab `uvit` recipe tree and its weights."""
    known = next((file for file in KNOWN_FILES if file.name == path.name), None)
    state = read_torch(path, KIND)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DmstabError(f"{KIND} {path} is not a state dict (names to tensors)")
    inferred = infer_settings(state, path, given.get("model.null_class"))
    channels, num_classes = inferred.pop("channels"), inferred.pop("num_classes", 0)
    _check_given(given, inferred, path)
    tree = recipe_tree(path, inferred, channels, given, known)
    return ImportedModel(
        recipe=tree,
        weights=_weights(state, path),
        num_classes=num_classes,
        inferred=inferred,
        known=known,
    )


def recipe_tree(
    path: Path,
    inferred: Mapping[str, Any],
    channels: int,
    given: Mapping[str, Any],
    known: KnownFile | None,
) -> dict[str, Any]:
    """The recipe tree of a U-ViT file whose tensors show `inferred`: its architecture, the
    given heads, and the known file's training settings and paper (else U-ViT's defaults)."""
    users = given
    if known is not None:  # its settings, under the user's
        given = {**_flat(known.overrides), **given}
    num_heads = given.get("model.num_heads")
    if num_heads is None:
        raise DmstabError(
            f"{path.name} cannot tell its attention heads: give model.num_heads (U-ViT-S 8, "
            "M 12, L and H 16)"
        )
    model = {
        key.removeprefix("model."): v for key, v in inferred.items() if key.startswith("model.")
    }
    tree: dict[str, Any] = {
        "name": path.stem,
        "data": _data(given, channels, inferred["data.resolution"]),
        "model": {
            "name": "uvit",
            **model,
            "num_heads": num_heads,
            "dropout": 0.0,
            "time_shift": TIME_SHIFT,
        },
        "diffusion": {"formulation": "ddpm", "schedule": "linear", "steps": 1000, "target": "eps"},
        "sample": {"clip_denoised": False},
        "paper": {"source": U_VIT_PAPER},
    }
    if known is not None:
        tree = apply_overrides(tree, known.overrides)
    for key, value in users.items():  # the user's settings over the known file's
        tree = set_key(tree, key.split("."), value)
    return tree


def _flat(overrides: tuple[str, ...]) -> dict[str, Any]:
    """`a.b=v` overrides as the flat {"a.b": v} of `given`."""
    return {".".join(key): value for key, value in map(parse_override, overrides)}


UVIT = PublishedFormat(
    name="uvit",
    suffixes=(".pth",),
    read=read_uvit,
    known_files=KNOWN_FILES,
    summary="U-ViT (baofff/U-ViT, Bao et al. CVPR 2023) released .pth state dicts",
)
register_format(UVIT)
