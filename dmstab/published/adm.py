"""openai/improved-diffusion and openai/guided-diffusion `.pt` files: a `UNetModel` state dict.

The file holds only tensors (read weights-only), so the architecture is read from their names
and shapes: the width (`time_embed.0`), the levels, blocks and widths (where the decoder
upsamples), attention (which blocks hold `qkv`), FiLM conditioning (the width of the
embedding projection), BigGAN resampling blocks, a learned Σ (6 output channels) and the
classes (`label_emb`). The rest (resolution, heads, attention order, dropout, the diffusion
schedule) the user gives, or the `KnownFile` of a released file says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from dmstab.config import apply_overrides
from dmstab.errors import DmstabError
from dmstab.published.adm_known import KNOWN_FILES
from dmstab.published.format import ImportedModel, PublishedFormat, register_format
from dmstab.reading import not_a, read_torch

KIND = "improved-/guided-diffusion checkpoint"

# The reference's module paths, as its classes name their parts, and dmstab's (ADMUNet) for the
# same part.
RENAMES = [
    (r"^input_blocks\.", "encoder."),
    (r"^middle_block\.", "middle."),
    (r"^output_blocks\.", "decoder."),
    (r"^label_emb\.", "label_embed."),
    # ResBlock: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU, linear),
    # out_layers = (GroupNorm, SiLU, Dropout, conv), skip_connection.
    (r"\.in_layers\.0\.", ".in_norm."),
    (r"\.in_layers\.2\.", ".in_conv."),
    (r"\.emb_layers\.1\.", ".emb_proj."),
    (r"\.out_layers\.0\.", ".out_norm."),
    (r"\.out_layers\.3\.", ".out_conv."),
    (r"\.skip_connection\.", ".skip."),
    (r"\.op\.", "."),  # Downsample's strided conv is the stage's layer itself
    (r"\.conv\.", ".1."),  # Upsample's conv follows nn.Upsample in an nn.Sequential
]
# The attention's qkv and output projections are 1x1 Conv1d there, (out, in, 1) weights;
# nn.Linear here, (out, in).
_CONV1D_AS_LINEAR = re.compile(r"\.(qkv|proj_out)\.weight$")

# What the tensors cannot tell, each a recipe key the user (or the KnownFile) must give.
RESOLUTION = "data.resolution"
HEADS = ("model.num_heads", "model.num_head_channels")
REQUIRED = ("model.attention_order", "model.dropout", "diffusion.schedule", "diffusion.steps")


def dmstab_name(reference_name: str) -> str:
    """The ADMUNet parameter name of a reference `UNetModel` parameter."""
    for pattern, replacement in RENAMES:
        reference_name = re.sub(pattern, replacement, reference_name)
    return reference_name


def dmstab_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The reference's state dict under ADMUNet's names and shapes, floating point in float32
    (the fp16-trained files hold float16)."""
    weights = {}
    for name, value in state.items():
        if _CONV1D_AS_LINEAR.search(name) and value.ndim == 3 and value.shape[-1] == 1:
            value = value.squeeze(-1)
        weights[dmstab_name(name)] = value.float() if value.is_floating_point() else value
    return weights


@dataclass(frozen=True)
class AdmLayout:
    """What a `UNetModel` state dict tells of the network that wrote it. `attention_rates` are
    the downsampling rates (1 = full resolution) at which the blocks attend, as the reference
    takes them; `channel_mult` may hold a fraction (guided-diffusion's 512x512: 0.5)."""

    model_channels: int
    channel_mult: tuple[int | float, ...]
    num_res_blocks: int
    attention_rates: tuple[int, ...]
    use_scale_shift_norm: bool
    resblock_updown: bool
    in_channels: int
    out_channels: int
    num_classes: int


def _block_indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return sorted({int(m.group(1)) for name in state if (m := pattern.match(name))})


def _upsamples(state: Mapping[str, Tensor], block: int) -> bool:
    """Whether decoder block `block` ends in an upsampler: an `Upsample` conv, or (with
    resblock_updown) a second ResBlock after the first."""
    prefix = f"output_blocks.{block}."
    return any(
        name.startswith(prefix)
        and (name.endswith(".conv.weight") or re.match(rf"{prefix}[12]\.in_layers\.", name))
        for name in state
    )


def _attends(state: Mapping[str, Tensor], prefix: str) -> bool:
    return f"{prefix}.1.qkv.weight" in state


def _mult(width: int, model_channels: int) -> int | float:
    mult = width / model_channels
    return int(mult) if mult.is_integer() else mult


def infer_layout(state: Mapping[str, Tensor], path: Path) -> AdmLayout:
    """The architecture a reference `UNetModel` state dict was written by."""
    required = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")
    missing = [name for name in required if name not in state]
    if missing:
        raise not_a(path, KIND, f"no {missing[0]!r} tensor; it is not a UNetModel state dict")
    model_channels = int(state["time_embed.0.weight"].shape[1])
    in_channels = int(state["input_blocks.0.0.weight"].shape[1])
    out_channels = int(state["out.2.weight"].shape[0])
    decoder = _block_indices(state, "output_blocks")
    upsampling = [block for block in decoder if _upsamples(state, block)]
    # The decoder has num_res_blocks + 1 blocks a level and upsamples at the end of each level
    # but the last (improved-diffusion unet.py).
    num_res_blocks = upsampling[0] if upsampling else len(decoder) - 1
    levels = len(upsampling) + 1
    if num_res_blocks < 1 or len(decoder) != levels * (num_res_blocks + 1):
        raise not_a(path, KIND, f"{len(decoder)} decoder blocks fit no UNetModel layout")
    widths = []
    for level in range(levels):  # the decoder's first block of each level, deepest first
        block = (levels - 1 - level) * (num_res_blocks + 1)
        widths.append(int(state[f"output_blocks.{block}.0.out_layers.3.weight"].shape[0]))
    rates = set()
    for block in decoder:
        if _attends(state, f"output_blocks.{block}"):
            rates.add(2 ** (levels - 1 - block // (num_res_blocks + 1)))
    encoder_attends = sum(_attends(state, f"input_blocks.{i}") for i in range(1, 1 + len(decoder)))
    if (
        encoder_attends * (num_res_blocks + 1)
        != sum(_attends(state, f"output_blocks.{b}") for b in decoder) * num_res_blocks
    ):
        raise not_a(path, KIND, "its encoder and decoder attend at different levels")
    emb = state["output_blocks.0.0.emb_layers.1.weight"].shape[0]
    label = state.get("label_emb.weight")
    return AdmLayout(
        model_channels=model_channels,
        channel_mult=tuple(_mult(width, model_channels) for width in widths),
        num_res_blocks=num_res_blocks,
        attention_rates=tuple(sorted(rates)),
        use_scale_shift_norm=emb == 2 * widths[-1],
        resblock_updown=bool(upsampling) and not any(n.endswith(".conv.weight") for n in state),
        in_channels=in_channels,
        out_channels=out_channels,
        num_classes=0 if label is None else int(label.shape[0]),
    )


def _given(given: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in given:
        raise DmstabError(
            f"{path.name}: the file cannot tell {key}; give it as an override {key}=VALUE"
        )
    return given[key]


def recipe_tree(layout: AdmLayout, given: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The recipe of the network `layout` describes, with the settings only `given` holds."""
    resolution = int(_given(given, RESOLUTION, path))
    unreachable = [rate for rate in layout.attention_rates if resolution % rate]
    if unreachable or resolution % 2 ** (len(layout.channel_mult) - 1):
        raise DmstabError(
            f"{path.name}: {RESOLUTION}={resolution} does not halve {len(layout.channel_mult)} "
            "times into whole feature maps"
        )
    if not any(key in given for key in HEADS):
        raise DmstabError(
            f"{path.name}: the file cannot tell the attention heads; give {HEADS[0]}=N or "
            f"{HEADS[1]}=C"
        )
    if layout.in_channels != 3:
        raise DmstabError(
            f"{path.name}: {layout.in_channels} input channels; dmstab imports image models "
            "(3 channels), not super-resolution ones"
        )
    if layout.out_channels not in (3, 6):
        raise not_a(path, KIND, f"{layout.out_channels} output channels, not 3 or 6")
    model: dict[str, Any] = {
        "name": "adm_unet",
        "channels": layout.model_channels,
        "channel_mult": list(layout.channel_mult),
        "num_res_blocks": layout.num_res_blocks,
        "attention_resolutions": [resolution // rate for rate in layout.attention_rates],
        "use_scale_shift_norm": layout.use_scale_shift_norm,
        "resblock_updown": layout.resblock_updown,
        "learn_sigma": layout.out_channels == 6,
        "class_cond": layout.num_classes > 0,
        "num_heads": given.get(HEADS[0], 4),
        "num_head_channels": given.get(HEADS[1], -1),
    }
    tree: dict[str, Any] = {
        "name": path.stem,
        "data": {"resolution": resolution},
        "model": model,
        "diffusion": {"formulation": "ddpm", "target": "eps"},
    }
    for key in REQUIRED:
        section, name = key.split(".")
        tree[section][name] = _given(given, key, path)
    return tree


def read(path: Path, given: Mapping[str, Any]) -> ImportedModel:
    """An improved-/guided-diffusion `.pt` file as a dmstab recipe and ADMUNet weights."""
    state = read_torch(path, KIND)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise not_a(path, KIND, "it is not a dictionary of tensors (a state dict)")
    layout = infer_layout(state, path)
    tree = recipe_tree(layout, given, path)
    known = next((k for k in KNOWN_FILES if k.name == path.name), None)
    if known is not None:  # how the released model was trained, and its paper
        tree = apply_overrides(tree, known.overrides)
        tree["paper"] = {"source": known.paper, "notes": f"{known.description} ({known.url})"}
    inferred = {f"model.{key}": value for key, value in asdict(layout).items()}
    inferred["model.attention_resolutions"] = tree["model"]["attention_resolutions"]
    return ImportedModel(
        recipe=tree,
        weights=dmstab_weights(state),
        num_classes=layout.num_classes,
        inferred=inferred,
        known=known,
    )


register_format(
    PublishedFormat(
        name="adm",
        suffixes=(".pt",),
        read=read,
        known_files=KNOWN_FILES,
        summary="openai/improved-diffusion and openai/guided-diffusion UNetModel state dicts",
    )
)
