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
    """`synthetic`, `cifar10`, `folder` (class subfolders or flat), `npz` (uint8 NHWC
    `arr_0`/`images`, labels `arr_1`/`labels`)"""
    root: str | None = None
    """data directory or file; required except for `synthetic`"""
    resolution: int = 32
    """image size; folder/npz images are center-cropped and resized as guided-diffusion does"""
    download: bool = False
    """`cifar10` only: download into `root` when absent"""
    hflip: bool = False
    """random horizontal flips"""
    synthetic_size: int = 10_000
    """images in the synthetic set (docs/synthetic.md)"""
    synthetic_seed: int = 0
    """seed the synthetic set is drawn with"""

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
    """`adm_unet` (improved/guided diffusion, ddpm formulation), `edm2_unet` (EDM2, edm
    formulation), `uvit` (U-ViT, ddpm formulation), `dcgan` or `biggan` (GAN baselines), or a
    network a plugin registers (docs/recipes.md#components-and-plugins)"""
    class_cond: bool = False
    """class-conditional (labels from the dataset)"""

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
    """`ddpm` (discrete, AAAI paper) or `edm` (continuous σ, EDM2)"""
    schedule: ScheduleName = "cosine"
    """ddpm: `cosine` (Nichol & Dhariwal) or `linear` β schedule"""
    steps: int = 4000
    """ddpm: T"""
    target: str = "eps"
    """ddpm: `eps` (AAAI Eq. 4), `x0` (Eq. 5), `v` (Salimans & Ho 2022), `previous_x` (x_{t−1}'s
    posterior mean, improved-diffusion), or a registered target"""
    weighting: LossWeighting = "none"
    """ddpm: weight of the target MSE per timestep: `none`, `min_snr`, `p2` or `fdm`
    (kernel scale + loss-weight warm-up, docs/fdm.md); see
    docs/recipes.md#targets-loss-weightings-and-timestep-samplers"""
    min_snr_gamma: float = 5.0
    """`min_snr`: γ, > 0"""
    p2_k: float = 1.0
    """`p2`: k of 1/(k + SNR)^γ, > 0"""
    p2_gamma: float = 1.0
    """`p2`: γ of 1/(k + SNR)^γ, ≥ 0"""
    # weighting fdm: FDM (Wu et al. 2023) = its kernel scale e^{−mB}(1 + mB) on the model input
    # plus its loss-weight warm-up (dmstab.diffusion.fdm); defaults: official CIFAR-10 VP-FDM.
    fdm_multiplier: float = 2.0
    """`fdm`: m of the kernel scale e^{−mB}(1 + mB) (docs/fdm.md)"""
    fdm_beta_min: float = 0.1
    """`fdm`: β_min of B(u) = β_min·u + ½β_d·u²"""
    fdm_beta_d: float = 19.9
    """`fdm`: β_d of B(u) = β_min·u + ½β_d·u²"""
    fdm_warmup_iterations: int = 400
    """`fdm`: W, the loss-weight warm-up's length in iterations; 0 = no warm-up"""
    p_mean: float = -0.8
    """edm: the mean of ln σ ~ N(p_mean, p_std²) (EDM2: −0.4 for 512 latents)"""
    p_std: float = 1.6
    """edm: the standard deviation of ln σ (EDM2: 1.0 for 512 latents)"""
    sigma_data: float = 0.5
    """edm: σ_data of the preconditioning"""
    label_dropout: float = 0.0
    """edm: fraction of training labels replaced by the zero label, in [0, 1), for classifier-free
    guidance (`sample.guide: self` needs it > 0); needs `model.class_cond: true`"""


@dataclass(frozen=True)
class TimestepsConfig:
    """Training timestep distribution (dmstab.diffusion.timesteps).

    uniform; clts (AAAI Eqs. 6-7); shifted_gaussian, the paper's first attempt: N(t; μ_i, σ)
    with μ_i moving linearly from T−1 to `mu` by `target_iteration`; importance, improved-
    diffusion's loss-second-moment sampler over the last `history` losses per timestep, mixed
    with `uniform_prob` of uniform.
    """

    sampler: str = "uniform"
    """`uniform` U(t) = 1/T, or `clts`: P(t) = (1−γ)U(t) + γN(t; μ, σ), γ = min(it/target, 1) (Eqs.
    6–7); losses are not reweighted. Also `shifted_gaussian` and `importance`
    (docs/recipes.md#targets-loss-weightings-and-timestep-samplers), or a registered one"""
    mu: float = 1200.0
    """CLTS / shifted-Gaussian mean μ, in [0, T) (paper: 0.3·T)"""
    sigma: float = 4000.0
    """CLTS / shifted-Gaussian σ (paper: T)"""
    target_iteration: int = 50_000
    """iteration at which γ reaches 1 (CLTS) or the mean reaches μ (shifted Gaussian)"""
    history: int = 10
    """`importance`: losses kept per timestep, ≥ 1"""
    uniform_prob: float = 0.001
    """`importance`: share of uniform sampling u, in [0, 1)"""
    histogram_every: int = 1000
    """log a histogram of sampled t every N steps (0: never)"""


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and its learning-rate schedule: constant with an optional linear warm-up,
    or EDM2's inverse square root (Sec. 2.3)."""

    name: Literal["adam", "adamw"] = "adam"
    """`adam` or `adamw`"""
    lr: float = 1e-4
    """learning rate"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (the AAAI paper uses `[0.8, 0.999]`)"""
    weight_decay: float = 0.0
    """weight decay"""
    grad_clip: float | None = None
    """clip the global gradient norm"""
    warmup_steps: int = 0
    """`constant` schedule: linear learning-rate warm-up (steps)"""
    schedule: LrSchedule = "constant"
    """`constant`, or `inverse_sqrt`: lr/√max(t/t_ref, 1)·min(t/t_rampup, 1), t in images (EDM2,
    config E)"""
    ref_kimg: float = 0.0
    """`inverse_sqrt`: t_ref in thousands of images (EDM2 Sec. 2.3; 0: factor off)"""
    rampup_kimg: float = 0.0
    """`inverse_sqrt`: t_rampup, the linear warm-up in thousands of images (0: factor off)"""


@dataclass(frozen=True)
class EmaConfig:
    """Classic EMA (`rate`), plus optional power-function EMAs for post-hoc reconstruction.

    `power_sigma_rels` lists the relative widths σrel of the power-function EMAs tracked every
    step (EDM2 Sec. 3; the paper stores 0.05 and 0.10); their snapshots are written every
    `snapshot_every` training images and at the end, for `dmstab ema-reconstruct`.
    """

    rate: float = 0.9999
    """EMA decay"""
    warmup: bool = False
    """use min(rate, (1+n)/(10+n)) after n updates"""
    power_sigma_rels: tuple[float, ...] = ()
    """power-function EMAs to track (EDM2: `[0.05, 0.1]`), for `ema-reconstruct`"""
    snapshot_every: int = 0
    """training images between power-EMA snapshots (0: only at the end)"""
    snapshot_dtype: Literal["float32", "float16"] = "float32"
    """`float32` or `float16` snapshot files"""


@dataclass(frozen=True)
class TrainConfig:
    """`kimg`, when positive, sets the length in thousands of images as EDM2 counts it.

    `batch_size` is the global batch; `micro_batch_size` rows per forward pass and process
    (0 = batch_size / processes, no gradient accumulation). `nonfinite` and the `spike_*` keys
    decide what a NaN/inf or spiking step does (docs/distributed.md, dmstab.train.loss_guard).
    """

    steps: int = 500_000
    """optimiser steps"""
    kimg: float = 0.0
    """when > 0: length in thousands of images instead of `steps` (not both)"""
    batch_size: int = 128
    """images per step (the global batch under `torchrun`)"""
    seed: int = 0
    """seeds initialisation and every step's draws"""
    device: DeviceName = "auto"
    """`auto`, `cpu` or `cuda`"""
    precision: Precision = "bf16"
    """`bf16` autocast or `fp32`"""
    compile: bool | Literal["auto"] = "auto"
    """`torch.compile` the training forward (`auto`: on CUDA)"""
    fused: bool | Literal["auto"] = "auto"
    """fused Adam kernel, the same formula rounded otherwise (`auto`: on CUDA; off keeps CPU runs
    bit for bit as before)"""
    log_every: int = 10
    """metric window (steps)"""
    checkpoint_every: int = 5000
    """checkpoint interval (steps)"""
    sample_every: int = 0
    """also sample during training (0: only at the end)"""
    magnitudes_every: int = 0
    """log weight/activation magnitudes per block every N steps (0: never)"""
    out_dir: str = "runs"
    """run directories (`OUT_DIR/RUN_ID/checkpoint.pt`)"""
    micro_batch_size: int = 0
    """rows per forward pass and process; 0: `batch_size` / processes. Smaller values accumulate
    gradients (docs/distributed.md)"""
    nonfinite: NonfinitePolicy = "stop"
    """a NaN/inf loss: `stop` the run (exit 1, last checkpoint intact) or `skip` the update"""
    spike_factor: float = 0.0
    """a loss above this × the mean of the last `spike_window` accepted losses is a spike (0: off;
    else > 1)"""
    spike_window: int = 100
    """accepted losses the spike baseline averages"""
    spike_policy: SpikePolicy = "skip"
    """a spike: `skip` the update or `stop` the run"""
    max_skipped: int = 10
    """this many skipped steps in a row stop the run"""
    keep_checkpoints: tuple[int, ...] = ()
    """steps whose checkpoint is also kept as `RUN_DIR/checkpoints/step_XXXXXXXX.pt` (the two ends
    of a 1D interpolation, AAAI Fig. 3)"""

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

    sampler: str = "ddpm"
    """ddpm formulation: `ddpm` (respaced ancestral) or `ddim`; edm formulation: `heun`; or a
    registered sampler"""
    steps: int = 250
    """sampling steps: 2 … `diffusion.steps` for ddpm/ddim (ddim: a count some integer stride
    gives), at least 2 for heun"""
    sections: tuple[int, ...] = ()
    """ddpm/ddim: improved-diffusion's multi-section respacing, steps kept per section (`[10, 15,
    20]`, or the override `sample.sections=10,15,20`): the T steps split into that many
    consecutive sections (the first T mod n one step longer), each spaced evenly like `ddpm`;
    each count 1 … its section's size, and `steps` must equal their sum. `[]`: the sampler's own
    spacing"""
    eta: float = 0.0
    """DDIM η (0 for every sampler but ddim)"""
    num_images: int = 64
    """images to generate"""
    batch_size: int = 64
    """images generated at once"""
    seed: int = 0
    """fixes every image's initial and per-step noise"""
    use_ema: bool = True
    """EMA or raw weights"""
    clip_denoised: bool = True
    """clip predicted x0 to [−1, 1]; must be `false` for a ddpm model of latents"""
    sigma_min: float = 0.002
    """heun: the smallest Karras noise level (EDM Eq. 5)"""
    sigma_max: float = 80.0
    """heun: the largest Karras noise level (EDM Eq. 5)"""
    rho: float = 7.0
    """heun: ρ, how the Karras noise levels crowd toward `sigma_min` (EDM Eq. 5)"""
    s_churn: float = 0.0
    """heun: S_churn, the noise added back per step (EDM Alg. 2; 0: deterministic)"""
    s_min: float = 0.0
    """heun: S_tmin, the lowest σ that gets churn (EDM Alg. 2)"""
    s_max: float = float("inf")
    """heun: S_tmax, the highest σ that gets churn (EDM Alg. 2)"""
    s_noise: float = 1.0
    """heun: S_noise, the scale of the churn noise (EDM Alg. 2)"""
    guidance: float = 1.0
    """heun: guidance weight w (1 = none)"""
    guide: str | None = None
    """`self` (classifier-free; needs `diffusion.label_dropout` > 0) or a guide checkpoint or
    run id"""


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
    """also every N steps (0: never); with `at` or `every` set, also at the last step"""
    at: tuple[int, ...] = ()
    """steps to evaluate at"""
    metrics: tuple[EvalMetric, ...] = ("fid",)
    """any of `fid`, `kid`, `is`"""
    num_images: int = 50_000
    """images generated per evaluation"""
    batch_size: int = 250
    """images generated at once"""
    sampler: str | None = None
    """the sampler to evaluate with (null: `sample.sampler`)"""
    steps: int | None = None
    """its steps (null: `sample.steps`)"""
    use_ema: bool = True
    """EMA or raw weights"""
    reference: str | None = None
    """statistics `.npz`, images (`.npz`/folder); null: the training set (cached)"""
    mode: FidMode = "clean"
    """clean-fid mode: `clean`, `legacy_pytorch`, `legacy_tensorflow`"""
    features: FeatureNetwork = "inception"
    """`inception`; `random_conv` (seeded stand-in for tests; no IS); `classifier` (CNN trained on
    the synthetic shapes, native resolution; `data.name: synthetic` only; no IS; see
    docs/synthetic.md)"""
    inception_weights: str | None = None
    """weights file or folder (else `DMSTAB_INCEPTION_WEIGHTS`, `~/.cache/dmstab/`)"""


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run is logged: the MLflow store, the experiment and the run's name
    (docs/tracking.md)."""

    uri: str | None = None
    """MLflow tracking URI (else `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`)"""
    experiment: str = "dmstab"
    """experiment name"""
    run_name: str | None = None
    """run name (MLflow picks one when null)"""
    flush_every: int = 50
    """send buffered metrics every N steps"""
    offline: bool = False
    """start even when the tracking server does not answer: the run is spooled locally and uploaded
    when the server returns or by `dmstab sync` (docs/tracking.md)"""


@dataclass(frozen=True)
class PaperConfig:
    """Published numbers a recipe targets, for `dmstab report` (paper vs measured)."""

    source: str = ""
    """the paper"""
    table: str = ""
    """the table or figure and its row"""
    metric: str = ""
    """the metric `values` holds (`fid`, ...)"""
    values: dict[str, float] = field(default_factory=dict)
    """published values by training iteration (`{100k: 4.24, 200k: 2.81}`; `end`: the run's
    last step, as EDM2 reports), compared with the run's by `dmstab report`"""
    others: dict[str, float] = field(default_factory=dict)
    """further published numbers (guided FID, say): shown, not compared"""
    notes: str = ""
    """free text shown with the numbers"""


@dataclass(frozen=True)
class Recipe:
    name: str = "recipe"
    """the run's name in MLflow and its recipe's (default: the recipe file's stem)"""
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
