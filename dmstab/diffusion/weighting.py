"""Per-timestep weights of the DDPM target MSE: none, Min-SNR-γ, P2 and FDM's warm-up.

With x_t = a·x0 + s·ε, a = √ᾱ_t, s = √(1 − ᾱ_t), a² + s² = 1 and SNR = a²/s², a prediction of
any target implies the others, and their errors are exactly proportional:

    x0 − x̂0 = (s/a)·(ε̂ − ε)            ⇒  MSE_x0 = MSE_ε / SNR
    v − v̂   = a·(ε − ε̂) − s·(x0 − x̂0)
            = (a + s²/a)·(ε − ε̂) = (ε − ε̂)/a  ⇒  MSE_v = MSE_ε / ᾱ = MSE_ε·(1 + SNR)/SNR

Each weighting is defined on the ε-MSE (w_ε) and converted to the target trained, so that the
same weighting is the same objective whatever the target: w_x0 = w_ε·SNR,
w_v = w_ε·SNR/(1 + SNR) and, for x_{t−1}'s posterior mean μ̃ = c_0·x0 + c_t·x_t (Ho et al.
2020 Eq. 7), μ̃ − μ̂ = c_0·(x0 − x̂0) so w_μ = w_ε·SNR/c_0². `none` is the plain MSE of the
trained target (AAAI Eqs. 4–5).
Weights are float32, one per sample; they scale only the MSE term (the hybrid loss's VB term
stays unweighted, as in the Min-SNR and P2 reference code).
"""

import torch
from torch import Tensor

from dmstab.config import DiffusionConfig
from dmstab.diffusion.fdm import warmup_weight_cap
from dmstab.diffusion.gaussian import GaussianDiffusion


def min_snr_eps_weights(snr: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ (Hang et al. 2023) on the ε-MSE: min(SNR, γ)/SNR (x0: min(SNR, γ))."""
    return snr.clamp(max=gamma) / snr


def p2_eps_weights(snr: Tensor, k: float, gamma: float) -> Tensor:
    """P2 weighting (Choi et al. 2022) on the ε-MSE: 1/(k + SNR)^γ."""
    return (k + snr) ** -gamma


def fdm_eps_weights(snr: Tensor, step: int, warmup_iterations: int) -> Tensor:
    """FDM's warm-up on the ε-MSE: its cap c_k on the x0 weight SNR is Min-SNR-c_k, then 1."""
    cap = warmup_weight_cap(step, warmup_iterations)
    return torch.ones_like(snr) if cap is None else min_snr_eps_weights(snr, cap)


def mse_weights(
    config: DiffusionConfig, diffusion: GaussianDiffusion, t: Tensor, step: int
) -> Tensor:
    """Float32 weights (B,) of the target MSE at timesteps t under config.weighting.

    `step` is the training iteration, for weightings that change during training.
    """
    if config.weighting == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    # float64: SNR spans ~1e-9 … 1e6 over a cosine schedule
    coefficients = diffusion.coefficients(t, ndim=1, dtype=torch.float64)
    snr = coefficients.snr
    if config.weighting == "min_snr":
        eps_weights = min_snr_eps_weights(snr, config.min_snr_gamma)
    elif config.weighting == "p2":
        eps_weights = p2_eps_weights(snr, config.p2_k, config.p2_gamma)
    else:  # fdm
        eps_weights = fdm_eps_weights(snr, step, config.fdm_warmup_iterations)
    return diffusion.prediction.weights_from_eps(eps_weights, coefficients).to(torch.float32)
