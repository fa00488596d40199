"""The recipe schema: one frozen dataclass per section, with the values each key allows.

A recipe is a tree of these dataclasses (`Recipe` at the root). Parsing and range checks live
beside this module (`dmstab.config.parse`, `dmstab.config.validation`). No network or analysis
code is imported here: each registers its own section's dataclass and check (`MODELS`,
`ANALYSES`, dmstab.config.registry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, get_args

from dmstab.config.registry import Registry

DatasetName = Literal["synthetic", "cifar10", "folder", "npz", "latents"]
Formulation = Literal["ddpm", "edm"]
ScheduleName = Literal["linear", "cosine", "scaled_linear"]
LossWeighting = Literal["none", "min_snr", "p2", "fdm"]
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
class AnalysisSection:
    """The base of an analysis's own top-level recipe section; `section` is its key."""

    section: ClassVar[str]


SectionT = TypeVar("SectionT", bound=AnalysisSection)


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

    @property
    def channels(self) -> int:
        """Channels of one training image: 4 for SD-VAE latents, 3 for RGB."""
        return 4 if self.name == "latents" else 3


@dataclass(frozen=True)
class ModelConfig:
    """The network. `model.name` selects the registered dataclass that adds the network's own
    keys (`MODELS`; the built-in ones are in dmstab.models); these two every network has.

    A network's dataclass says which `diffusion.formulation`s it trains with
    (`formulations`) or that it is a GAN (`adversarial`: trained against a discriminator, no
    diffusion objective).
    """

    formulations: ClassVar[tuple[str, ...]] = ("ddpm",)
    adversarial: ClassVar[bool] = False

    name: str = "adm_unet"
    class_cond: bool = False

    def learns_variance(self) -> bool:
        """Whether the network also outputs the reverse-process variance (improved DDPM)."""
        return False


@dataclass(frozen=True)
class DiffusionConfig:
    """The formulation: discrete DDPM or continuous EDM.

    ddpm: forward process (AAAI Eq. 3) with `schedule` over `steps` and prediction `target`
    (Eq. 4: eps, Eq. 5: x0, v of Salimans & Ho 2022, or previous_x: x_{t−1}'s posterior mean,
    Ho et al. 2020 Eq. 7); `weighting` scales the target MSE per
    timestep: Min-SNR-γ (`min_snr_gamma`) or P2 1/(`p2_k` + SNR)^`p2_gamma` on the ε-MSE,
    converted to the target (dmstab.diffusion.weighting). edm: preconditioning with
    `sigma_data` (EDM Table 1) and training noise levels ln σ ~ N(`p_mean`, `p_std`²)
    (EDM2: (−0.4, 1.0) latents, (−0.8, 1.6) pixels).
    """

    formulation: Formulation = "ddpm"
    schedule: ScheduleName = "cosine"
    steps: int = 4000
    target: str = "eps"  # a registered prediction target (TARGETS)
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
    label_dropout: float = 0.0  # edm: drop labels at this rate for classifier-free guidance


@dataclass(frozen=True)
class TimestepsConfig:
    """Training timestep distribution (dmstab.diffusion.timesteps).

    uniform; clts (AAAI Eqs. 6-7); shifted_gaussian, the paper's first attempt: N(t; μ_i, σ)
    with μ_i moving linearly from T−1 to `mu` by `target_iteration`; importance, improved-
    diffusion's loss-second-moment sampler over the last `history` losses per timestep, mixed
    with `uniform_prob` of uniform.
    """

    sampler: str = "uniform"  # a registered timestep sampler (TIMESTEP_SAMPLERS)
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

    sampler: str = "ddpm"  # a registered sampler (SAMPLERS)
    steps: int = 250
    # ddpm/ddim: improved-diffusion's multi-section respacing, steps kept per section of the T
    # (() = one section spaced by the sampler's own rule); they must keep `steps` in all.
    sections: tuple[int, ...] = ()
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
    sampler: str | None = None
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
    # The sections of registered analyses the recipe sets (`hessian:` …), by section name.
    analyses: dict[str, Any] = field(default_factory=dict)

    def analysis(self, config: type[SectionT]) -> SectionT:
        """The recipe's `config.section:` section, or `config`'s defaults when it has none."""
        name = config.section
        section = self.analyses.get(name)
        if section is None:
            return config()
        if not isinstance(section, config):
            raise TypeError(f"section {name} is a {type(section).__name__}, not {config.__name__}")
        return section


# The largest σrel a power-function EMA can have: γ = 0, the uniform average of all weights,
# σrel = (γ+1)^½ (γ+2)^−1 (γ+3)^−½ = 1/√12 (EDM2 Eq. 3; dmstab.analysis.ema_reconstruct).
SIGMA_REL_MAX = 1 / math.sqrt(12)


# What a recipe can name (dmstab.config.registry): networks by `model.name`, the ddpm
# prediction targets, training timestep samplers, samplers, and the analyses whose sections a
# recipe may set. Their implementations register themselves.
MODELS = Registry("model.name", base=ModelConfig)
TARGETS = Registry("diffusion.target")
TIMESTEP_SAMPLERS = Registry("timesteps.sampler")
SAMPLERS = Registry("sample.sampler")
ANALYSES = Registry("analysis section", base=AnalysisSection)
