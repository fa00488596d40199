"""Typed recipes: YAML with `base:` inheritance, `a.b=value` overrides, validation.

A recipe is a tree of frozen dataclasses. Loading never guesses: an unknown key,
a value of the wrong type or out of range is a `DmstabError` whose one line names
the key and what is allowed (with the closest key when one is near).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from dmstab.errors import DmstabError

DatasetName = Literal["synthetic", "cifar10", "folder", "npz", "latents"]
ModelName = Literal["adm_unet", "edm2_unet", "uvit", "dcgan", "biggan"]
GAN_MODELS: tuple[str, ...] = ("dcgan", "biggan")
GanLoss = Literal["bce", "hinge"]
GanNetwork = Literal["generator", "discriminator"]
HvpMethod = Literal["auto", "forward_over_reverse", "double_backward"]
Formulation = Literal["ddpm", "edm"]
ScheduleName = Literal["linear", "cosine"]
Target = Literal["eps", "x0", "v"]
LossWeighting = Literal["none", "min_snr", "p2", "fdm"]
TimestepSamplerName = Literal["uniform", "clts", "importance", "shifted_gaussian"]
SamplerName = Literal["ddpm", "ddim", "heun"]
LrSchedule = Literal["constant", "inverse_sqrt"]
FidMode = Literal["clean", "legacy_pytorch", "legacy_tensorflow"]
EvalMetric = Literal["fid", "kid", "is"]
FeatureNetwork = Literal["inception", "random_conv", "classifier"]
FEATURE_NETWORKS: tuple[str, ...] = get_args(FeatureNetwork)
Precision = Literal["fp32", "bf16"]
DeviceName = Literal["auto", "cpu", "cuda"]
NonfinitePolicy = Literal["stop", "skip"]
SpikePolicy = Literal["skip", "stop"]


@dataclass(frozen=True)
class DataConfig:
    """Training images. `synthetic` is generated in memory; the others read `root`."""

    name: DatasetName = "synthetic"
    root: str | None = None
    resolution: int = 32
    download: bool = False
    hflip: bool = False
    synthetic_size: int = 10_000
    synthetic_seed: int = 0


@dataclass(frozen=True)
class Edm2Switches:
    """EDM2 Table 1, one switch per row (B..G), and the magnitude-preserving constants.

    Each switch needs the previous one: config X turns on every row up to X.
    """

    minor_improvements: bool = True  # B: learned uncertainty u(σ), no attention at 32×32
    streamlined: bool = True  # C
    mp_learned_layers: bool = True  # D
    forced_weight_norm: bool = True  # E
    no_group_norm: bool = True  # F
    mp_fixed_layers: bool = True  # G
    channels_per_head: int = 64
    res_balance: float = 0.3
    attn_balance: float = 0.3
    label_balance: float = 0.5
    concat_balance: float = 0.5
    clip_act: float = 256.0
    logvar_channels: int = 128


@dataclass(frozen=True)
class ModelConfig:
    """The network: the improved/guided-diffusion UNet, the EDM2 UNet (configs A–G) or U-ViT.

    `channels`, `channel_mult`, `num_res_blocks`, `attention_resolutions`, `dropout` and
    `class_cond` serve both UNets; `edm2` only the EDM2 UNet; the rest only the ADM UNet, except
    that U-ViT (Bao et al. 2023) reads `patch_size`, `embed_dim`, `depth`, `mlp_ratio`,
    `num_heads`, `dropout`, `learn_sigma` and `class_cond` and ignores the other keys.
    """

    name: ModelName = "adm_unet"
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.3
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    learn_sigma: bool = True
    class_cond: bool = False
    label_dropout: float = 0.0  # EDM only: drop labels for classifier-free guidance
    edm2: Edm2Switches = Edm2Switches()
    patch_size: int = 2  # uvit: the U-ViT-S/2 defaults (CIFAR-10)
    embed_dim: int = 512
    depth: int = 13  # all transformer blocks: depth//2 in, 1 mid, depth//2 out
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class DiffusionConfig:
    """The formulation: discrete DDPM or continuous EDM.

    ddpm: forward process (AAAI Eq. 3) with `schedule` over `steps` and prediction `target`
    (Eq. 4: eps, Eq. 5: x0, or v of Salimans & Ho 2022); `weighting` scales the target MSE per
    timestep: Min-SNR-γ (`min_snr_gamma`) or P2 1/(`p2_k` + SNR)^`p2_gamma` on the ε-MSE,
    converted to the target (dmstab.diffusion.weighting). edm: preconditioning with
    `sigma_data` (EDM Table 1) and training noise levels ln σ ~ N(`p_mean`, `p_std`²)
    (EDM2: (−0.4, 1.0) latents, (−0.8, 1.6) pixels).
    """

    formulation: Formulation = "ddpm"
    schedule: ScheduleName = "cosine"
    steps: int = 4000
    target: Target = "eps"
    weighting: LossWeighting = "none"
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    # weighting fdm: FDM (Wu et al. 2023) = its kernel scale e^{−mB}(1 + mB) on the model input
    # plus its loss-weight warm-up (dmstab.diffusion.fdm); defaults: official CIFAR-10 VP-FDM.
    fdm_multiplier: float = 2.0
    fdm_beta_min: float = 0.1
    fdm_beta_d: float = 19.9
    fdm_warmup_iterations: int = 400
    p_mean: float = -0.8
    p_std: float = 1.6
    sigma_data: float = 0.5


@dataclass(frozen=True)
class TimestepsConfig:
    """Training timestep distribution (dmstab.diffusion.timesteps).

    uniform; clts (AAAI Eqs. 6-7); shifted_gaussian, the paper's first attempt: N(t; μ_i, σ)
    with μ_i moving linearly from T−1 to `mu` by `target_iteration`; importance, improved-
    diffusion's loss-second-moment sampler over the last `history` losses per timestep, mixed
    with `uniform_prob` of uniform.
    """

    sampler: TimestepSamplerName = "uniform"
    mu: float = 1200.0
    sigma: float = 4000.0
    target_iteration: int = 50_000
    history: int = 10
    uniform_prob: float = 0.001
    histogram_every: int = 1000


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    warmup_steps: int = 0
    schedule: LrSchedule = "constant"
    ref_kimg: float = 0.0  # inverse_sqrt: t_ref in thousands of images (EDM2 Sec. 2.3)
    rampup_kimg: float = 0.0  # inverse_sqrt: linear warm-up, thousands of images


@dataclass(frozen=True)
class EmaConfig:
    """Classic EMA (`rate`), plus optional power-function EMAs for post-hoc reconstruction.

    `power_sigma_rels` lists the relative widths σrel of the power-function EMAs tracked every
    step (EDM2 Sec. 3; the paper stores 0.05 and 0.10); their snapshots are written every
    `snapshot_every` training images and at the end, for `dmstab ema-reconstruct`.
    """

    rate: float = 0.9999
    warmup: bool = False
    power_sigma_rels: tuple[float, ...] = ()
    snapshot_every: int = 0
    snapshot_dtype: Literal["float32", "float16"] = "float32"


@dataclass(frozen=True)
class TrainConfig:
    """`kimg`, when positive, sets the length in thousands of images as EDM2 counts it.

    `batch_size` is the global batch; `micro_batch_size` rows per forward pass and process
    (0 = batch_size / processes, no gradient accumulation). `nonfinite` and the `spike_*` keys
    decide what a NaN/inf or spiking step does (docs/distributed.md, dmstab.train.loss_guard).
    """

    steps: int = 500_000
    kimg: float = 0.0
    batch_size: int = 128
    seed: int = 0
    device: DeviceName = "auto"
    precision: Precision = "bf16"
    log_every: int = 10
    checkpoint_every: int = 5000
    sample_every: int = 0
    magnitudes_every: int = 0
    out_dir: str = "runs"
    micro_batch_size: int = 0
    nonfinite: NonfinitePolicy = "stop"
    spike_factor: float = 0.0
    spike_window: int = 100
    spike_policy: SpikePolicy = "skip"
    max_skipped: int = 10
    keep_checkpoints: tuple[int, ...] = ()  # also keep checkpoints/step_XXXXXXXX.pt at these steps

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the run: `steps`, or `kimg` thousand images in whole batches."""
        if self.kimg > 0:
            return max(1, math.ceil(self.kimg * 1000 / self.batch_size))
        return self.steps


@dataclass(frozen=True)
class SampleConfig:
    """ddpm/ddim for the ddpm formulation; heun (EDM Algs. 1–2) for edm.

    heun: `steps` Karras noise levels from `sigma_max` to `sigma_min` (ρ = `rho`), stochastic
    when `s_churn` > 0 on [`s_min`, `s_max`]; `guidance` w mixes in a guide (EDM2 Sec. 5):
    `guide: self` is classifier-free guidance, a checkpoint path or run id a smaller model.
    """

    sampler: SamplerName = "ddpm"
    steps: int = 250
    eta: float = 0.0
    num_images: int = 64
    batch_size: int = 64
    seed: int = 0
    use_ema: bool = True
    clip_denoised: bool = True
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0
    guidance: float = 1.0
    guide: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """FID/KID/IS during training, at the steps in `at` and every `every` steps (0 = never).

    `num_images` are generated with the recipe's sampler (`sampler`/`steps` override it) and
    scored against `reference` (a statistics .npz, an image folder or .npz) or, when null, the
    training data, whose statistics are computed once and cached. `features: random_conv` is a
    seeded stand-in network for tests and toy data; its numbers are not comparable to papers.
    `features: classifier` is a small CNN trained on the synthetic shapes (synthetic data only;
    docs/synthetic.md).
    """

    every: int = 0
    at: tuple[int, ...] = ()
    metrics: tuple[EvalMetric, ...] = ("fid",)
    num_images: int = 50_000
    batch_size: int = 250
    sampler: SamplerName | None = None
    steps: int | None = None
    use_ema: bool = True
    reference: str | None = None
    mode: FidMode = "clean"
    features: FeatureNetwork = "inception"
    inception_weights: str | None = None


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment: str = "dmstab"
    run_name: str | None = None
    flush_every: int = 50
    offline: bool = False  # train on, spooled, when the server does not answer at start


@dataclass(frozen=True)
class GanConfig:
    """GAN training, read when `model.name` is `dcgan` or `biggan` (AAAI Table 1's baselines).

    DCGAN (Radford et al. 2016) at 32×32 with `loss: bce`; the BigGAN-style class-conditional
    GAN (Brock et al. 2019: shared class embedding of `shared_dim`, hierarchical latent,
    self-attention at `attention_resolution`, spectral norm) with `loss: hinge`. The generator
    and discriminator have their own Adam (`g_lr`, `d_lr`, `betas`); `d_steps` discriminator
    steps per generator step. `optim`, `diffusion`, `timesteps` are not used.
    """

    loss: GanLoss = "bce"
    z_dim: int = 100
    g_channels: int = 64
    d_channels: int = 64
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    d_steps: int = 1
    shared_dim: int = 128
    attention_resolution: int = 64


@dataclass(frozen=True)
class ConsistencyConfig:
    """`dmstab consistency` (AAAI Eq. 1, Table 1): N models, `num_images` images each (M).

    `members` lists the group, one string of space-separated overrides of this recipe per model
    ("" = the recipe as it is; "train.seed=1"; "model.channels=64"). The command trains each
    member (or reuses its finished run) and samples all from the same noise (`sample.seed`).
    `samplers` scores the group once per sampler (() = `sample.sampler` only).
    """

    members: tuple[str, ...] = ()
    num_images: int = 32
    samplers: tuple[SamplerName, ...] = ()


@dataclass(frozen=True)
class LandscapeConfig:
    """`dmstab landscape` (AAAI Figs 2–3) on one fixed batch with fixed noise and timesteps.

    2D: filter-normalised directions (Li et al. 2018, biasbn) on a `points`×`points` grid over
    [−`span`, `span`]². 1D: θ = α·θa + (1−α)·θb for `alphas` values of α on [`alpha_min`,
    `alpha_max`] between the run's checkpoints kept at `interpolate` = (step b, step a).
    `timesteps` are the DDPM t of the per-timestep curves and surfaces (the t-averaged loss is
    always computed). For GANs, `network` is the one whose weights move.
    """

    batch_size: int = 64
    timesteps: tuple[int, ...] = ()
    points: int = 51
    span: float = 1.0
    alphas: int = 21
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    interpolate: tuple[int, ...] = ()
    network: GanNetwork = "generator"
    seed: int = 0


@dataclass(frozen=True)
class HessianConfig:
    """`dmstab hessian` (AAAI Fig. 4): the loss Hessian on one fixed batch with fixed noise.

    Top-`top_k` eigenvalues by Lanczos with deflation (at most `max_iterations` steps each,
    until the Ritz residual is below `tolerance`·|λ|), trace by Hutchinson (`trace_samples`),
    density by stochastic Lanczos quadrature (`slq_runs` runs of `lanczos_steps`).
    Hessian-vector products by `method`; `auto` takes forward-over-reverse on CUDA (FACTS.md:
    ~3× faster on an H100) and double backward on the CPU (faster there, docs/performance.md).
    For GANs, `network`'s loss with the other network fixed.
    """

    batch_size: int = 64
    timesteps: tuple[int, ...] = ()
    top_k: int = 3
    max_iterations: int = 100
    tolerance: float = 1e-3
    trace_samples: int = 100
    slq_runs: int = 4
    lanczos_steps: int = 80
    method: HvpMethod = "auto"  # forward_over_reverse on CUDA, double_backward on CPU
    network: GanNetwork = "generator"
    seed: int = 0


@dataclass(frozen=True)
class PaperConfig:
    """Published numbers a recipe targets, for `dmstab report` (paper vs measured)."""

    source: str = ""
    table: str = ""
    metric: str = ""
    values: dict[str, float] = field(default_factory=dict)  # iteration (100k, 1M, end) -> value
    others: dict[str, float] = field(default_factory=dict)  # other published metrics, not compared
    notes: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str = "recipe"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    timesteps: TimestepsConfig = TimestepsConfig()
    optim: OptimConfig = OptimConfig()
    ema: EmaConfig = EmaConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    paper: PaperConfig = PaperConfig()
    gan: GanConfig = GanConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    landscape: LandscapeConfig = LandscapeConfig()
    hessian: HessianConfig = HessianConfig()


# ---------------------------------------------------------------- building from plain data

T = TypeVar("T")
_MAX_BASE_DEPTH = 16


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in canonical form."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise DmstabError(f"recipe key '{key}' must be a mapping of {_field_list(tp)}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise DmstabError(f"recipe key '{key}' is {value!r}; allowed: {_type_name(tp)}")
    if origin in (types.UnionType, typing.Union):
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except DmstabError:
                continue
        raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")
        return tuple(
            _convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise DmstabError(f"recipe key '{key}' must be a mapping")
        value_type = get_args(tp)[1]
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise DmstabError(f"recipe key '{key}' must be null")
    if tp is bool and isinstance(value, bool):
        return value
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int and is_number and float(value).is_integer():
        return int(value)
    if tp is float and is_number:
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise DmstabError(f"recipe key '{key}' is {value!r}; expected {_type_name(tp)}")


def _field_list(cls: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _unknown_key(cls: Any, key: str, prefix: str) -> DmstabError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    where = f"section '{prefix[:-1]}'" if prefix else "a recipe"
    return DmstabError(
        f"unknown recipe key '{prefix}{key}'; {hint}{where} allows: {', '.join(names)}"
    )


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), prefix)
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


# ---------------------------------------------------------------- validation across keys


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DmstabError(message)


def validate(recipe: Recipe) -> Recipe:
    """Range and cross-field checks that types alone cannot express."""
    _validate_data(recipe.data)
    _validate_model(recipe)
    _validate_diffusion(recipe)
    _validate_optim(recipe.optim)
    _validate_ema(recipe.ema)
    _validate_train(recipe.train)
    _validate_sample(recipe)
    _validate_eval(recipe)
    _validate_analyses(recipe)
    _require(recipe.tracking.flush_every >= 1, "tracking.flush_every must be at least 1")
    return recipe


def _validate_analyses(recipe: Recipe) -> None:
    """Ranges of the consistency, landscape and hessian sections."""
    c, land, h = recipe.consistency, recipe.landscape, recipe.hessian
    _require(c.num_images >= 1, "consistency.num_images must be at least 1")
    for sampler in c.samplers:
        _validate_sampler(recipe, sampler, recipe.sample.steps, "consistency.samplers")
    for key, size in (("landscape", land.batch_size), ("hessian", h.batch_size)):
        _require(size >= 1, f"{key}.batch_size must be at least 1")
    T = recipe.diffusion.steps
    for key, steps in (("landscape", land.timesteps), ("hessian", h.timesteps)):
        _require(
            all(0 <= t < T for t in steps),
            f"{key}.timesteps {list(steps)} must lie in [0, diffusion.steps={T})",
        )
    _require(land.points >= 2, f"landscape.points is {land.points}; must be at least 2")
    _require(land.span > 0, f"landscape.span is {land.span}; must be positive")
    _require(land.alphas >= 2, f"landscape.alphas is {land.alphas}; must be at least 2")
    _require(land.alpha_min < land.alpha_max, "landscape.alpha_min must be below alpha_max")
    _require(
        len(land.interpolate) in (0, 2),
        f"landscape.interpolate is {list(land.interpolate)}; give two steps (b, a) or none",
    )
    _require(h.top_k >= 1, "hessian.top_k must be at least 1")
    _require(h.max_iterations >= 1, "hessian.max_iterations must be at least 1")
    _require(h.tolerance > 0, "hessian.tolerance must be positive")
    _require(h.trace_samples >= 1, "hessian.trace_samples must be at least 1")
    _require(
        h.slq_runs >= 1 and h.lanczos_steps >= 2,
        "hessian needs slq_runs >= 1 and lanczos_steps >= 2",
    )


def _validate_data(d: DataConfig) -> None:
    _require(d.resolution >= 8, f"data.resolution is {d.resolution}; must be at least 8")
    _require(
        d.name == "synthetic" or d.root is not None,
        f"data.root is required for data.name={d.name!r} (a directory or file path)",
    )
    _require(d.synthetic_size >= 1, "data.synthetic_size must be at least 1")


def _validate_model(recipe: Recipe) -> None:
    d, m = recipe.data, recipe.model
    _require(0.0 <= m.dropout < 1.0, f"model.dropout is {m.dropout}; must be in [0, 1)")
    _require(
        0.0 <= m.label_dropout < 1.0, f"model.label_dropout is {m.label_dropout}; must be in [0, 1)"
    )
    if m.name == "uvit":
        _validate_uvit(recipe)
        return
    if m.name in GAN_MODELS:
        _validate_gan(recipe)
        return
    _require(m.channels >= 1, "model.channels must be positive")
    _require(len(m.channel_mult) >= 1, "model.channel_mult needs at least one level")
    _require(min(m.channel_mult) >= 1, "model.channel_mult entries must be positive")
    _require(m.num_res_blocks >= 1, "model.num_res_blocks must be at least 1")
    _require(
        d.resolution % 2 ** (len(m.channel_mult) - 1) == 0,
        f"data.resolution {d.resolution} must be divisible by 2^(levels-1) = "
        f"{2 ** (len(m.channel_mult) - 1)} for model.channel_mult {list(m.channel_mult)}",
    )
    if m.name == "adm_unet":
        _require(
            m.channels % 32 == 0 and all(m.channels * k % 32 == 0 for k in m.channel_mult),
            f"model.channels {m.channels} x channel_mult must be multiples of 32 (GroupNorm(32))",
        )
        _require(
            recipe.diffusion.formulation == "ddpm",
            "model.name adm_unet trains with diffusion.formulation ddpm; EDM uses edm2_unet",
        )
        _require(m.label_dropout == 0.0, "model.label_dropout needs model.name edm2_unet")
    else:
        _require(
            recipe.diffusion.formulation == "edm",
            "model.name edm2_unet trains with diffusion.formulation edm",
        )
        _require(
            m.label_dropout == 0.0 or m.class_cond,
            "model.label_dropout > 0 needs model.class_cond: true",
        )
        from dmstab.models.edm2_unet import edm2_config

        edm2_config(recipe, num_classes=1)  # the network's own layout and switch checks


def _validate_gan(recipe: Recipe) -> None:
    """A GAN trains with its own two Adams, no diffusion objective and no DDP (docs/gans.md)."""
    g, tr, resolution = recipe.gan, recipe.train, recipe.data.resolution
    name = recipe.model.name
    if name == "dcgan":
        _require(
            not recipe.model.class_cond,
            "DCGAN is unconditional: set model.class_cond false "
            "(model.name biggan is the class-conditional GAN)",
        )
        _require(
            resolution >= 16 and resolution & (resolution - 1) == 0,
            f"DCGAN needs data.resolution a power of two >= 16; got {resolution}",
        )
    else:
        _require(
            resolution in (32, 64, 128),
            f"biggan supports data.resolution 32, 64 or 128; got {resolution}",
        )
    _require(recipe.data.name != "latents", f"model.name {name} trains on images, not latents")
    _require(
        min(g.z_dim, g.g_channels, g.d_channels, g.shared_dim, g.d_steps) >= 1,
        "gan.z_dim, g_channels, d_channels, shared_dim and d_steps must be at least 1",
    )
    _require(g.g_lr > 0 and g.d_lr > 0, "gan.g_lr and gan.d_lr must be positive")
    _require(all(0 <= b < 1 for b in g.betas), f"gan.betas {list(g.betas)} must lie in [0, 1)")
    unsupported = {
        "train.nonfinite: skip": tr.nonfinite == "skip",
        "train.spike_factor": tr.spike_factor != 0,
        "train.magnitudes_every": tr.magnitudes_every != 0,
        "train.micro_batch_size": tr.micro_batch_size not in (0, tr.batch_size),
        "ema.power_sigma_rels": bool(recipe.ema.power_sigma_rels),
    }
    for key, used in unsupported.items():
        _require(not used, f"{key} is for diffusion models; GAN training does not support it")


def _validate_uvit(recipe: Recipe) -> None:
    """U-ViT (Bao et al. 2023) is a ddpm backbone here; its own checks name the bad key."""
    m = recipe.model
    _require(
        recipe.diffusion.formulation == "ddpm",
        "model.name uvit trains with diffusion.formulation ddpm; EDM uses edm2_unet",
    )
    _require(m.label_dropout == 0.0, "model.label_dropout needs model.name edm2_unet")
    _require(
        recipe.train.magnitudes_every == 0,
        "train.magnitudes_every works for adm_unet and edm2_unet, not uvit (set it to 0)",
    )
    from dmstab.models.uvit import check_uvit_config

    check_uvit_config(
        recipe.data.resolution, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio
    )


def _validate_diffusion(recipe: Recipe) -> None:
    diff = recipe.diffusion
    if diff.formulation == "edm":
        _require(diff.p_std > 0, f"diffusion.p_std is {diff.p_std}; must be positive")
        _require(diff.sigma_data > 0, f"diffusion.sigma_data is {diff.sigma_data}; must be > 0")
        _require_ddpm_methods_off(recipe)
        return
    _require(diff.steps >= 2, "diffusion.steps (T) must be at least 2")
    _validate_fdm(diff)
    _require(
        diff.min_snr_gamma > 0, f"diffusion.min_snr_gamma is {diff.min_snr_gamma}; must be > 0"
    )
    # k = 0 would make the ε weight 1/SNR^γ explode where SNR → 0 (ᾱ_T ≈ 1e-9 for cosine).
    _require(diff.p2_k > 0, f"diffusion.p2_k is {diff.p2_k}; must be > 0")
    _require(diff.p2_gamma >= 0, f"diffusion.p2_gamma is {diff.p2_gamma}; must be >= 0")
    ts, T = recipe.timesteps, diff.steps
    _require(ts.history >= 1, f"timesteps.history is {ts.history}; must be at least 1")
    _require(
        0.0 <= ts.uniform_prob < 1.0,
        f"timesteps.uniform_prob is {ts.uniform_prob}; must be in [0, 1)",
    )
    _require(
        ts.sampler not in ("clts", "shifted_gaussian") or 0.0 <= ts.mu < T,
        f"timesteps.mu is {ts.mu}; must be in [0, diffusion.steps) = [0, {T})",
    )
    _require(ts.sigma > 0, f"timesteps.sigma is {ts.sigma}; must be positive")
    _require(ts.target_iteration >= 1, "timesteps.target_iteration must be at least 1")
    _require(ts.histogram_every >= 0, "timesteps.histogram_every must be >= 0 (0 = never)")


def _validate_fdm(diff: DiffusionConfig) -> None:
    """FDM's kernel scale e^{−mB}(1 + mB) must fall from 1 as B grows: m > 0, β ≥ 0."""
    _require(
        diff.fdm_multiplier > 0,
        f"diffusion.fdm_multiplier is {diff.fdm_multiplier}; must be positive",
    )
    _require(
        diff.fdm_beta_min >= 0 and diff.fdm_beta_d >= 0 and diff.fdm_beta_min + diff.fdm_beta_d > 0,
        f"diffusion.fdm_beta_min {diff.fdm_beta_min} and fdm_beta_d {diff.fdm_beta_d} must be "
        ">= 0 and not both 0",
    )
    _require(
        diff.fdm_warmup_iterations >= 0,
        f"diffusion.fdm_warmup_iterations is {diff.fdm_warmup_iterations}; must be >= 0 "
        "(0 = no loss-weight warm-up)",
    )


def _require_ddpm_methods_off(recipe: Recipe) -> None:
    """EDM has its own σ distribution, loss weight and preconditioning: no ddpm options."""
    sampler, diff = recipe.timesteps.sampler, recipe.diffusion
    _require(
        sampler == "uniform",
        f"timesteps.sampler {sampler} is a ddpm curriculum or sampler; EDM draws σ from "
        "diffusion.p_mean/p_std (use uniform)",
    )
    _require(
        diff.weighting == "none",
        f"diffusion.weighting {diff.weighting} weights the ddpm target MSE; EDM weights its loss "
        "by λ(σ) and the learned uncertainty (use none)",
    )
    _require(
        diff.target == "eps",
        f"diffusion.target {diff.target} is a ddpm option; the EDM denoiser is preconditioned "
        "(EDM Table 1), leave diffusion.target at eps",
    )


def _validate_optim(o: OptimConfig) -> None:
    _require(o.lr > 0, f"optim.lr is {o.lr}; must be positive")
    _require(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas {list(o.betas)} must be in [0,1)")
    _require(o.weight_decay >= 0, "optim.weight_decay must be >= 0")
    _require(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip must be positive or null")
    _require(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(o.ref_kimg >= 0 and o.rampup_kimg >= 0, "optim.ref_kimg/rampup_kimg must be >= 0")
    _require(
        o.schedule == "inverse_sqrt" or (o.ref_kimg == 0 and o.rampup_kimg == 0),
        "optim.ref_kimg/rampup_kimg belong to optim.schedule inverse_sqrt",
    )


def _validate_ema(e: EmaConfig) -> None:
    _require(0.0 <= e.rate < 1.0, f"ema.rate is {e.rate}; must be in [0, 1)")
    if e.power_sigma_rels:
        from dmstab.train.power_ema import SIGMA_REL_MAX

        _require(
            all(0.0 < s <= SIGMA_REL_MAX for s in e.power_sigma_rels),
            f"ema.power_sigma_rels {list(e.power_sigma_rels)} must lie in (0, {SIGMA_REL_MAX:.6f}]",
        )
    _require(e.snapshot_every >= 0, "ema.snapshot_every (images) must be >= 0 (0 = at the end)")


def _validate_train(tr: TrainConfig) -> None:
    _require(tr.steps >= 1, "train.steps must be at least 1")
    _require(tr.kimg >= 0, f"train.kimg is {tr.kimg}; must be >= 0 (0 = use train.steps)")
    _require(
        tr.kimg == 0 or tr.steps == TrainConfig.steps,
        "set train.steps or train.kimg, not both",
    )
    _require(tr.batch_size >= 1, "train.batch_size must be at least 1")
    _require(tr.log_every >= 1, "train.log_every must be at least 1")
    _require(tr.checkpoint_every >= 1, "train.checkpoint_every must be at least 1")
    _require(tr.sample_every >= 0, "train.sample_every must be >= 0 (0 = only at the end)")
    _require(tr.magnitudes_every >= 0, "train.magnitudes_every must be >= 0 (0 = never)")
    _require(
        tr.micro_batch_size >= 0 and tr.batch_size % max(tr.micro_batch_size, 1) == 0,
        f"train.micro_batch_size is {tr.micro_batch_size}; must be 0 (no accumulation) or "
        f"divide train.batch_size={tr.batch_size}",
    )
    _require(
        tr.spike_factor == 0 or tr.spike_factor > 1,
        f"train.spike_factor is {tr.spike_factor}; must be 0 (off) or > 1",
    )
    _require(tr.spike_window >= 1, f"train.spike_window is {tr.spike_window}; must be >= 1")
    _require(tr.max_skipped >= 1, f"train.max_skipped is {tr.max_skipped}; must be >= 1")
    _require(
        all(1 <= step <= tr.total_steps for step in tr.keep_checkpoints),
        f"train.keep_checkpoints {list(tr.keep_checkpoints)} must be steps in "
        f"[1, {tr.total_steps}]",
    )


def _validate_sampler(recipe: Recipe, sampler: str, steps: int, key: str) -> None:
    """`sampler` with `steps` suits the recipe's formulation (`key`: where they were set)."""
    if recipe.diffusion.formulation == "edm":
        _require(sampler == "heun", f"{key}.sampler is {sampler!r}; the edm formulation uses heun")
        _require(steps >= 2, f"{key}.steps is {steps}; heun needs at least 2")
        return
    T = recipe.diffusion.steps
    _require(sampler != "heun", f"{key}.sampler heun needs diffusion.formulation edm")
    _require(1 <= steps <= T, f"{key}.steps is {steps}; must be in [1, diffusion.steps={T}]")


def _validate_sample(recipe: Recipe) -> None:
    s = recipe.sample
    _validate_sampler(recipe, s.sampler, s.steps, "sample")
    _require(s.eta >= 0, "sample.eta must be >= 0")
    _require(s.num_images >= 1 and s.batch_size >= 1, "sample.num_images/batch_size must be >= 1")
    _require(
        0 < s.sigma_min < s.sigma_max and s.rho > 0,
        "sample.sigma_min, sigma_max and rho must satisfy 0 < sigma_min < sigma_max, rho > 0",
    )
    _require(
        s.s_churn >= 0 and s.s_noise >= 0 and s.s_min <= s.s_max,
        "sample.s_churn and s_noise must be >= 0 and s_min <= s_max",
    )
    _require(math.isfinite(s.guidance), f"sample.guidance is {s.guidance}; must be finite")
    _require(
        s.guidance == 1.0 or s.guide is not None,
        "sample.guidance != 1 needs sample.guide: self (classifier-free) or a guide checkpoint",
    )
    _require(
        s.guide != "self" or recipe.model.label_dropout > 0,
        "sample.guide: self needs a model trained with model.label_dropout > 0",
    )


def _validate_eval(recipe: Recipe) -> None:
    ev = recipe.eval
    _require(ev.every >= 0, "eval.every must be >= 0 (0 = only the steps in eval.at)")
    _require(all(step >= 1 for step in ev.at), f"eval.at {list(ev.at)} must be steps >= 1")
    _require(len(ev.metrics) >= 1, "eval.metrics needs at least one of fid, kid, is")
    _require(ev.num_images >= 2, "eval.num_images must be at least 2 (a covariance needs 2)")
    _require(ev.batch_size >= 1, "eval.batch_size must be at least 1")
    _require(ev.steps is None or ev.steps >= 1, "eval.steps must be >= 1 or null")
    if ev.every or ev.at:
        _require(
            recipe.data.name != "latents" or ev.reference is not None,
            "eval on latents needs eval.reference (statistics or images of the decoded data)",
        )
        _require(
            ev.features != "classifier" or recipe.data.name == "synthetic",
            f"eval.features: classifier knows the synthetic shapes only, not data.name "
            f"{recipe.data.name}; use inception",
        )
        steps = ev.steps if ev.steps is not None else recipe.sample.steps
        _validate_sampler(recipe, ev.sampler or recipe.sample.sampler, steps, "eval")


# ---------------------------------------------------------------- YAML files and overrides


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` as a string, recipes mean a number."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise DmstabError(f"recipe {path} is a directory, not a recipe file")
    if not path.is_file():
        raise DmstabError(f"recipe file not found: {path}")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DmstabError(f"recipe {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DmstabError(f"recipe {path}{where} is not valid YAML: {problem}") from None
    if data is None:
        raise DmstabError(f"recipe {path} is empty; it needs at least one section or `base:`")
    if not isinstance(data, dict):
        raise DmstabError(f"recipe {path} must be a YAML mapping of sections")
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_tree(path: Path, depth: int = 0) -> dict[str, Any]:
    """Raw recipe mapping with `base:` files merged underneath (paths relative to the file)."""
    if depth > _MAX_BASE_DEPTH:
        raise DmstabError(f"recipe {path}: `base:` chain deeper than {_MAX_BASE_DEPTH} (a cycle?)")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise DmstabError(f"recipe {path}: `base:` must be a file path, got {base!r}")
    return _merge(load_tree((path.parent / base).resolve(), depth + 1), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], YAML-typed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise DmstabError(f"override {text!r} must look like section.key=value")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise DmstabError(f"override {text!r}: value {raw!r} is not valid YAML") from None
    return key.split("."), value


def set_key(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    """`tree` with the key at `path` (["a", "b"] for a.b) set to `value`, as an override sets it."""
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return _merge(dict(tree), nested)


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    result = dict(tree)
    for text in overrides:
        result = set_key(result, *parse_override(text))
    return result


def from_mapping(tree: Mapping[str, Any]) -> Recipe:
    return validate(_build(Recipe, tree))


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file, merge its `base:` chain, apply overrides, validate."""
    path = Path(path)
    tree = load_tree(path)
    if "sweep" in tree:
        raise DmstabError(
            f"recipe {path} is a sweep (it has a `sweep:` section): run it with "
            f"`dmstab train {path}`; this command takes a plain recipe or a run id"
        )
    tree.setdefault("name", path.stem)
    return from_mapping(apply_overrides(tree, overrides))


# ---------------------------------------------------------------- views of a resolved recipe


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain YAML/JSON-ready mapping (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(recipe).items()}


class _RecipeDumper(yaml.SafeDumper):
    """Short lists of numbers on one line (`betas: [0.8, 0.999]`), as recipes are written."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, list | dict) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def to_yaml(recipe: Recipe) -> str:
    return yaml.dump(to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False)


def flatten(recipe: Recipe) -> dict[str, str]:
    """`section.key` -> string value, the form MLflow params take."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)

    walk("", to_dict(recipe))
    return flat


# How a run executes, not what it computes: a run may resume with other values of these.
EXECUTION_KEYS = (
    "train.device",
    "train.micro_batch_size",
    "train.keep_checkpoints",
    "tracking.offline",
)
ANALYSIS_SECTIONS = ("consistency", "landscape", "hessian")  # read by analyses, not training


def result_dict(recipe: Recipe) -> dict[str, Any]:
    """`to_dict(recipe)` without what does not change the trained weights: the name, the
    paper block, the run name, the execution keys, the analysis sections and (for diffusion
    models) the `gan` section. Equal for runs that train the same model, whatever the recipe
    file is called (so the analysis recipes reuse the run of the recipe they build on)."""
    data = to_dict(recipe)
    for section in ("name", "paper"):
        data.pop(section)
    data["tracking"].pop("run_name")
    for key in EXECUTION_KEYS:
        section, name = key.split(".")
        data[section].pop(name)
    for section in ANALYSIS_SECTIONS:
        data.pop(section)
    if recipe.model.name not in GAN_MODELS:
        data.pop("gan")
    return data


def fingerprint(recipe: Recipe) -> str:
    """Stable hash of everything that determines a training run's result."""
    text = json.dumps(result_dict(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(a: Recipe, b: Recipe) -> list[str]:
    """Keys whose values differ, as `key: a -> b`."""
    fa, fb = flatten(a), flatten(b)
    return [
        f"{k}: {fa.get(k)} -> {fb.get(k)}"
        for k in sorted(fa.keys() | fb.keys())
        if fa.get(k) != fb.get(k)
    ]
