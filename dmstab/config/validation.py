"""Range and cross-section checks that types alone cannot express.

Each rule raises a `DmstabError` whose one line names the key and what it allows. The layout
checks of each network live with the network: `dmstab.models` registers one per `model.name`
(`register_model_check`), so this module imports no model code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dmstab.config.schema import (
    GAN_MODELS,
    SIGMA_REL_MAX,
    DataConfig,
    DiffusionConfig,
    EmaConfig,
    OptimConfig,
    Recipe,
    TrainConfig,
)
from dmstab.errors import DmstabError

ModelCheck = Callable[[Recipe], None]
_MODEL_CHECKS: dict[str, ModelCheck] = {}


def register_model_check(name: str, check: ModelCheck) -> None:
    """`check(recipe)` validates the layout of the network `model.name: name` builds; it runs
    with the other model rules whenever a recipe naming that network is validated."""
    _MODEL_CHECKS[name] = check


def _architecture_check(recipe: Recipe) -> None:
    name = recipe.model.name
    check = _MODEL_CHECKS.get(name)
    if check is None:
        raise DmstabError(
            f"model.name {name} has no registered network; import dmstab.models (or the module "
            f"that registers it) first; registered: {', '.join(sorted(_MODEL_CHECKS))}"
        )
    check(recipe)


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
        _architecture_check(recipe)
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
        _architecture_check(recipe)  # the network's own layout and switch checks


def _validate_gan(recipe: Recipe) -> None:
    """A GAN trains with its own two Adams, no diffusion objective and no DDP (docs/gans.md)."""
    g, tr = recipe.gan, recipe.train
    name = recipe.model.name
    _architecture_check(recipe)
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
    _architecture_check(recipe)


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
