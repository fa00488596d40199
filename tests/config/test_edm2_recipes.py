"""The EDM2 recipes against the paper: Table 1 configs A–G, Table 2/3 sizes, App. D Table 6.

Paper numbers below are typed from "Analyzing and Improving the Training Dynamics of Diffusion
Models" (Karras et al., CVPR 2024; arXiv 2312.02696v2 for the appendix): Table 1, Table 2,
Table 3, Figs. 16–22 (per-config hyper-parameters) and App. D Table 6 (per-size details).
Networks are built on the meta device, so even XXL (1.5B parameters) costs no memory.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dmstab.config import Recipe, differences, load_recipe
from dmstab.models import build_model, count_parameters
from dmstab.models.edm2_unet import SWITCHES, SelfAttention
from tests.helpers import RECIPES

EDM2_RECIPES = sorted(RECIPES.glob("edm2_*.yaml"))
CONFIGS = [f"edm2_config_{letter}" for letter in "abcdefg"]
IMAGENET_CLASSES = 1000
MIMG = 1e6
MI = 2**20  # NVlabs/edm2 counts snapshot intervals in mebi-images


class Published(NamedTuple):
    """What the paper prints for one network: size, cost, quality."""

    mparams: float
    gflops: float
    fid: float


# Table 1 (ImageNet-512, S size, no guidance): FID, Mparams, Gflops.
TABLE1 = {
    "edm2_config_a": Published(295.9, 110.4, 8.00),
    "edm2_config_b": Published(291.8, 100.4, 7.24),
    "edm2_config_c": Published(277.8, 100.3, 6.96),
    "edm2_config_d": Published(277.8, 101.2, 3.75),
    "edm2_config_e": Published(277.8, 101.2, 3.02),
    "edm2_config_f": Published(280.2, 102.1, 2.71),
    "edm2_config_g": Published(280.2, 102.2, 2.56),
}
# Table 2 / Table 3 (no CFG), with Table 6's finer Mparams and Gflops.
TABLE2_AND_3 = {
    "edm2_img512_xs": Published(124.7, 45.5, 3.53),
    "edm2_img512_s": Published(280.2, 102.2, 2.56),
    "edm2_img512_m": Published(497.8, 180.8, 2.25),
    "edm2_img512_l": Published(777.5, 282.2, 2.06),
    "edm2_img512_xl": Published(1119.3, 405.9, 1.96),
    "edm2_img512_xxl": Published(1523.2, 552.1, 1.91),
    "edm2_img64_s": Published(280.2, 101.9, 1.58),
    "edm2_img64_m": Published(497.8, 180.8, 1.43),
    "edm2_img64_l": Published(777.5, 282.1, 1.33),
    "edm2_img64_xl": Published(1119.3, 405.9, 1.33),
}
PUBLISHED = TABLE1 | TABLE2_AND_3
# Table 2 "w/CFG" column (ImageNet-512).
TABLE2_FID_CFG = {
    "edm2_img512_xs": 2.91,
    "edm2_img512_s": 2.23,
    "edm2_img512_m": 2.01,
    "edm2_img512_l": 1.88,
    "edm2_img512_xl": 1.85,
    "edm2_img512_xxl": 1.81,
}


class Training(NamedTuple):
    """One column of Figs. 16–22 or Table 6. t_ref in batches, None for ∞ (constant lr)."""

    channels: int
    dropout: float
    alpha_ref: float
    t_ref: int | None
    batch: int
    mimg: float
    p_mean: float
    p_std: float
    beta2: float


# Figs. 16–22: config A is EDM's ImageNet-64 setup; B re-tunes it (App. B.2); D raises α_ref for
# unit-norm weights (App. B.4); E adds the decay (Sec. 2.3); G drops dropout (Sec. 2.5).
CONFIG_TRAINING = {
    "edm2_config_a": Training(192, 0.10, 0.0001, None, 4096, 2147.5, -1.2, 1.2, 0.999),
    "edm2_config_b": Training(192, 0.10, 0.0002, None, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_config_c": Training(192, 0.10, 0.0002, None, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_config_d": Training(192, 0.10, 0.0100, None, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_config_e": Training(192, 0.10, 0.0100, 70000, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_config_f": Training(192, 0.10, 0.0100, 70000, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_config_g": Training(192, 0.00, 0.0100, 70000, 2048, 2147.5, -0.4, 1.0, 0.99),
}
# App. D Table 6: ImageNet-512 XS–XXL and ImageNet-64 S–XL.
SIZE_TRAINING = {
    "edm2_img512_xs": Training(128, 0.0, 0.0120, 70000, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_img512_s": Training(192, 0.0, 0.0100, 70000, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_img512_m": Training(256, 0.1, 0.0090, 70000, 2048, 2147.5, -0.4, 1.0, 0.99),
    "edm2_img512_l": Training(320, 0.1, 0.0080, 70000, 2048, 1879.0, -0.4, 1.0, 0.99),
    "edm2_img512_xl": Training(384, 0.1, 0.0070, 70000, 2048, 1342.2, -0.4, 1.0, 0.99),
    "edm2_img512_xxl": Training(448, 0.1, 0.0065, 70000, 2048, 939.5, -0.4, 1.0, 0.99),
    "edm2_img64_s": Training(192, 0.0, 0.0100, 35000, 2048, 1073.7, -0.8, 1.6, 0.99),
    "edm2_img64_m": Training(256, 0.1, 0.0090, 35000, 2048, 2147.5, -0.8, 1.6, 0.99),
    "edm2_img64_l": Training(320, 0.1, 0.0080, 35000, 2048, 1073.7, -0.8, 1.6, 0.99),
    "edm2_img64_xl": Training(384, 0.1, 0.0070, 35000, 2048, 671.1, -0.8, 1.6, 0.99),
}
TRAINING = CONFIG_TRAINING | SIZE_TRAINING

# What each step of Table 1 changes (Sec. 2, App. B, Figs. 16–22), as recipe keys.
TABLE1_CHANGES = {
    "edm2_config_b": {  # re-tuned hyper-parameters, u(σ), no attention at 32², power EMA
        # (the power EMAs themselves are tracked from config A on: they only observe)
        "model.edm2.minor_improvements",
        "model.attention_resolutions",
        "diffusion.p_mean",
        "diffusion.p_std",
        "optim.lr",
        "optim.betas",
        "train.batch_size",
        "ema.rate",
    },
    "edm2_config_c": {"model.edm2.streamlined"},
    "edm2_config_d": {"model.edm2.mp_learned_layers", "optim.lr"},
    "edm2_config_e": {"model.edm2.forced_weight_norm", "optim.ref_kimg"},
    "edm2_config_f": {"model.edm2.no_group_norm"},
    "edm2_config_g": {"model.edm2.mp_fixed_layers", "model.dropout"},
}


def recipe(stem: str) -> Recipe:
    return load_recipe(RECIPES / f"{stem}.yaml")


def num_classes(r: Recipe) -> int:
    return 10 if r.data.name == "cifar10" else IMAGENET_CLASSES


@cache
def measured(stem: str) -> tuple[float, float, int]:
    """(Mparams, Gflops per evaluation, attention blocks) of the network `stem` builds.

    Gflops: torch's counter over one conditional evaluation on the meta device, at 2 flops per
    multiply-add, halved to EDM2's 1 per multiply-add (App. D.5); elementwise ops are not
    counted, which EDM2's estimator adds (< 2% of the total).
    """
    r = recipe(stem)
    classes = num_classes(r)
    channels = 4 if r.data.name == "latents" else 3
    with torch.device("meta"):
        model = build_model(r, classes).eval()
        x = torch.zeros(1, channels, r.data.resolution, r.data.resolution)
        sigma, labels = torch.ones(1), torch.zeros(1, classes)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, sigma, labels)
    attention = sum(isinstance(m, SelfAttention) for m in model.modules())
    return count_parameters(model) / 1e6, counter.get_total_flops() / 2e9, attention


def changed_keys(a: Recipe, b: Recipe) -> set[str]:
    """Keys that differ between two recipes, leaving out the name and the paper block."""
    keys = {line.split(":")[0] for line in differences(a, b)}
    return {k for k in keys if k != "name" and not k.startswith("paper.")}


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", EDM2_RECIPES, ids=lambda p: p.stem)
def test_every_edm2_recipe_loads_and_validates(path: Path) -> None:
    r = load_recipe(path)
    assert r.name == path.stem
    assert (r.model.name, r.diffusion.formulation) == ("edm2_unet", "edm")


def test_the_recipe_set_is_complete() -> None:
    ours = {*PUBLISHED, "edm2_base", "edm2_cifar10_s"}
    assert ours <= {p.stem for p in EDM2_RECIPES}


@pytest.mark.parametrize("stem", [*PUBLISHED, "edm2_cifar10_s"])
def test_sampling_is_edm_heun_with_32_steps(stem: str) -> None:
    # App. D.1: EDM's deterministic 2nd-order sampler, σ 0.002–80, ρ = 7, N = 32 (NFE 63).
    s = recipe(stem).sample
    assert (s.sampler, s.steps, s.sigma_min, s.sigma_max, s.rho) == ("heun", 32, 0.002, 80.0, 7.0)
    assert (s.s_churn, s.guidance) == (0.0, 1.0)


# --- Table 1: each config is the previous one plus the paper's listed change ---------------


@pytest.mark.parametrize("stem", list(TABLE1_CHANGES))
def test_each_config_changes_only_what_table1_lists(stem: str) -> None:
    previous = CONFIGS[CONFIGS.index(stem) - 1]
    assert changed_keys(recipe(previous), recipe(stem)) == TABLE1_CHANGES[stem]


def test_config_a_turns_every_table1_switch_off_and_g_turns_them_on() -> None:
    a, g = recipe("edm2_config_a").model.edm2, recipe("edm2_config_g").model.edm2
    assert not any(getattr(a, name) for name in SWITCHES)
    assert all(getattr(g, name) for name in SWITCHES)


def test_config_g_is_edm2_s_and_the_base() -> None:
    # Table 2: "EDM2-S is the same as CONFIG G in Table 1".
    g, s, base = recipe("edm2_config_g"), recipe("edm2_img512_s"), recipe("edm2_base")
    assert changed_keys(g, s) == set() and changed_keys(s, base) == set()
    assert g.paper.values["end"] == s.paper.values["end"]


# --- networks: parameter counts, cost and layout against the paper ---------------------------


@pytest.mark.parametrize("stem", list(PUBLISHED))
def test_parameter_count_matches_the_paper(stem: str) -> None:
    mparams, _, _ = measured(stem)
    assert mparams == pytest.approx(PUBLISHED[stem].mparams, rel=0.01)


@pytest.mark.parametrize("stem", list(PUBLISHED))
def test_gflops_per_evaluation_match_the_paper(stem: str) -> None:
    _, gflops, _ = measured(stem)
    assert gflops == pytest.approx(PUBLISHED[stem].gflops, rel=0.02)


@pytest.mark.parametrize("stem", CONFIGS)
def test_attention_blocks_as_figs_16_to_22(stem: str) -> None:
    # "Attention blocks": 22 in config A (32², 16², 8²), 15 from config B on (16², 8²).
    _, _, attention = measured(stem)
    assert attention == (22 if stem == "edm2_config_a" else 15)


def test_table1_parameter_counts_at_the_printed_precision() -> None:
    # Table 1 prints 0.1M: 295.9, 291.8, 277.8 (C–E: the same weights), 280.2 (F, G: G only adds
    # a few dozen scalar gains). The 1% test above cannot tell C–E apart from F–G; this can.
    counts = [round(measured(stem)[0], 1) for stem in CONFIGS]
    assert counts == [TABLE1[stem].mparams for stem in CONFIGS]


# --- training hyper-parameters --------------------------------------------------------------


@pytest.mark.parametrize("stem", list(TRAINING))
def test_training_hyperparameters_are_the_papers(stem: str) -> None:
    r, expected = recipe(stem), TRAINING[stem]
    assert r.model.channels == expected.channels
    assert r.model.dropout == expected.dropout
    assert r.optim.lr == expected.alpha_ref
    assert r.optim.betas == (0.9, expected.beta2)
    assert r.optim.schedule == "inverse_sqrt"
    t_ref = r.optim.ref_kimg * 1000 / r.train.batch_size
    assert (t_ref if t_ref else None) == expected.t_ref
    assert r.optim.rampup_kimg * 1000 == 10 * MIMG  # warm-up over 10M images (Figs. 16–22)
    assert r.train.batch_size == expected.batch
    assert r.train.kimg * 1000 / MIMG == pytest.approx(expected.mimg, abs=0.05)
    assert (r.diffusion.p_mean, r.diffusion.p_std) == (expected.p_mean, expected.p_std)
    assert r.diffusion.sigma_data == 0.5


@pytest.mark.parametrize("stem", [s for s in TRAINING if s != "edm2_config_a"])
def test_training_lengths_are_whole_batches_of_mebi_images(stem: str) -> None:
    # NVlabs/edm2 presets count in 2^20 images: 2048Mi, 1792Mi, ... = 2^k steps of 2048.
    r = recipe(stem)
    images = round(r.train.kimg * 1000)
    assert images % MI == 0 and images == r.train.total_steps * r.train.batch_size


def test_config_a_uses_a_traditional_ema_with_a_50m_image_half_life() -> None:
    # App. B.1: 2^19 iterations of 4096, "traditional EMA with a half-life of 50M images".
    r = recipe("edm2_config_a")
    assert r.train.total_steps == 2**19
    half_life_images = r.train.batch_size * math.log(0.5) / math.log(r.ema.rate)
    assert half_life_images == pytest.approx(50 * MIMG, rel=1e-4)
    assert r.sample.use_ema  # samples the classic EMA; the power EMAs only observe


@pytest.mark.parametrize("stem", TRAINING)
def test_power_ema_snapshots_as_the_paper_stores_them(stem: str) -> None:
    # Sec. 3.2 / App. C.5: σrel 0.05 and 0.10, a snapshot every 8Mi images, in 16 bits.
    e = recipe(stem).ema
    assert e.power_sigma_rels == (0.05, 0.10)
    assert (e.snapshot_every, e.snapshot_dtype) == (8 * MI, "float16")


@pytest.mark.parametrize("stem", list(PUBLISHED))
def test_data_is_latents_at_512_and_pixels_at_64(stem: str) -> None:
    d = recipe(stem).data
    if "img64" in stem:
        assert (d.name, d.resolution) == ("folder", 64)
    else:  # 64×64×4 latents of the 512×512 images (Sec. 2)
        assert (d.name, d.resolution) == ("latents", 64)
    assert not d.hflip  # App. D.3: no flips or other augmentation


# --- published results ----------------------------------------------------------------------


@pytest.mark.parametrize("stem", list(PUBLISHED))
def test_paper_block_carries_the_published_fid(stem: str) -> None:
    p = recipe(stem).paper
    assert p.metric == "fid"
    assert p.values == {"end": PUBLISHED[stem].fid}  # FID at the end of training
    assert p.others.get("fid_cfg") == TABLE2_FID_CFG.get(stem)


# --- CIFAR-10 -------------------------------------------------------------------------------


def test_cifar10_recipe_keeps_edm2s_schedule_in_iterations() -> None:
    r = recipe("edm2_cifar10_s")
    batch = r.train.batch_size
    assert r.optim.ref_kimg * 1000 / batch == 35000  # ImageNet-64's t_ref in batches
    assert r.optim.rampup_kimg * 1000 / batch == pytest.approx(10 * MIMG / 2048, rel=1e-3)
    assert r.optim.lr == pytest.approx(0.0120 * math.sqrt(batch / 2048))  # XS α_ref, √batch
    assert r.train.total_steps == 200 * MIMG / batch


def test_cifar10_network_denoises_a_batch() -> None:
    r = recipe("edm2_cifar10_s")
    torch.manual_seed(0)
    model = build_model(r, num_classes(r)).eval()
    assert count_parameters(model) / 1e6 == pytest.approx(measured("edm2_cifar10_s")[0])
    x = torch.randn(2, 3, 32, 32)
    labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    with torch.no_grad():
        denoised = model(x, torch.tensor([0.5, 5.0]), labels)
    assert denoised.shape == x.shape and bool(torch.isfinite(denoised).all())
