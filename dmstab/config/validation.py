"""Range and cross-section checks that types alone cannot express.

Each rule raises a `DmstabError` whose one line names the key and what it allows. The checks
of each network and each analysis section live with them and are registered with their
dataclass (`MODELS`, `ANALYSES`); this module runs them and holds the rules that join
sections, so it imports no model or analysis code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dmstab.config.schema import (
    ANALYSES,
    MODELS,
    SAMPLERS,
    SIGMA_REL_MAX,
    TARGETS,
    TIMESTEP_SAMPLERS,
    DataConfig,
    DiffusionConfig,
    EmaConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    TrainConfig,
)
from dmstab.errors import DmstabError


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
    for name in recipe.analyses:
        check = ANALYSES.get(name).check
        if check is not None:
            check(recipe)
    _require(recipe.tracking.flush_every >= 1, "tracking.flush_every must be at least 1")
    return recipe


def check_written_length(written: Mapping[str, Any], recipe: Recipe) -> None:
    """A run's length is `train.steps` or, when positive, `train.kimg`: refuse a `written`
    tree (a recipe's `base:` chain with its overrides, as the user wrote it) that sets both, as
    `kimg` would silently win whatever `steps` says. `train.kimg: 0` beside `steps` is allowed
    (it selects `steps`). `recipe` is the tree resolved, whose kimg is already type-checked."""
    train = written.get("train")
    if isinstance(train, Mapping) and "steps" in train and "kimg" in train and recipe.train.kimg:
        raise DmstabError(
            f"set train.steps or train.kimg, not both (train.steps={train['steps']} and "
            f"train.kimg={recipe.train.kimg:g} are both written; train.kimg=0 uses train.steps)"
        )


def _validate_data(d: DataConfig) -> None:
    _require(d.resolution >= 8, f"data.resolution is {d.resolution}; must be at least 8")
    _require(
        d.name == "synthetic" or d.root is not None,
        f"data.root is required for data.name={d.name!r} (a directory or file path)",
    )
    _require(d.synthetic_size >= 1, "data.synthetic_size must be at least 1")


def _validate_model(recipe: Recipe) -> None:
    """The network's own checks, and what it needs of the other sections."""
    m = recipe.model
    component = MODELS.get(m.name)
    if m.adversarial:
        _validate_adversarial(recipe)
    else:
        formulation = recipe.diffusion.formulation
        if formulation not in m.formulations:
            others = [
                c.name
                for c in MODELS
                if c.config
                and issubclass(c.config, ModelConfig)
                and formulation in c.config.formulations
            ]
            raise DmstabError(
                f"model.name {m.name} trains with diffusion.formulation "
                f"{' or '.join(m.formulations)}; {formulation} networks: {', '.join(others)}"
            )
    if component.check is not None:
        component.check(recipe)


def _validate_adversarial(recipe: Recipe) -> None:
    """A GAN trains with its own two Adams, no diffusion objective and no DDP (docs/gans.md)."""
    tr, name = recipe.train, recipe.model.name
    _require(recipe.data.name != "latents", f"model.name {name} trains on images, not latents")
    unsupported = {
        "train.nonfinite: skip": tr.nonfinite == "skip",
        "train.spike_factor": tr.spike_factor != 0,
        "train.magnitudes_every": tr.magnitudes_every != 0,
        "train.micro_batch_size": tr.micro_batch_size not in (0, tr.batch_size),
        "ema.power_sigma_rels": bool(recipe.ema.power_sigma_rels),
    }
    for key, used in unsupported.items():
        _require(not used, f"{key} is for diffusion models; GAN training does not support it")


def _validate_diffusion(recipe: Recipe) -> None:
    diff = recipe.diffusion
    _require(
        0.0 <= diff.label_dropout < 1.0,
        f"diffusion.label_dropout is {diff.label_dropout}; must be in [0, 1)",
    )
    if diff.formulation == "edm":
        _require(
            diff.label_dropout == 0.0 or recipe.model.class_cond,
            "diffusion.label_dropout > 0 needs model.class_cond: true",
        )
        _require(diff.p_std > 0, f"diffusion.p_std is {diff.p_std}; must be positive")
        _require(diff.sigma_data > 0, f"diffusion.sigma_data is {diff.sigma_data}; must be > 0")
        _require_ddpm_methods_off(recipe)
        return
    _require(
        diff.label_dropout == 0.0,
        "diffusion.label_dropout (classifier-free guidance) needs diffusion.formulation edm",
    )
    _require(diff.steps >= 2, "diffusion.steps (T) must be at least 2")
    TARGETS.get(diff.target)
    _validate_fdm(diff)
    _require(
        diff.min_snr_gamma > 0, f"diffusion.min_snr_gamma is {diff.min_snr_gamma}; must be > 0"
    )
    # k = 0 would make the ε weight 1/SNR^γ explode where SNR → 0 (ᾱ_T ≈ 1e-9 for cosine).
    _require(diff.p2_k > 0, f"diffusion.p2_k is {diff.p2_k}; must be > 0")
    _require(diff.p2_gamma >= 0, f"diffusion.p2_gamma is {diff.p2_gamma}; must be >= 0")
    ts = recipe.timesteps
    _require(ts.history >= 1, f"timesteps.history is {ts.history}; must be at least 1")
    _require(
        0.0 <= ts.uniform_prob < 1.0,
        f"timesteps.uniform_prob is {ts.uniform_prob}; must be in [0, 1)",
    )
    _require(ts.sigma > 0, f"timesteps.sigma is {ts.sigma}; must be positive")
    _require(ts.target_iteration >= 1, "timesteps.target_iteration must be at least 1")
    _require(ts.histogram_every >= 0, "timesteps.histogram_every must be >= 0 (0 = never)")
    check = TIMESTEP_SAMPLERS.get(ts.sampler).check
    if check is not None:
        check(recipe)
    _validate_ddpm_latents(recipe)


def _validate_ddpm_latents(recipe: Recipe) -> None:
    """A ddpm model of latents: nothing may treat them as pixels in [−1, 1]."""
    if recipe.data.name != "latents":
        return
    _require(  # ADM's clip_denoised clamps x̂0 to the pixel range; latents span about ±3σ_data
        not recipe.sample.clip_denoised,
        "sample.clip_denoised clamps x̂0 to the pixel range [-1, 1]; latents are not pixels "
        "(data.name latents): set sample.clip_denoised=false",
    )
    _require(  # the VB term's t = 0 decoder is a discretised 8-bit pixel likelihood (bins 2/255)
        not recipe.model.learns_variance(),
        f"model.name {recipe.model.name} learns Σ with the hybrid loss, whose t=0 term is an "
        "8-bit pixel likelihood; latents (data.name latents) need model.learn_sigma=false",
    )


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


def check_sampler(recipe: Recipe, sampler: str, steps: int, key: str) -> None:
    """`sampler` is registered for the recipe's formulation and `steps` suit that formulation's
    schedule (`key`: the section that set them)."""
    check = SAMPLERS.get(sampler, f"{key}.sampler").check
    if recipe.diffusion.formulation == "edm":  # Karras levels σ_max … σ_min need two ends
        _require(steps >= 2, f"{key}.steps is {steps}; edm sampling needs at least 2")
    else:  # a respacing keeps both ends: 2 … T of the trained steps
        T = recipe.diffusion.steps
        _require(2 <= steps <= T, f"{key}.steps is {steps}; must be in [2, diffusion.steps={T}]")
        _require(  # μ̂ is one step of the trained chain; respaced, it would be read as a longer one
            recipe.diffusion.target != "previous_x" or steps == T,
            f"{key}.steps is {steps}; diffusion.target previous_x predicts the mean of one step "
            f"of the {T}-step chain, so it samples only with {key}.steps={T}",
        )
    if check is not None:
        check(recipe, key, steps)


def _validate_sample(recipe: Recipe) -> None:
    s = recipe.sample
    check_sampler(recipe, s.sampler, s.steps, "sample")
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
        s.guide != "self" or recipe.diffusion.label_dropout > 0,
        "sample.guide: self needs a model trained with diffusion.label_dropout > 0",
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
        check_sampler(recipe, ev.sampler or recipe.sample.sampler, steps, "eval")
