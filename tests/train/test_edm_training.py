"""EDM2 training end to end: objective, learning rate, kimg, Heun sampling, post-hoc EMA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dmstab.checkpoint import load_checkpoint
from dmstab.config import load_recipe
from dmstab.diffusion.edm import EDMPrecond
from dmstab.diffusion.objectives import EDMObjective, whole_batch_losses
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.generate import generate_for_recipe
from dmstab.train.loop import train
from tests.helpers import MINI, TINY_EDM, Runner, store


def test_edm_objective_is_the_edm2_loss_with_learned_uncertainty() -> None:
    """The objective's per-sample loss equals EDM2 Eq. 21 computed here from the raw UNet."""
    recipe = load_recipe(MINI, TINY_EDM)
    torch.manual_seed(0)
    model = build_model(recipe, num_classes=10)
    assert isinstance(model, EDMPrecond)
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    labels = torch.arange(6) % 10
    noise = torch.randn_like(x0)
    terms = whole_batch_losses(
        EDMObjective(recipe, 10), model, x0, labels, noise, torch.Generator().manual_seed(3), step=1
    )

    # the same σ draw: ln σ = P_mean + P_std·z with z the generator's first normals
    z = torch.randn(6, generator=torch.Generator().manual_seed(3))
    sigma = torch.exp(-0.8 + 1.6 * z).reshape(-1, 1, 1, 1)
    sd = 0.5
    c_skip, c_in = sd**2 / (sigma**2 + sd**2), 1 / (sigma**2 + sd**2).sqrt()
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_noise = sigma.log().flatten() / 4
    one_hot = torch.eye(10)[labels]
    with torch.no_grad():
        raw = model.net(c_in * (x0 + sigma * noise), c_noise, one_hot)
        u = model.net.uncertainty(c_noise).flatten()
    denoised = c_skip * (x0 + sigma * noise) + c_out * raw
    weight = (sigma.flatten() ** 2 + sd**2) / (sigma.flatten() * sd) ** 2
    expected = weight * ((denoised - x0) ** 2).mean(dim=(1, 2, 3)) / u.exp() + u
    torch.testing.assert_close(terms["loss"].detach(), expected, rtol=1e-4, atol=1e-5)


class _RecordLabels(nn.Module):
    """A raw network that outputs zeros and remembers the labels it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        assert labels is not None
        self.seen.append(labels)
        return x * self.scale


def test_label_dropout_zeroes_the_requested_fraction_of_labels() -> None:
    recipe = load_recipe(MINI, [*TINY_EDM, "diffusion.label_dropout=0.25"])
    net = _RecordLabels()
    batch = 4000
    whole_batch_losses(
        EDMObjective(recipe, 10),
        EDMPrecond(net),
        torch.zeros(batch, 3, 2, 2),
        torch.arange(batch) % 10,
        torch.zeros(batch, 3, 2, 2),
        torch.Generator().manual_seed(0),
        step=1,
    )
    [labels] = net.seen
    dropped = int((labels.sum(dim=1) == 0).sum())
    assert set(labels.sum(dim=1).tolist()) == {0.0, 1.0}
    sd = math.sqrt(batch * 0.25 * 0.75)
    assert abs(dropped - batch * 0.25) < 4 * sd


def test_training_counts_kimg_and_follows_the_inverse_sqrt_learning_rate() -> None:
    """kimg 0.096 at batch 8 is 12 steps; lr of step k is EDM2's α(t) at t = (k−1)·batch."""
    result = train(load_recipe(MINI, TINY_EDM))
    assert result.step == 12
    client = store()
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/lr")}
    assert sorted(history) == list(range(1, 13))
    for step, lr in history.items():
        images = (step - 1) * 8
        expected = 0.01 / math.sqrt(max(images / 32, 1)) * min(images / 16, 1)
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-12)
    kimg = client.get_metric_history(result.run_id, "train/kimg")
    assert max(m.value for m in kimg) == pytest.approx(0.096)
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert losses and all(math.isfinite(m.value) for m in losses)


def test_heun_images_do_not_depend_on_the_batch_split() -> None:
    recipe = load_recipe(MINI, [*TINY_EDM, "sample.num_images=6"])
    torch.manual_seed(0)
    model = build_model(recipe, 10)

    def images(batch_size: int) -> Tensor:
        cfg = load_recipe(
            MINI, [*TINY_EDM, "sample.num_images=6", f"sample.batch_size={batch_size}"]
        )
        return generate_for_recipe(
            model, recipe, dataset_classes=10, device=torch.device("cpu"), sample=cfg.sample
        )

    whole, split = images(6), images(4)
    assert whole.shape == (6, 3, 16, 16) and whole.dtype == torch.uint8
    assert torch.equal(whole, split)


def test_classifier_free_guidance_changes_the_samples_and_one_is_no_guidance() -> None:
    recipe = load_recipe(MINI, [*TINY_EDM, "diffusion.label_dropout=0.1"])
    torch.manual_seed(0)
    model = build_model(recipe, 10)
    with torch.no_grad():  # a non-trivial network: zero-initialised output gains would hide labels
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))

    def images(*overrides: str) -> Tensor:
        cfg = load_recipe(MINI, [*TINY_EDM, "diffusion.label_dropout=0.1", *overrides]).sample
        return generate_for_recipe(
            model, recipe, dataset_classes=10, device=torch.device("cpu"), sample=cfg
        )

    plain = images()
    assert torch.equal(plain, images("sample.guidance=1.0", "sample.guide=self"))
    assert not torch.equal(plain, images("sample.guidance=3.0", "sample.guide=self"))


def test_mini_then_ema_reconstruct_with_no_arguments_then_sample(dmstab: Runner) -> None:
    """EDM2's headline workflow: train with two power EMAs, pick σrel 0.13 afterwards."""
    trained = dmstab("train", str(MINI), *TINY_EDM)
    assert trained.returncode == 0, trained.stderr
    run_dir = next(Path("runs").iterdir())
    assert len(list((run_dir / "snapshots").glob("*.pt"))) == 2 * 6  # every 16 images, 96 in all
    made = dmstab("ema-reconstruct", "--sigma-rel", "0.13")
    assert made.returncode == 0, made.stderr
    [checkpoint] = (run_dir / "reconstructed").glob("*.pt")
    state = load_checkpoint(checkpoint)
    assert state["sigma_rel"] == 0.13 and state["step"] == 12
    sampled = dmstab("sample", str(checkpoint), "sample.num_images=3")
    assert sampled.returncode == 0, sampled.stderr
    npz = next(Path("samples").glob("*/heun4_seed0.npz"))
    import numpy as np

    with np.load(npz) as archive:
        assert archive["arr_0"].shape == (3, 16, 16, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=adm_unet"], "unknown recipe key 'model.edm2'; model.name adm_unet allows"),
        (["diffusion.formulation=ddpm"], "edm2_unet trains with diffusion.formulation edm"),
        (["sample.sampler=ddim"], "sample.sampler ddim samples diffusion.formulation ddpm models"),
        (["timesteps.sampler=clts"], "clts is a ddpm curriculum"),
        (["train.steps=10"], "set train.steps or train.kimg, not both"),
        (["sample.guidance=2"], "needs sample.guide"),
        (["sample.guide=self", "sample.guidance=2"], "diffusion.label_dropout > 0"),
        (["diffusion.label_dropout=0.1", "model.class_cond=false"], "needs model.class_cond"),
        (["optim.schedule=constant"], "belong to optim.schedule inverse_sqrt"),
        (["model.edm2.streamlined=false"], "needs model.edm2.streamlined=true"),
        (["diffusion.p_std=0"], "diffusion.p_std is 0.0"),
        (["sample.steps=1"], "edm sampling needs at least 2"),
    ],
)
def test_contradictory_edm_settings_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(DmstabError, match=message):
        load_recipe(MINI, [*TINY_EDM, *overrides])
