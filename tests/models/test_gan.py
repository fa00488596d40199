"""GAN baselines: DCGAN and the BigGAN-style networks, their losses, latents and training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from dmstab.checkpoint import load_checkpoint
from dmstab.config import load_recipe
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.biggan import BigGANDiscriminator, BigGANGenerator
from dmstab.models.dcgan import DCGANDiscriminator, DCGANGenerator
from dmstab.models.gan import (
    discriminator_loss,
    gan_losses,
    generator_loss,
    seeded_latents,
)
from dmstab.models.generate import generate_for_recipe
from dmstab.train.loop import train
from tests.helpers import RECIPES, Runner, store

TINY_GAN = [
    "data.synthetic_size=64",
    "data.resolution=16",
    "model.g_channels=8",
    "model.d_channels=8",
    "model.z_dim=16",
    "train.batch_size=8",
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "sample.num_images=4",
    "sample.batch_size=4",
    "tracking.experiment=tests",
]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("c", "z"), [(64, 100), (8, 16)])
def test_dcgan_parameter_counts_match_the_closed_form(c: int, z: int) -> None:
    """4×4 kernels, no biases, two batch-norm parameters per channel; 64/100 give the AAAI
    baseline's ≈1.07M generator and ≈0.66M discriminator."""
    generator = 16 * (z * 4 * c + 4 * c * 2 * c + 2 * c * c + c * 3) + 2 * (4 * c + 2 * c + c)
    discriminator = 16 * (3 * c + c * 2 * c + 2 * c * 4 * c + 4 * c) + 2 * (2 * c + 4 * c)
    assert _count(DCGANGenerator(32, z, c)) == generator
    assert _count(DCGANDiscriminator(32, c)) == discriminator
    if c == 64:
        assert round(generator / 1e6, 2) == 1.07 and round(discriminator / 1e6, 2) == 0.66


def test_dcgan_shapes_and_bad_resolution() -> None:
    images = DCGANGenerator(64, 10, 4)(torch.randn(3, 10))
    assert images.shape == (3, 3, 64, 64) and images.abs().max() <= 1
    assert DCGANDiscriminator(64, 4)(images).shape == (3,)
    with pytest.raises(DmstabError, match="power of two >= 16"):
        DCGANGenerator(24, 10, 4)


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_biggan_shapes(resolution: int) -> None:
    z_dim = {32: 20, 64: 20, 128: 24}[resolution]
    generator = BigGANGenerator(resolution, z_dim, 8, 5, 8, resolution // 2)
    labels = torch.tensor([0, 3])
    images = generator(torch.randn(2, z_dim), labels)
    assert images.shape == (2, 3, resolution, resolution) and images.abs().max() <= 1
    logits = BigGANDiscriminator(resolution, 8, 5, resolution // 2)(images, labels)
    assert logits.shape == (2,)


def _largest_singular_value(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2))


def test_every_biggan_weight_is_spectrally_normalised() -> None:
    generator = BigGANGenerator(32, 20, 4, 5, 8, 16)
    discriminator = BigGANDiscriminator(32, 4, 5, 16)
    for _ in range(30):  # power iteration runs once per training-mode forward
        discriminator(generator(torch.randn(4, 20), torch.arange(4)), torch.arange(4))
    layers = [
        m
        for net in (generator, discriminator)
        for m in net.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding)
    ]
    assert len(layers) > 20
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight")
        weight = layer.weight.detach()
        if isinstance(layer, nn.Embedding):
            weight = weight.T
        assert _largest_singular_value(weight) == pytest.approx(1.0, rel=0.05)


def test_biggan_self_attention_starts_as_the_identity_and_latent_chunks_are_hierarchical() -> None:
    generator = BigGANGenerator(32, 20, 4, 5, 8, 16).eval()
    (attention,) = generator.attention.values()
    x = torch.randn(2, attention.out.in_channels * 2, 8, 8)
    assert torch.equal(attention(x), x)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [
        block.register_forward_hook(lambda m, i, o, k=k: seen[k].append(o.detach()))
        for k, block in enumerate(generator.blocks)
        if k < 2
    ]
    z = torch.randn(2, 20)
    changed = z.clone()
    changed[:, 10:15] += 1.0  # chunk 2 of 4 (5 each): the input of block 1 only
    labels = torch.tensor([1, 2])
    generator(z, labels), generator(changed, labels)
    for handle in handles:
        handle.remove()
    assert torch.equal(seen[0][0], seen[0][1])  # block 0 does not see chunk 2
    assert not torch.equal(seen[1][0], seen[1][1])


@torch.no_grad()
def test_biggan_projection_term_is_the_embedding_inner_product() -> None:
    discriminator = BigGANDiscriminator(32, 4, 5, 0).eval()
    images = torch.randn(1, 3, 32, 32)
    features = torch.relu(discriminator.blocks(images)).sum(dim=(2, 3))
    embed = discriminator.embed.weight  # the spectrally normalised embedding
    difference = discriminator(images, torch.tensor([1])) - discriminator(images, torch.tensor([3]))
    expected = ((embed[1] - embed[3]) * features[0]).sum()
    assert float(difference) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_bad_biggan_settings_are_one_line_errors() -> None:
    with pytest.raises(DmstabError, match=r"supports data\.resolution"):
        BigGANGenerator(48, 20, 4, 5, 8, 0)
    with pytest.raises(DmstabError, match="must split into 4 equal chunks"):
        BigGANGenerator(32, 21, 4, 5, 8, 0)
    with pytest.raises(DmstabError, match="attention_resolution is 12"):
        BigGANDiscriminator(32, 4, 5, 12)
    with pytest.raises(DmstabError, match="self-attention needs at least 8 channels"):
        BigGANDiscriminator(32, 1, 5, 16)


def test_losses_match_hand_computed_values() -> None:
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    bce_d = (softplus(0.0) + softplus(-2.0)) / 2 + (softplus(0.0) + softplus(-1.0)) / 2
    assert float(discriminator_loss(real, fake, "bce")) == pytest.approx(bce_d)
    assert float(generator_loss(fake, "bce")) == pytest.approx((softplus(0.0) + softplus(1.0)) / 2)
    # hinge: mean(max(0, 1 − r)) + mean(max(0, 1 + f)) = (1 + 0)/2 + (1 + 0)/2
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(1.0)
    assert float(generator_loss(fake, "hinge")) == pytest.approx(0.5)


def test_gan_losses_differentiate_each_network() -> None:
    generator, discriminator = DCGANGenerator(16, 4, 2), DCGANDiscriminator(16, 2)
    losses = gan_losses(
        generator, discriminator, torch.randn(2, 3, 16, 16), None, torch.randn(2, 4), "bce"
    )
    g_grads = torch.autograd.grad(losses.generator, list(generator.parameters()), retain_graph=True)
    assert any(float(g.abs().sum()) > 0 for g in g_grads)
    d_grads = torch.autograd.grad(losses.discriminator, list(discriminator.parameters()))
    assert any(float(g.abs().sum()) > 0 for g in d_grads)


def test_two_gan_architectures_get_the_same_z_for_one_seed() -> None:
    seen: list[torch.Tensor] = []
    for name in ("mini_dcgan", "mini_biggan"):
        recipe = load_recipe(
            RECIPES / f"{name}.yaml",
            ["model.z_dim=16", "model.g_channels=4", "sample.num_images=3", "sample.seed=7"],
        )
        model = build_model(recipe, 4)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        generate_for_recipe(model, recipe, dataset_classes=4, device=torch.device("cpu"))
    assert torch.equal(seen[0], seen[1])
    assert torch.equal(seen[0], seeded_latents(recipe, 0, 3, 7))
    assert not torch.equal(seen[0], seeded_latents(recipe, 0, 3, 8))


def test_dmstab_train_tracks_a_dcgan_and_sample_reads_it(dmstab: Runner) -> None:
    result = dmstab("train", str(RECIPES / "mini_dcgan.yaml"), *TINY_GAN)
    assert result.returncode == 0, result.stderr
    client = store()
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    logged = ("loss", "loss_d", "loss_g", "d_real_logit", "d_fake_logit", "kimg")
    assert set(run.data.metrics) == {f"train/{key}" for key in logged} | {"system/images_per_s"}
    for key in run.data.metrics:
        assert len(client.get_metric_history(run.info.run_id, key)) == 6, key
    assert float(run.data.tags["dmstab.lr"]) == float(run.data.params["model.g_lr"])  # constant
    assert int(run.data.tags["dmstab.discriminator_parameters"]) > 0
    state = load_checkpoint(Path(run.data.tags["dmstab.run_dir"]) / "checkpoint.pt")
    assert {"model", "ema", "discriminator", "optimizer", "d_optimizer"} <= state.keys()
    sampled = dmstab("sample", run.info.run_id, "sample.num_images=5")
    assert sampled.returncode == 0, sampled.stderr
    assert "done 5 images" in sampled.stdout + sampled.stderr
    with np.load(next(Path("samples").glob("*/gan_seed0.npz"))) as arrays:
        assert arrays[arrays.files[0]].shape[0] == 5


class _StopAt:
    """A progress display that interrupts training at `step` (as Ctrl-C would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, total: int, completed: int) -> None: ...

    def advance(self, step: int, loss: float, images_per_s: float) -> None:
        if step == self.step:
            raise KeyboardInterrupt

    def stop(self) -> None: ...


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mini_dcgan", "mini_biggan"])
def test_an_interrupted_gan_resumes_bit_for_bit(name: str) -> None:
    attention = ["model.attention_resolution=16"] if name == "mini_biggan" else []
    options = [*TINY_GAN, "data.resolution=32", *attention]
    reference = load_checkpoint(train(load_recipe(RECIPES / f"{name}.yaml", options)).checkpoint)
    recipe = load_recipe(RECIPES / f"{name}.yaml", [*options, "tracking.experiment=second"])
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=_StopAt(5))
    resumed = load_checkpoint(train(recipe, resume="auto").checkpoint)
    for part in ("model", "discriminator"):
        for key, value in reference[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    assert resumed["step"] == 6


def test_gan_recipes_refuse_diffusion_only_settings() -> None:
    for override, message in [
        ("model.class_cond=true", "DCGAN is unconditional"),
        ("train.nonfinite=skip", "train.nonfinite: skip is for diffusion models"),
        ("data.resolution=24", "power of two >= 16"),
    ]:
        with pytest.raises(DmstabError, match=message):
            load_recipe(RECIPES / "mini_dcgan.yaml", [override])
