"""AAAI Table 1's ImageNet-512 rows: U-ViT-L/4 vs U-ViT-H/4 on SD-VAE latents, and BigGAN at
512x512 (BigGAN App. B Table 6).

Parameter counts are checked against closed forms written from the papers' layer sizes (and
the papers' own rounded figures), never against numbers the code printed; every network is
built on the meta device, so nothing is allocated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dmstab.analysis.consistency import ConsistencyConfig
from dmstab.commands.consistency import member_recipes
from dmstab.config import Recipe, load_recipe
from dmstab.models import biggan, build_model
from dmstab.models.biggan import BigGANDiscriminator, BigGANGenerator, build_discriminator
from tests.helpers import PAPER_TEXT, RECIPES, cli, one_line_error

UVIT_GROUP = RECIPES / "table1_imagenet512_uvit_consistency.yaml"
BIGGAN_GROUP = RECIPES / "table1_imagenet512_biggan_consistency.yaml"
CLASSES = 1000  # ImageNet
DATASET = "ImageNet512"  # Table 1's name


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build: object, recipe: Recipe) -> nn.Module:
    with torch.device("meta"):
        return build(recipe, CLASSES)  # type: ignore[operator, no-any-return]


@pytest.mark.parametrize(
    "path", [UVIT_GROUP, BIGGAN_GROUP, RECIPES / "biggan_imagenet512.yaml"], ids=lambda p: p.stem
)
def test_the_recipes_resolve_with_dry_run(path: Path, isolated_workdir: Path) -> None:
    result = cli("train", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"name: {path.stem}" in result.stdout
    assert not (isolated_workdir / "mlflow.db").exists()


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason="the paper is not beside the repository")
@pytest.mark.parametrize(("path", "model"), [(UVIT_GROUP, "ViT"), (BIGGAN_GROUP, "BigGAN")])
def test_the_groups_carry_table_1s_imagenet512_rows(path: Path, model: str) -> None:
    """The row's first cell ends with `model` (the text has "Ŭ-ViT")."""
    lines = PAPER_TEXT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 1:"))
    rows = [line.split("\t") for line in lines[start + 1 : start + 12]]
    (row,) = [r for r in rows if len(r) == 5 and r[0].endswith(model) and r[1] == DATASET]
    assert row[2].strip() and row[3].strip()  # different initialisations AND structures
    recipe = load_recipe(path)
    assert recipe.paper.others["consistency_psnr"] == float(row[4])
    assert recipe.analysis(ConsistencyConfig).num_images == 32  # the paper's M
    members = [member for _, member in member_recipes(recipe)]
    assert len({m.train.seed for m in members}) == len(members)  # initialisations differ
    assert len({m.model for m in members}) > 1  # and so do structures


@pytest.mark.parametrize(
    ("path", "override", "message"),
    [
        (UVIT_GROUP, "sample.clip_denoised=true", "sample.clip_denoised clamps x̂0 to the pixel"),
        (UVIT_GROUP, "model.learn_sigma=true", "latents (data.name latents) need model.learn_sig"),
        (BIGGAN_GROUP, "model.z_dim=150", "model.z_dim 150 must split into 8 equal chunks"),
        (BIGGAN_GROUP, "model.attention_resolution=512", "attention_resolution is 512; 0 or one"),
        (BIGGAN_GROUP, "data.resolution=256", "supports data.resolution 32, 64, 128, 512; got 256"),
    ],
)
def test_what_the_512_recipes_cannot_use_is_refused_at_load(
    path: Path, override: str, message: str, isolated_workdir: Path
) -> None:
    assert message in one_line_error(cli("train", str(path), override, "--dry-run"))
    assert not any(isolated_workdir.iterdir())


def test_a_latent_group_stops_for_a_missing_vae_before_any_training(
    isolated_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = isolated_workdir / "no-vae"
    empty.mkdir()
    monkeypatch.setenv("DMSTAB_VAE_PATH", str(empty))
    line = one_line_error(cli("consistency", str(UVIT_GROUP)))
    assert "dmstab[latent]" in line or f"DMSTAB_VAE_PATH={empty}" in line  # diffusers or weights
    assert [p.name for p in isolated_workdir.iterdir()] == ["no-vae"]  # no store, no run


# ----------------------------------------------------------------------------------- U-ViT


def uvit_closed_form(width: int, depth: int, conv: bool) -> int:
    """U-ViT on 64x64x4 latents, patch 4, MLP ratio 4, qkv without bias, 1000 label tokens,
    no learned variance, counted layer by layer from the U-ViT paper's description."""
    channels, patch, tokens = 4, 4, (64 // 4) ** 2
    patch_embed = channels * patch * patch * width + width  # a stride-4 conv
    positions = (2 + tokens) * width  # label and time tokens, then the patches
    labels = CLASSES * width
    layer_norm = 2 * width
    attention = width * 3 * width + width * width + width  # qkv (no bias), projection
    mlp = width * 4 * width + 4 * width + 4 * width * width + width
    block = 2 * layer_norm + attention + mlp
    long_skip = 2 * width * width + width  # Linear(2D -> D) in each out-block
    head = layer_norm + width * patch * patch * channels + patch * patch * channels
    final_conv = 9 * channels * channels + channels if conv else 0
    return (
        patch_embed + positions + labels + depth * block + depth // 2 * long_skip + head
    ) + final_conv


def test_uvit_members_are_u_vit_l4_and_h4_at_the_papers_sizes() -> None:
    (_, large), (_, huge) = member_recipes(load_recipe(UVIT_GROUP))
    for recipe in (large, huge):
        data = recipe.data
        assert (data.name, data.resolution, data.channels) == ("latents", 64, 4)
        assert recipe.model.class_cond and not recipe.sample.clip_denoised
    layouts = [
        (large, 1024, 21, True, 287),  # U-ViT-L/4: 287M (U-ViT paper, ImageNet 512)
        (huge, 1152, 29, False, 501),  # U-ViT-H/4: 501M, no final conv (official conv=False)
    ]
    for recipe, width, depth, conv, paper_millions in layouts:
        m = recipe.model
        assert (m.patch_size, m.embed_dim, m.depth, m.num_heads, m.conv_out) == (
            4,
            width,
            depth,
            16,
            conv,
        )
        count = n_params(on_meta(build_model, recipe))
        assert count == uvit_closed_form(width, depth, conv)
        assert round(count / 1e6) == paper_millions


# ---------------------------------------------------------------------------------- BigGAN

# BigGAN App. B, as printed: G blocks "ResBlock up a·ch -> b·ch", the non-local block after
# the one that reaches 64x64; D rows "ResBlock down|plain a·ch -> b·ch" and the non-local block.
TABLE_4_G = [(16, 16), (16, 8), (8, 4), (4, 2), (2, 1)]
TABLE_4_D = [
    ("down", 1, 2),
    ("non-local",),
    ("down", 2, 4),
    ("down", 4, 8),
    ("down", 8, 16),
    ("down", 16, 16),
    ("plain", 16, 16),
]
TABLE_6_G = [(16, 16), (16, 8), (8, 8), (8, 4), (4, 2), (2, 1), (1, 1)]
TABLE_6_D = [
    ("down", 1, 1),
    ("down", 1, 2),
    ("down", 2, 4),
    ("non-local",),
    ("down", 4, 8),
    ("down", 8, 8),
    ("down", 8, 16),
    ("down", 16, 16),
    ("plain", 16, 16),
]
Z_CHUNK, SHARED = 20, 128  # "chunks of equal size (20-D in our case)", Embed(y) in R^128


def discriminator_layers(table: list[tuple]) -> list[tuple]:
    """The discriminator a table describes, as BigGAN-PyTorch builds it and as gives the
    paper's 88.0M at 128: block i outputs the width the table prints as block i's input (the
    first block maps RGB to ch); downsampling and the non-local block's place as printed."""
    layers: list[tuple] = []
    cin: int | str = "RGB"
    for row in table:
        if row[0] == "non-local":
            layers.append(("non-local", cin))
        else:
            kind, width, _ = row
            layers.append((kind, cin, width))
            cin = width
    return layers


@pytest.fixture
def without_spectral_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spectral norm re-parametrises each weight as a parameter of the same shape (plus u, v
    buffers), so it changes no count or layout; its power iterations take seconds per network
    on the meta device (tests/models/test_gan.py checks that it is applied)."""
    monkeypatch.setattr(biggan, "_normalized", lambda layer: layer)


def conditional_generator_block(cin: int, cout: int) -> int:
    """BigGAN Fig. 15b: two class-conditional BNs (gain and bias projections of the block's
    [chunk, embedding], no bias), two 3x3 convs and a 1x1 shortcut conv, with biases."""
    cond = Z_CHUNK + SHARED
    bns = 2 * cond * cin + 2 * cond * cout
    return bns + 9 * cin * cout + cout + 9 * cout * cout + cout + cin * cout + cout


def discriminator_block(cin: int, cout: int, down: bool) -> int:
    """BigGAN Fig. 15c: two 3x3 convs and a 1x1 shortcut conv unless the block keeps both its
    width and its size (then the shortcut is the identity)."""
    shortcut = cin * cout + cout if cin != cout or down else 0
    return 9 * cin * cout + cout + 9 * cout * cout + cout + shortcut


def non_local(c: int) -> int:
    """SAGAN attention: 1x1 convs to C/8, C/8 and C/2 channels, back to C, and the gain γ."""
    return 2 * (c * c // 8 + c // 8) + c * c // 2 + c // 2 + c // 2 * c + c + 1


def generator_closed_form(ch: int, blocks: list[tuple[int, int]], attention_after: int) -> int:
    """Embed(y), Linear(20 -> 4x4x16ch), the blocks, the non-local block, BN, 3x3 conv ch -> 3."""
    first = 4 * 4 * blocks[0][0] * ch
    total = CLASSES * SHARED + Z_CHUNK * first + first
    total += sum(conditional_generator_block(a * ch, b * ch) for a, b in blocks)
    total += non_local(blocks[attention_after][1] * ch)
    return total + 2 * ch + 9 * ch * 3 + 3


def discriminator_closed_form(ch: int, table: list[tuple]) -> int:
    """The blocks and non-local block of `discriminator_layers`, then linear -> 1 and Embed(y)."""
    total = width = 0
    for kind, *sizes in discriminator_layers(table):
        if kind == "non-local":
            total += non_local(sizes[0] * ch)
            continue
        cin = 3 if sizes[0] == "RGB" else sizes[0] * ch
        width = sizes[1] * ch
        total += discriminator_block(cin, width, kind == "down")
    return total + width + 1 + CLASSES * width


def test_the_closed_forms_give_biggans_own_128_counts(without_spectral_norm: None) -> None:
    """BigGAN App. B: "the corresponding original BigGAN models have 70.4M and 88.0M
    parameters" (G and D at 128x128, ch = 96), and so do the networks dmstab builds."""
    g = generator_closed_form(96, TABLE_4_G, attention_after=3)  # 4ch -> 2ch reaches 64x64
    d = discriminator_closed_form(96, TABLE_4_D)
    assert (round(g / 1e5), round(d / 1e5)) == (704, 880)
    recipe = load_recipe(RECIPES / "biggan_imagenet128.yaml")
    assert n_params(on_meta(build_model, recipe)) == g
    assert n_params(on_meta(build_discriminator, recipe)) == d


def _built_discriminator_layers(d: BigGANDiscriminator, ch: int) -> list[tuple]:
    layers: list[tuple] = []
    for layer in d.blocks:
        if hasattr(layer, "gamma"):
            layers.append(("non-local", layer.out.out_channels // ch))
        else:
            cin = layer.conv1.in_channels
            kind = "down" if layer.downsample else "plain"
            source = "RGB" if cin == 3 else cin // ch
            layers.append((kind, source, layer.conv1.out_channels // ch))
    return layers


def test_biggan_512_has_the_layout_of_table_6(without_spectral_norm: None) -> None:
    recipe = load_recipe(BIGGAN_GROUP)
    m, ch = recipe.model, recipe.model.g_channels
    assert recipe.data.resolution == 512 and m.d_channels == ch == 96
    assert m.z_dim == Z_CHUNK * (len(TABLE_6_G) + 1)  # "160 for 512 x 512 images"
    assert (m.shared_dim, m.attention_resolution) == (SHARED, 64)
    g = on_meta(build_model, recipe)
    d = on_meta(build_discriminator, recipe)
    assert isinstance(g, BigGANGenerator) and isinstance(d, BigGANDiscriminator)
    assert (g.linear.in_features, g.linear.out_features) == (Z_CHUNK, 4 * 4 * 16 * ch)
    built = [(b.conv1.in_channels // ch, b.conv1.out_channels // ch) for b in g.blocks]
    assert built == TABLE_6_G
    assert list(g.attention) == ["3"]  # after 8ch -> 4ch, the block that reaches 64x64
    assert _built_discriminator_layers(d, ch) == discriminator_layers(TABLE_6_D)
    assert n_params(g) == generator_closed_form(ch, TABLE_6_G, attention_after=3)
    assert n_params(d) == discriminator_closed_form(ch, TABLE_6_D)


@torch.no_grad()
def test_biggan_512_attends_at_64x64_in_both_networks(without_spectral_norm: None) -> None:
    """Table 6: "we move the non-local block in both networks back to 64 x 64"."""
    recipe = load_recipe(RECIPES / "biggan_imagenet512.yaml")
    g, d = on_meta(build_model, recipe), on_meta(build_discriminator, recipe)
    seen: list[tuple[int, ...]] = []
    for network in (g, d):
        for layer in network.modules():
            if hasattr(layer, "gamma"):
                layer.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape))
    labels = torch.zeros(2, dtype=torch.int64, device="meta")
    images = g(torch.zeros(2, recipe.model.z_dim, device="meta"), labels)
    assert images.shape == (2, 3, 512, 512)
    assert d(images, labels).shape == (2,)
    assert [tuple(shape[2:]) for shape in seen] == [(64, 64), (64, 64)]
