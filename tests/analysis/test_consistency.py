"""The AAAI 2024 consistency score (Eq. 1, Table 1, Fig. 1) against closed forms, and the
premise it rests on: different networks sampled with one seed receive the same noise."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import dmstab.models.generate
from dmstab.analysis.consistency import (
    consistency_score,
    mean_squared_error,
    one_level_cap,
    psnr,
)
from dmstab.config import Recipe, load_recipe
from dmstab.diffusion.sampling import NoiseSource
from dmstab.errors import DmstabError
from dmstab.models import build_model, count_parameters
from dmstab.models.generate import generate_for_recipe
from dmstab.plots import consistency_grid
from tests.helpers import MINI, RECIPES, TINY, TINY_EDM

CPU = torch.device("cpu")


def constant(value: float, shape: tuple[int, ...] = (1, 3, 4, 4)) -> Tensor:
    return torch.full(shape, value, dtype=torch.float64)


@pytest.mark.parametrize("levels", [1, 3, 17, 255])
def test_a_constant_difference_of_d_levels_scores_20_log10_255_over_d(levels: int) -> None:
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = torch.full_like(a, levels)  # 0 − 255 would wrap to 1 in uint8 arithmetic
    expected = 20 * math.log10(255 / levels)
    for first, second in ((a, b), (b, a)):
        scores = psnr(first, second)
        assert scores.dtype == torch.float64 and scores.shape == (2,)
        assert scores.tolist() == pytest.approx([expected, expected], abs=1e-12)


def test_one_value_off_scores_10_log10_of_255_squared_times_values_over_d_squared() -> None:
    a = torch.randint(
        0, 200, (3, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    b = a.clone()
    b[0, 1, 2, 3] += 40  # image 0: one value of 48 off by 40 levels
    b[1, 0, 0, 0] += 1  # image 1: one level in one value, the closest two 8-bit images can be
    scores = psnr(a, b)
    assert scores[0].item() == pytest.approx(10 * math.log10(255**2 * 48 / 40**2), abs=1e-12)
    assert scores[1].item() == pytest.approx(10 * math.log10(255**2 * 48), abs=1e-12)
    assert mean_squared_error(a, b).tolist() == pytest.approx([40**2 / 48, 1 / 48, 0.0])


def test_identical_images_score_the_finite_cap_and_are_counted_by_their_zero_mse() -> None:
    a = torch.randint(
        0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    b = a.clone()
    b[:2] = 255 - b[:2]
    scores = psnr(a, b)
    cap = 20 * math.log10(255) + 10 * math.log10(3 * 8 * 8)
    assert one_level_cap(3 * 8 * 8) == pytest.approx(cap, abs=1e-12)
    assert torch.isfinite(scores).all()
    assert scores[2:].tolist() == [one_level_cap(192)] * 2
    assert (scores[:2] < 30).all()
    assert int((mean_squared_error(a, b) == 0).sum()) == 2
    assert psnr(a, a, cap=100.0).tolist() == [100.0] * 4
    b[3, 0, 0, 0] ^= 1  # one level off: it scores the cap as well, but is not identical
    result = consistency_score(torch.stack([a, b]))
    assert result.per_pair[0, 2:].tolist() == [one_level_cap(192)] * 2
    assert (result.identical_pairs, result.num_pairs) == (1, 4)
    assert psnr(constant(0.0), constant(255.0), cap=100.0).item() == 0.0  # the cap only clamps


def test_eq_1_on_a_hand_built_example() -> None:
    """N = 3 models, M = 2 seeds, 1×1×4 float images; model 1 is the reference.

    seed 0: ref 0,          model 2: 25.5 (d = 25.5 → 20 dB), model 3: 2.55 (d = 2.55 → 40 dB)
    seed 1: ref 100,        model 2: 102.55 (40 dB),         model 3: 100 (identical → cap)
    cap = 10·log10(255²·4) = 54.151 dB, so per_seed = [30, (40 + cap)/2] and
    C = (20 + 40 + 40 + cap)/4 = 25 + cap/4 = 38.538 dB, with 1 of 4 pairs identical.
    Models 2 and 3 differ by 22.95 = 255·(9/100) (seed 0) and 2.55 (seed 1), so
    pairwise[1, 2] = (20·log10(100/9) + 40)/2.
    """
    shape = (1, 1, 4)
    images = torch.stack(
        [
            torch.stack([constant(0.0, shape), constant(100.0, shape)]),
            torch.stack([constant(25.5, shape), constant(102.55, shape)]),
            torch.stack([constant(2.55, shape), constant(100.0, shape)]),
        ]
    )
    result = consistency_score(images)
    cap = 10 * math.log10(255**2 * 4)
    assert result.cap == pytest.approx(cap)
    np.testing.assert_allclose(result.per_pair, [[20.0, 40.0], [40.0, cap]], rtol=1e-9)
    np.testing.assert_allclose(result.per_seed, [30.0, (40.0 + cap) / 2], rtol=1e-9)
    assert result.score == pytest.approx(25 + cap / 4, rel=1e-9)
    assert (result.identical_pairs, result.num_pairs) == (1, 4)
    assert result.pairwise[1, 2] == pytest.approx((20 * math.log10(100 / 9) + 40) / 2, rel=1e-9)
    assert result.pairwise[0, 1] == pytest.approx(30.0, rel=1e-9)


def random_images(models: int, seeds: int, seed: int = 0) -> Tensor:
    """Each model's images are the reference's plus noise of its own strength, so PSNRs differ."""
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randint(0, 256, (seeds, 3, 8, 8), generator=generator).float()
    noisy = [
        reference + 4 * k * torch.randn(reference.shape, generator=generator) for k in range(models)
    ]
    return torch.stack(noisy).round().clamp(0, 255).to(torch.uint8)


def test_pairwise_is_symmetric_with_a_nan_diagonal_and_extends_eq_1() -> None:
    result = consistency_score(random_images(4, 5))
    assert result.pairwise.shape == (4, 4)
    assert np.isnan(np.diag(result.pairwise)).all()
    np.testing.assert_array_equal(result.pairwise, result.pairwise.T)
    np.testing.assert_allclose(result.pairwise[0, 1:], result.per_pair.mean(axis=1), rtol=1e-12)
    assert result.per_pair.shape == (3, 5) and result.per_seed.shape == (5,)
    assert result.identical_pairs == 0
    assert result.score == pytest.approx(result.per_pair.mean(), rel=1e-12)


def test_permuting_seeds_permutes_per_seed_and_keeps_the_score() -> None:
    images = random_images(3, 6, seed=2)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    result, permuted = consistency_score(images), consistency_score(images[:, order])
    assert permuted.score == pytest.approx(result.score, rel=1e-12)
    np.testing.assert_allclose(permuted.per_seed, result.per_seed[order.numpy()], rtol=1e-12)
    np.testing.assert_allclose(permuted.pairwise, result.pairwise, rtol=1e-12)


def test_the_first_model_is_the_reference() -> None:
    """Eq. 1 is not symmetric in the models: only pairs with model 1 count."""
    images = random_images(3, 4, seed=3)
    swapped = consistency_score(images[[2, 1, 0]])
    result = consistency_score(images)
    np.testing.assert_allclose(swapped.per_pair[0], psnr(images[2], images[1]).numpy())
    np.testing.assert_allclose(swapped.per_pair[1], result.per_pair[1])  # q3 vs q1 either way
    assert swapped.score != pytest.approx(result.score)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 3, 8, 8), "models, seeds, C, H, W"),
        ((1, 2, 3, 8, 8), "at least 2 models and 1 seed, got 1 and 2"),
        ((2, 0, 3, 8, 8), "at least 2 models and 1 seed, got 2 and 0"),
    ],
)
def test_bad_shapes_are_one_line_errors(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(DmstabError, match=message):
        consistency_score(torch.zeros(shape, dtype=torch.uint8))


def test_psnr_rejects_mismatched_batches_and_images_not_on_the_0_255_scale() -> None:
    a = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(DmstabError, match="differ in shape"):
        psnr(a, torch.zeros(2, 3, 8, 4, dtype=torch.uint8))
    with pytest.raises(DmstabError, match=r"batch \(N, C, H, W\)"):
        psnr(a[0], a[0])
    with pytest.raises(DmstabError, match=r"PSNR needs \[0, 255.0\]"):
        psnr(a.float(), torch.full((2, 3, 8, 8), -1.0))  # [−1, 1] model outputs
    with pytest.raises(DmstabError, match="PSNR needs"):
        psnr(a.float(), torch.full((2, 3, 8, 8), math.nan))


def test_consistency_grid_has_one_labelled_row_per_model_and_one_column_per_seed() -> None:
    from matplotlib import pyplot as plt

    images = random_images(3, 4, seed=4)
    labels = ["init 0", "init 1", "init 2"]
    result = consistency_score(images)
    fig = consistency_grid(images, labels, psnr=result.per_pair)
    try:
        axes = np.array(fig.axes).reshape(3, 4)
        assert all(len(ax.images) == 1 for ax in axes.flat)
        assert [ax.get_ylabel() for ax in axes[:, 0]] == labels
        np.testing.assert_array_equal(
            axes[2, 3].images[0].get_array(), images[2, 3].permute(1, 2, 0).numpy()
        )
        assert axes[1, 2].get_xlabel() == f"{result.per_pair[0, 2]:.1f} dB"
        assert axes[0, 0].get_xlabel() == ""
    finally:
        plt.close(fig)


# ---- the premise of Table 1: one seed, one noise, whatever the network -------------------


def draws_while_generating(
    monkeypatch: pytest.MonkeyPatch, recipe: Recipe
) -> tuple[Tensor, Tensor, int]:
    """(every NoiseSource draw per image (N, draws, C, H, W), the images, the parameter count)
    when a freshly built network of `recipe` generates through the real sampling path."""
    log: dict[int, list[Tensor]] = defaultdict(list)

    class RecordingNoise(NoiseSource):
        """The real NoiseSource, keeping a copy of each draw under its image's index."""

        def __init__(
            self,
            seed: int,
            first_index: int,
            count: int,
            shape: tuple[int, int, int],
            device: torch.device = CPU,
        ) -> None:
            super().__init__(seed, first_index, count, shape, device)
            self.first_index = first_index

        def next(self) -> Tensor:
            draw = super().next()
            for offset, image in enumerate(draw):
                log[self.first_index + offset].append(image.clone())
            return draw

    monkeypatch.setattr(dmstab.models.generate, "NoiseSource", RecordingNoise)
    torch.manual_seed(0)
    model = build_model(recipe, 10)
    with torch.no_grad():  # untrained ADMs predict ε = 0 at any width (zero-initialised output)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    images = generate_for_recipe(model, recipe, dataset_classes=10, device=CPU)
    assert sorted(log) == list(range(recipe.sample.num_images))
    draws = torch.stack([torch.stack(log[index]) for index in sorted(log)])
    return draws, images, count_parameters(model)


QUICKSTART = RECIPES / "quickstart.yaml"
ADM = [*TINY, "sample.sampler=ddpm"]  # 5 DDPM steps: x_T and 4 step noises
NARROW_ADM = [
    *ADM,
    "model.channel_mult=[1,1]",
    "model.attention_resolutions=[]",
    "sample.batch_size=2",
]
# EDM2 UNet, 4 Heun steps with churn at each (EDM Alg. 2): x_T and 4 churn noises
CHURNED_EDM2 = [*TINY_EDM, "sample.s_churn=40", "sample.batch_size=2"]


@pytest.mark.parametrize(
    "other",
    [(QUICKSTART, NARROW_ADM), (MINI, CHURNED_EDM2)],
    ids=["adm-narrower-adm", "adm-edm2"],
)
def test_different_networks_receive_bit_identical_noise_for_one_seed(
    monkeypatch: pytest.MonkeyPatch, one_thread: None, other: tuple[Path, list[str]]
) -> None:
    path, overrides = other
    first = draws_while_generating(monkeypatch, load_recipe(QUICKSTART, ADM))
    second = draws_while_generating(monkeypatch, load_recipe(path, overrides))
    (first_draws, first_images, first_size), (second_draws, second_images, second_size) = (
        first,
        second,
    )
    assert first_draws.shape == second_draws.shape == (4, 5, 3, 16, 16)
    assert torch.equal(first_draws, second_draws)  # x_T and every step's noise, bit for bit
    reference = NoiseSource(seed=0, first_index=0, count=4, shape=(3, 16, 16))
    assert torch.equal(first_draws, torch.stack([reference.next() for _ in range(5)], dim=1))
    assert first_size != second_size  # genuinely different networks ...
    assert not torch.equal(first_images, second_images)  # ... making different images
