"""Fast Diffusion Model (FDM; Wu, Zhou, Kawaguchi & Zhang 2023, arXiv 2306.06991) for DDPM.

FDM adds momentum to the forward process. Its mean obeys a damped oscillator, and the
critically damped solution gives the kernel's x0 coefficient

    s(τ) = e^{−τ}(1 + τ),   τ = m·B(u),   B(u) = β_min·u + ½·β_d·u²,

which replaces the VP coefficient e^{−B/2} (the paper's "critically damped state — the kernel
solution"; formulas as in the official code, docs/fdm.md). The official code (sail-sg/FDM,
FDM_VPPrecond) keeps the noise-to-signal ratio σ and applies s as the network's input scale,
x_in = s(σ)·(x0 + σ·ε), with FDM time u = (σ − σ_min)/(σ_max − σ_min) over the VP range.
A DDPM step is x_t = √ᾱ_t·(x0 + σ_t·ε) with σ_t = √((1 − ᾱ_t)/ᾱ_t), so FDM feeds the model
x_t·s(σ_t)/√ᾱ_t in training and sampling alike; the Markov chain and its posterior are
unchanged. Its loss-weight warm-up caps the x0-error weight 1/σ² (= SNR) at 5·100^{(k−1)/W}
in steps k = 1…W and then lifts the cap (official VPLoss); on the ε-MSE that is Min-SNR with
a growing γ (dmstab.diffusion.weighting).
"""

import math

import torch
from torch import Tensor

# The VP-SDE (Song et al. 2021; EDM Table 1) whose σ range FDM_VPPrecond maps to u ∈ [0, 1]:
# σ(t) = √(e^{½β_d t² + β_min t} − 1) on t ∈ [ε_t, 1].
_VP_BETA_MIN = 0.1
_VP_BETA_D = 19.9
_VP_EPSILON_T = 1e-5

# Official warm-up: the weight cap starts at 5 and grows geometrically by a factor 100.
WARMUP_CAP_START = 5.0
WARMUP_CAP_GROWTH = 100.0


def vp_sde_sigma(t: float) -> float:
    """Noise-to-signal ratio of the VP-SDE at time t (EDM Table 1, VP σ(t))."""
    return math.sqrt(math.expm1(0.5 * _VP_BETA_D * t**2 + _VP_BETA_MIN * t))


VP_SIGMA_MIN = vp_sde_sigma(_VP_EPSILON_T)
VP_SIGMA_MAX = vp_sde_sigma(1.0)


def beta_integral(u: Tensor, beta_min: float, beta_d: float) -> Tensor:
    """B(u) = ∫₀ᵘ (β_min + β_d·r) dr = β_min·u + ½·β_d·u², the linear-β schedule's integral."""
    return beta_min * u + 0.5 * beta_d * u**2


def critically_damped_scale(tau: Tensor) -> Tensor:
    """e^{−τ}(1 + τ): x(τ) of the critically damped x'' + 2x' + x = 0, x(0) = 1, x'(0) = 0."""
    return torch.exp(-tau) * (1.0 + tau)


def fdm_time(sigma: Tensor) -> Tensor:
    """FDM time u = (σ − σ_min)/(σ_max − σ_min) over the VP-SDE range, as FDM_VPPrecond."""
    return (sigma - VP_SIGMA_MIN) / (VP_SIGMA_MAX - VP_SIGMA_MIN)


def fdm_scale(sigma: Tensor, *, multiplier: float, beta_min: float, beta_d: float) -> Tensor:
    """FDM's x0 coefficient at noise-to-signal ratio σ: e^{−mB(u)}(1 + mB(u)), u = fdm_time(σ)."""
    return critically_damped_scale(multiplier * beta_integral(fdm_time(sigma), beta_min, beta_d))


def fdm_input_scale(
    alphas_cumprod: Tensor, *, multiplier: float, beta_min: float, beta_d: float
) -> Tensor:
    """Per-step factor on x_t so the model sees s(σ_t)·(x0 + σ_t·ε) instead of x_t (float64)."""
    alpha_bar = alphas_cumprod.to(torch.float64)
    sigma = torch.sqrt((1.0 - alpha_bar) / alpha_bar)
    scale = fdm_scale(sigma, multiplier=multiplier, beta_min=beta_min, beta_d=beta_d)
    return scale / torch.sqrt(alpha_bar)


def warmup_weight_cap(step: int, warmup_iterations: int) -> float | None:
    """The cap on the x0-error weight 1/σ² at 1-based training step `step`, None once lifted.

    Step k ≤ W uses 5·100^{(k−1)/W}: the official loss multiplies its cap by 100^{1/W} after
    each call and stops capping once the cap reaches 500. W = 0 means no warm-up.
    """
    if step < 1:
        raise ValueError(f"training steps are 1-based, got {step}")
    if step > warmup_iterations:
        return None
    return WARMUP_CAP_START * math.pow(WARMUP_CAP_GROWTH, (step - 1) / warmup_iterations)
