"""The recipe schema: one frozen dataclass per section, with the values each key allows.

A recipe is a tree of these dataclasses (`Recipe` at the root). Parsing and range checks live
beside this module (`dmstab.config.parse`, `dmstab.config.validation`); no network code is
imported here: each architecture checks its own keys (`register_model_check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

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
    Hessian-vector products by `method`; `auto` takes forward-over-reverse on CUDA (about 3×
    faster on an H100) and double backward on the CPU (faster there, docs/performance.md).
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


# The largest σrel a power-function EMA can have: γ = 0, the uniform average of all weights,
# σrel = (γ+1)^½ (γ+2)^−1 (γ+3)^−½ = 1/√12 (EDM2 Eq. 3; dmstab.analysis.ema_reconstruct).
SIGMA_REL_MAX = 1 / math.sqrt(12)
