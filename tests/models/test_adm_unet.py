import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmstab.errors import DmstabError
from dmstab.models.adm_unet import ADMUNet, AttentionBlock, Resample, ResBlock, timestep_embedding

TINY: dict[str, Any] = {
    "image_size": 32,
    "model_channels": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": [16],
    "out_channels": 3,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "attention_at_input_resolution": {"image_size": 16, "attention_resolutions": [16]},
    "class_conditional": {"num_classes": 10},
    "resblock_updown": {"resblock_updown": True, "num_classes": 10},
    "num_head_channels": {"num_head_channels": 16},
    "learned_sigma_no_scale_shift": {"out_channels": 6, "use_scale_shift_norm": False},
    "three_levels_two_blocks": {"channel_mult": (1, 2, 2), "num_res_blocks": 2},
}


def tiny(**overrides: Any) -> ADMUNet:
    torch.manual_seed(0)
    return ADMUNet(**{**TINY, **overrides}).eval()


def inputs(model: ADMUNet, size: int, batch: int = 2) -> tuple[Tensor, Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    y = (
        None
        if model.label_embed is None
        else torch.arange(batch) % model.label_embed.num_embeddings
    )
    return x, t, y


def unzero(model: nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised parameters random values, as after some training."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * std)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_improved_diffusion_cifar10_model_has_52546438_parameters() -> None:
    with torch.device("meta"):
        model = ADMUNet(
            image_size=32,
            model_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=3,
            attention_resolutions=[16, 8],
            num_heads=4,
            dropout=0.3,
            use_scale_shift_norm=True,
            out_channels=6,
        )
    assert n_params(model) == 52_546_438


def test_resblock_updown_swaps_resample_convs_for_resblocks() -> None:
    # Closed form: a ResBlock(c, c) with scale-shift on a 4·32 embedding replaces a 3x3 conv(c, c).
    def resblock(c: int) -> int:
        return 2 * (2 * c) + 2 * (9 * c * c + c) + (4 * 32 + 1) * 2 * c

    def conv(c: int) -> int:
        return 9 * c * c + c

    # Downsampling happens at width 32 (level 0), upsampling at width 64 (level 1).
    expected = resblock(32) - conv(32) + resblock(64) - conv(64)
    assert n_params(tiny(resblock_updown=True)) - n_params(tiny()) == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shape_and_zero_output_at_init(variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    size = VARIANTS[variant].get("image_size", 32)
    out = model(*inputs(model, size))
    assert out.shape == (2, model.out[-1].out_channels, size, size)
    # improved-diffusion zero-initialises the output conv: a fresh model predicts exactly 0.
    assert torch.equal(out, torch.zeros_like(out))


def test_runs_on_smaller_inputs_than_built_for() -> None:
    model = tiny()
    assert model(*inputs(model, 16)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("overrides", "sizes"),
    [
        ({"attention_resolutions": [16]}, [16, 16, 16, 16]),  # encoder, middle, 2x decoder
        ({"image_size": 16, "attention_resolutions": [16]}, [16, 8, 16, 16]),
        ({"attention_resolutions": []}, [16]),  # the middle block always attends
    ],
)
def test_attention_runs_at_the_requested_pixel_resolution(
    overrides: dict[str, Any], sizes: list[int]
) -> None:
    model = tiny(**overrides)
    seen: list[int] = []
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[-1]))
    model(*inputs(model, overrides.get("image_size", 32)))
    assert seen == sizes


def test_class_label_changes_the_output() -> None:
    model = tiny(num_classes=10)
    unzero(model)
    x, t, _ = inputs(model, 32)
    out_a = model(x, t, torch.tensor([0, 1]))
    out_b = model(x, t, torch.tensor([2, 3]))
    assert (out_a - out_b).abs().amax(dim=(1, 2, 3)).min() > 1e-4


@pytest.mark.parametrize("variant", ["resblock_updown", "learned_sigma_no_scale_shift"])
def test_gradients_reach_every_parameter(variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    unzero(model)
    model(*inputs(model, 32)).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def resample_reference(x: Tensor, mode: Resample) -> Tensor:
    if mode == "down":
        return (x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]) / 4
    if mode == "up":
        return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return x


@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize(
    ("in_ch", "out_ch", "mode"), [(32, 64, "none"), (64, 64, "down"), (64, 64, "up")]
)
def test_resblock_matches_its_formula(
    scale_shift: bool, in_ch: int, out_ch: int, mode: Resample
) -> None:
    torch.manual_seed(4)
    block = ResBlock(in_ch, out_ch, 16, 0.0, scale_shift, mode)
    unzero(block)
    x, emb = torch.randn(2, in_ch, 8, 8), torch.randn(2, 16)

    def norm(group_norm: nn.GroupNorm, h: Tensor) -> Tensor:
        return F.group_norm(h, 32, group_norm.weight, group_norm.bias, group_norm.eps)

    h = resample_reference(F.silu(norm(block.in_norm, x)), mode)
    h = F.conv2d(h, block.in_conv.weight, block.in_conv.bias, padding=1)
    cond = (F.silu(emb) @ block.emb_proj.weight.T + block.emb_proj.bias)[:, :, None, None]
    if scale_shift:  # improved-diffusion: norm(h)·(1 + scale) + shift
        h = norm(block.out_norm, h) * (1 + cond[:, :out_ch]) + cond[:, out_ch:]
    else:
        h = norm(block.out_norm, h + cond)
    h = F.conv2d(F.silu(h), block.out_conv.weight, block.out_conv.bias, padding=1)
    skip = resample_reference(x, mode)
    if in_ch != out_ch:
        assert isinstance(block.skip, nn.Conv2d)
        skip = F.conv2d(skip, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x, emb), skip + h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_matches_naive_softmax_attention(num_heads: int) -> None:
    torch.manual_seed(3)
    block = AttentionBlock(64, num_heads)
    unzero(block)
    x = torch.randn(2, 64, 4, 5)
    d = 64 // num_heads
    normed = F.group_norm(x, 32, block.norm.weight, block.norm.bias, block.norm.eps)
    tokens = normed.flatten(2).transpose(1, 2)  # (B, L, C)
    q, k, v = (tokens @ block.qkv.weight.T + block.qkv.bias).chunk(3, dim=-1)
    heads = []
    for h in range(num_heads):
        qh, kh, vh = (m[..., h * d : (h + 1) * d] for m in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        heads.append(weights @ vh)
    projected = torch.cat(heads, dim=-1) @ block.proj_out.weight.T + block.proj_out.bias
    expected = x + projected.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies() -> None:
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 7)
    half = 3
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            angle = ti * 10000.0 ** (-j / half)
            assert emb[i, j].item() == pytest.approx(math.cos(angle), abs=1e-4)
            assert emb[i, half + j].item() == pytest.approx(math.sin(angle), abs=1e-4)
        assert emb[i, 6].item() == 0.0


def test_bf16_autocast_forward_is_finite_and_close_to_fp32() -> None:
    model = tiny(**VARIANTS["resblock_updown"])
    unzero(model)
    x, t, y = inputs(model, 32)
    reference = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert torch.isfinite(out).all()
    relative_error = (out.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05


@pytest.mark.parametrize(("num_classes", "give_labels"), [(10, False), (None, True)])
def test_labels_required_iff_class_conditional(num_classes: int | None, give_labels: bool) -> None:
    model = tiny(num_classes=num_classes)
    x, t, _ = inputs(model, 32)
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, torch.zeros(2, dtype=torch.long) if give_labels else None)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_resolutions": [4]},  # feature maps are 32 and 16 only
        {"num_heads": 3},  # 3 does not divide 32 channels
        {"num_head_channels": 24},
        {"model_channels": 48},  # not a multiple of the 32 GroupNorm groups
        {"image_size": 31},
    ],
)
def test_bad_configuration_is_a_user_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(DmstabError):
        tiny(**overrides)
