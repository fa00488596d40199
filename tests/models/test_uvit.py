"""U-ViT (Bao et al. 2023): layout, parameter count, long skips, conditioning, training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from dmstab.cli import app
from dmstab.config import load_recipe
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.uvit import SkipBlock, UViT
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, store

SMALL: dict[str, Any] = {
    "image_size": 8,
    "out_channels": 3,
    "patch_size": 2,
    "embed_dim": 32,
    "depth": 5,
    "num_heads": 4,
}


def small(**overrides: Any) -> UViT:
    torch.manual_seed(0)
    return UViT(**{**SMALL, **overrides}).eval()


def inputs(model: UViT, batch: int = 3) -> tuple[Tensor, Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(1)
    size = model.image_size
    x = torch.randn(batch, model.in_channels, size, size, generator=gen)
    t = torch.tensor([3.0, 400.0, 999.0])[:batch]
    y = None if model.label_embed is None else torch.arange(batch) % 10
    return x, t, y


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def closed_form_parameters(
    image: int, channels: int, out: int, patch: int, width: int, depth: int, ratio: float
) -> int:
    """U-ViT's parameters counted from its layout, without building it (classes: none)."""
    hidden = int(width * ratio)
    patch_embed = channels * patch * patch * width + width
    pos_embed = (1 + (image // patch) ** 2) * width  # the time token + the patches
    attention = 3 * width * width + width * width + width  # qkv without bias, proj with bias
    mlp = width * hidden + hidden + hidden * width + width
    block = 2 * 2 * width + attention + mlp  # two LayerNorms
    skip = 2 * width * width + width
    head = 2 * width + width * patch * patch * out + patch * patch * out + 9 * out * out + out
    return patch_embed + pos_embed + depth * block + depth // 2 * skip + head


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_output_has_the_input_size_and_out_channels(
    learn_sigma: bool, num_classes: int | None
) -> None:
    model = small(out_channels=6 if learn_sigma else 3, num_classes=num_classes)
    out = model(*inputs(model))
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
    assert torch.isfinite(out).all()


def test_u_vit_s2_on_cifar10_matches_the_closed_form_and_the_papers_44m() -> None:
    with torch.device("meta"):
        model = UViT(
            image_size=32, out_channels=3, patch_size=2, embed_dim=512, depth=13, num_heads=8
        )
    expected = closed_form_parameters(32, 3, 3, 2, 512, 13, 4.0)
    assert n_params(model) == expected
    # U-ViT Table 1 / CIFAR-10 table: U-ViT-S/2 has 44M parameters.
    assert round(expected / 1e6) == 44


def test_class_token_and_learned_sigma_add_exactly_their_parameters() -> None:
    width, patch = SMALL["embed_dim"], SMALL["patch_size"]
    plain = n_params(small())
    # 10 label embeddings plus one more position embedding for the label token.
    assert n_params(small(num_classes=10)) - plain == 10 * width + width
    # 3 more output channels: the pixel Linear and the final 3x3 conv grow.
    pixel_linear = (width + 1) * patch * patch * 3
    conv = 9 * 6 * 6 + 6 - (9 * 3 * 3 + 3)
    assert n_params(small(out_channels=6)) - plain == pixel_linear + conv


def test_unpatchify_puts_each_token_on_its_own_patch() -> None:
    model = small(out_channels=2)
    p, side, channels = 2, 4, 2
    pixels = torch.randn(1, side * side, p * p * channels)
    image = model._unpatchify(pixels)
    for row in range(side):
        for col in range(side):
            token = pixels[0, row * side + col].view(p, p, channels)  # layout (p1, p2, C)
            patch = image[0, :, row * p : (row + 1) * p, col * p : (col + 1) * p]
            assert torch.equal(patch.permute(1, 2, 0), token)


def test_long_skips_carry_the_in_blocks_output() -> None:
    model = small()
    x, t, y = inputs(model)
    reference = model(x, t, y)
    width = SMALL["embed_dim"]
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, SkipBlock):
                block.skip_linear.weight[:, width:] = 0.0  # the half that reads the skip
    assert not torch.allclose(model(x, t, y), reference, atol=1e-4)


def test_first_in_block_gets_gradient_through_the_skip_alone() -> None:
    # With the main path cut after the first in-block (its output ignored by the second
    # in-block), its parameters can only be reached through the long skip to the last out-block.
    model = small()
    cut = model.in_blocks[1].register_forward_pre_hook(lambda _module, args: (args[0].detach(),))
    model(*inputs(model)).square().sum().backward()
    cut.remove()
    grads = [p.grad for p in model.in_blocks[0].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_timestep_changes_the_output() -> None:
    model = small()
    x, t, y = inputs(model)
    a = model(x, t, y)
    b = model(x, t + 100.0, y)
    assert not torch.allclose(a, b, atol=1e-4)


def test_class_label_changes_the_output_only_through_its_token() -> None:
    model = small(num_classes=10)
    x, t, y = inputs(model)
    assert y is not None
    a = model(x, t, y)
    b = model(x, t, (y + 1) % 10)
    assert not torch.allclose(a, b, atol=1e-4)
    with torch.no_grad():
        assert model.label_embed is not None
        model.label_embed.weight.fill_(0.5)  # every class the same token
    assert torch.equal(model(x, t, y), model(x, t, (y + 1) % 10))


def test_one_sample_does_not_see_another() -> None:
    model = small(num_classes=10)
    x, t, y = inputs(model)
    assert y is not None
    alone = model(x[:1], t[:1], y[:1])
    assert torch.allclose(model(x, t, y)[:1], alone, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"depth": 4}, "model.depth 4 must be odd"),
        ({"patch_size": 3}, "model.patch_size 3 must be positive and divide the image size 8"),
        ({"num_heads": 5}, "model.embed_dim 32 must be a positive multiple of model.num_heads 5"),
        ({"mlp_ratio": 0.0}, "model.mlp_ratio 0.0 must be finite"),
    ],
)
def test_impossible_layouts_are_one_line_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(DmstabError, match=message):
        small(**overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.depth=12", "model.depth 12 must be odd"),
        ("model.patch_size=3", "divide the image size 16 \\(data.resolution\\)"),
        ("model.num_heads=3", "model.embed_dim 64 must be a positive multiple"),
        ("diffusion.formulation=edm", "model.name uvit trains with diffusion.formulation ddpm"),
        ("model.dropout=1.0", "model.dropout is 1.0; must be in"),
        ("train.magnitudes_every=5", "train.magnitudes_every works for adm_unet and edm2"),
    ],
)
def test_recipe_validation_names_the_key(override: str, message: str) -> None:
    with pytest.raises(DmstabError, match=message):
        load_recipe(RECIPES / "mini_uvit.yaml", [override])


def test_uvit_ignores_the_unet_layout_keys() -> None:
    recipe = load_recipe(RECIPES / "mini_uvit.yaml", ["data.resolution=10"])
    assert recipe.data.resolution == 10  # 10 would not fit channel_mult [1, 2, 2, 2]


def test_cifar10_recipe_builds_u_vit_s2_and_dry_runs() -> None:
    recipe = load_recipe(RECIPES / "uvit_cifar10_s2.yaml")
    with torch.device("meta"):
        model = build_model(recipe, num_classes=10)
    assert isinstance(model, UViT) and model.label_embed is None
    assert n_params(model) == closed_form_parameters(32, 3, 3, 2, 512, 13, 4.0)
    result = CliRunner().invoke(app, ["train", str(RECIPES / "uvit_cifar10_s2.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output


def test_mini_recipe_trains_samples_and_is_tracked(one_thread: None) -> None:
    tiny = ["model.embed_dim=32", "model.depth=3", "model.learn_sigma=true", "train.steps=6"]
    not_unet = [o for o in TINY if not o.startswith("model.")]  # TINY's UNet keys are not U-ViT's
    recipe = load_recipe(RECIPES / "mini_uvit.yaml", [*not_unet, *tiny])
    result = train(recipe)
    client = store()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "uvit"
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(m.value)) for m in losses)
    samples = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert any(p.endswith(".npz") for p in samples)
    images = {a.path for a in client.list_artifacts(result.run_id, "images")}
    assert any(p.startswith("images/samples+step+6+") and p.endswith(".png") for p in images)


def test_time_shift_adds_to_the_time_the_embedding_sees() -> None:
    shifted, plain = small(time_shift=1.0), small()
    x, t, y = inputs(plain)
    assert torch.equal(shifted(x, t, y), plain(x, t + 1, y))
    assert not torch.allclose(shifted(x, t, y), plain(x, t, y))


def test_null_class_is_one_more_label_and_stands_in_for_missing_labels() -> None:
    model = small(num_classes=10, null_class=True)
    assert model.label_embed is not None and model.label_embed.num_embeddings == 11
    x, t, _ = inputs(model)
    null = torch.full((3,), 10)
    assert torch.equal(model(x, t, None), model(x, t, null))
    assert not torch.allclose(model(x, t, None), model(x, t, null - 1))
    with pytest.raises(ValueError, match=r"y \(class labels\) must be given"):
        small(num_classes=10)(x, t, None)  # without a null class, labels are required
