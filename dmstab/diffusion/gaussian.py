"""Discrete-time Gaussian diffusion: forward process, losses and the reverse-step posterior.

Equations: AAAI 2024 "Analyzing Stability in Diffusion Model Training" Eqs. 3–5 (forward
process, ε- and x0-prediction losses); Salimans & Ho 2022 Sec. 4 (v-prediction); Ho et al.
2020 (posterior q(x_{t−1}|x_t, x0), decoder NLL); Nichol & Dhariwal 2021 (learned Σ, hybrid
loss). Schedule buffers are float64 on the CPU; per-batch values are gathered as float32, as
improved-diffusion does.

A model is any callable ``model(x, t, y)`` where t is the float timestep rescaled to
[0, 1000) using the original schedule's index (improved-diffusion's rescale_timesteps).
With learned Σ its output has 2C channels: C for the target (ε, x0, v, …), then C for the
interpolation value ∈ [−1, 1] of Nichol & Dhariwal Eq. 15 (named `v` below only where Σ is
concerned).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dmstab.diffusion.sampling import Denoise
from dmstab.diffusion.targets import StepCoefficients, prediction_target

Model = Callable[[Tensor, Tensor, Tensor | None], Tensor]

# Half the width of one 8-bit intensity bin on the [−1, 1] scale (Ho et al. 2020 Eq. 13).
_HALF_BIN = 1.0 / 255.0


def gather_per_sample(
    values: Tensor, t: Tensor, ndim: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """values[t] as `dtype` on t's device, shaped (B, 1, …, 1) to broadcast over ndim dims."""
    picked = values.to(t.device, non_blocking=True)[t].to(dtype)
    return picked.reshape(-1, *([1] * (ndim - 1)))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) in nats."""
    return 0.5 * (
        log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        - 1.0
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Elementwise log p(x) of 8-bit data under N(mean, e^{2·log_std}), Ho et al. 2020 Eq. 13.

    Each value owns the bin x ± 1/255; the bins at −1 and 1 extend to −∞ and +∞.
    """
    inv_std = torch.exp(-log_std)
    upper = (x - mean + _HALF_BIN) * inv_std
    lower = (x - mean - _HALF_BIN) * inv_std
    log_below_upper = torch.special.log_ndtr(upper)
    log_above_lower = torch.special.log_ndtr(-lower)
    bin_mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_bin = torch.log(bin_mass.clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_bin)
    )


@dataclass(frozen=True)
class ReverseStep:
    """The model's p_θ(x_{t−1} | x_t) = N(mean, e^log_variance) and its x0 estimate."""

    mean: Tensor
    log_variance: Tensor
    pred_x0: Tensor


class GaussianDiffusion:
    """Forward process, training losses and reverse posterior for one β schedule.

    A respaced copy (see ``respaced``) keeps ``timestep_map``, the original index of each of
    its steps, so that models always see the original timestep. ``input_scale`` (one float64
    factor per step, default 1) multiplies x_t wherever the model sees it: FDM's kernel scale
    (dmstab.diffusion.fdm) enters training and sampling alike through it.
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        target: str,
        learn_sigma: bool,
        hybrid_loss: bool,
        timestep_map: Tensor | None = None,
        original_num_timesteps: int | None = None,
        input_scale: Tensor | None = None,
    ) -> None:
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError("betas must be a 1-D tensor with at least 2 steps")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        if learn_sigma != hybrid_loss:
            raise ValueError(
                "learn_sigma and hybrid_loss must be equal: a learned Σ is trained only by the "
                "hybrid loss's VB term, and the VB term needs a learned Σ"
            )
        if (timestep_map is None) != (original_num_timesteps is None):
            raise ValueError("timestep_map and original_num_timesteps go together")
        if input_scale is not None and input_scale.shape != betas.shape:
            raise ValueError("input_scale needs one factor per step, like betas")
        self.target = target
        self.prediction = prediction_target(target)
        self.learn_sigma = learn_sigma
        self.num_timesteps = betas.numel()
        self.timestep_map = (
            torch.arange(self.num_timesteps) if timestep_map is None else timestep_map.long()
        )
        self.original_num_timesteps = original_num_timesteps or self.num_timesteps
        self.input_scale = (
            torch.ones(self.num_timesteps, dtype=torch.float64)
            if input_scale is None
            else input_scale.to(torch.float64)
        )

        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        one = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        # Ho et al. 2020 Eq. 7: q(x_{t−1} | x_t, x0) = N(coef_x0·x0 + coef_xt·x_t, β̃_t).
        self.posterior_variance = (
            self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # β̃_0 = 0; improved-diffusion replaces it by β̃_1 before taking the log.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_coef_x0 = (
            self.betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_coef_xt = (
            (1.0 - self.alphas_cumprod_prev)
            * torch.sqrt(1.0 - self.betas)
            / (1.0 - self.alphas_cumprod)
        )
        self.snr_table = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # Fixed Σ: improved-diffusion's "fixedlarge" σ_t² = β_t, with β̃_1 at t = 0.
        self.fixed_log_variance = torch.log(
            torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        )

    def respaced(self, kept_steps: list[int]) -> "GaussianDiffusion":
        """The diffusion over kept_steps only, β_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}."""
        kept = torch.tensor(kept_steps, dtype=torch.long)
        alpha_bar = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return GaussianDiffusion(
            1.0 - alpha_bar / previous,
            target=self.target,
            learn_sigma=self.learn_sigma,
            hybrid_loss=self.learn_sigma,
            timestep_map=self.timestep_map[kept],
            original_num_timesteps=self.original_num_timesteps,
            input_scale=self.input_scale[kept],
        )

    def model_time(self, t: Tensor) -> Tensor:
        """The time the model sees: original index · 1000 / original T (rescale_timesteps)."""
        original = self.timestep_map.to(t.device, non_blocking=True)[t]
        return original.to(torch.float32) * (1000.0 / self.original_num_timesteps)

    def model_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """What the model sees of x_t: x_t · input_scale[t] (x_t itself unless FDM)."""
        return x_t * gather_per_sample(self.input_scale, t, x_t.ndim)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """AAAI Eq. 3: x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε."""
        signal = gather_per_sample(self.sqrt_alphas_cumprod, t, x0.ndim)
        sigma = gather_per_sample(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return signal * x0 + sigma * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Ho et al. 2020 Eqs. 6–7: mean and clipped log-variance of q(x_{t−1} | x_t, x0)."""
        mean = self.coefficients(t, x_t.ndim).posterior_mean(x0, x_t)
        log_variance = gather_per_sample(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean, log_variance.expand_as(x_t)

    def coefficients(
        self, t: Tensor, ndim: int, dtype: torch.dtype = torch.float32
    ) -> StepCoefficients:
        """√ᾱ_t, √(1 − ᾱ_t), the posterior mean's coefficients and SNR(t) per sample, as
        `dtype` on t's device, shaped (B, 1, …, 1) to broadcast over ndim dims."""

        def at_t(values: Tensor) -> Tensor:
            return gather_per_sample(values, t, ndim, dtype)

        return StepCoefficients(
            a=at_t(self.sqrt_alphas_cumprod),
            s=at_t(self.sqrt_one_minus_alphas_cumprod),
            posterior_x0=at_t(self.posterior_coef_x0),
            posterior_xt=at_t(self.posterior_coef_xt),
            snr=at_t(self.snr_table),
        )

    def training_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the model is trained to output: ε (Eq. 4), x0 (Eq. 5), v, x_{t−1}'s posterior
        mean, or a registered target (dmstab.diffusion.targets)."""
        return self.prediction.training_target(x0, noise, self.coefficients(t, x0.ndim))

    def predict_x0(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """x̂0 from the model's prediction of the target (dmstab.diffusion.targets)."""
        return self.prediction.predict_x0(x_t, prediction, self.coefficients(t, x_t.ndim))

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε implied by x_t and an x0 estimate (Eq. 3 solved for ε)."""
        return (
            x_t - gather_per_sample(self.sqrt_alphas_cumprod, t, x_t.ndim) * x0
        ) / gather_per_sample(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)

    def split_output(self, output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """(the target's prediction; Σ interpolation value or None) from a float32 model output."""
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape[1] != expected:
            raise ValueError(
                f"model output has {output.shape[1]} channels, expected {expected} "
                f"(learn_sigma={self.learn_sigma}, data has {channels})"
            )
        if not self.learn_sigma:
            return output, None
        return output[:, :channels], output[:, channels:]

    def model_log_variance(self, v: Tensor | None, t: Tensor, like: Tensor) -> Tensor:
        """log σ_t²: Nichol & Dhariwal Eq. 15 from v, or the fixed "fixedlarge" value."""
        if v is None:
            return gather_per_sample(self.fixed_log_variance, t, like.ndim).expand_as(like)
        max_log = gather_per_sample(torch.log(self.betas), t, like.ndim)
        min_log = gather_per_sample(self.posterior_log_variance_clipped, t, like.ndim)
        fraction = (v + 1.0) / 2.0
        return fraction * max_log + (1.0 - fraction) * min_log

    def reverse_step(
        self, output: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool
    ) -> ReverseStep:
        """p_θ(x_{t−1} | x_t) from a float32 model output: the target's reverse mean (Ho et al.
        2020 Eq. 11 via x̂0, or the predicted mean itself) and x̂0, clipped if asked."""
        prediction, v = self.split_output(output, x_t.shape[1])
        c = self.coefficients(t, x_t.ndim)
        pred_x0 = self.prediction.predict_x0(x_t, prediction, c)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = self.prediction.reverse_mean(x_t, prediction, pred_x0, c)
        return ReverseStep(mean, self.model_log_variance(v, t, x_t), pred_x0)

    def p_mean_variance(
        self, denoise: Denoise, x_t: Tensor, t: Tensor, *, clip_denoised: bool
    ) -> ReverseStep:
        """Run the model (labels bound) on model_input(x_t, t) at model_time(t); form
        p_θ(x_{t−1} | x_t)."""
        output = denoise(self.model_input(x_t, t), self.model_time(t)).to(torch.float32)
        return self.reverse_step(output, x_t, t, clip_denoised=clip_denoised)

    def vb_terms_bits_per_dim(
        self, x0: Tensor, x_t: Tensor, t: Tensor, step: ReverseStep
    ) -> Tensor:
        """Ho et al. 2020 Eq. 5 in bits/dim: KL(q ‖ p_θ) for t > 0, −log p_θ(x0 | x1) at t = 0."""
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, step.mean, step.log_variance))
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance)
        )
        return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)

    def training_losses(
        self,
        model: Model,
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        y: Tensor | None = None,
        mse_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses: the target MSE (AAAI Eq. 4 for ε, Eq. 5 for x0, v, …) as "mse",
        plus Nichol & Dhariwal's VB term when Σ is learned ("vb", scaled by T/1000).

        "loss" is mse_weights·mse + vb: a loss weighting (dmstab.diffusion.weighting) scales
        only the MSE, the VB term stays unweighted. "mse" is reported unweighted. Sampler
        importance weights are the objective's business, not applied here.
        """
        x_t = self.q_sample(x0, t, noise)
        output = model(self.model_input(x_t, t), self.model_time(t), y).to(torch.float32)
        prediction, v = self.split_output(output, x0.shape[1])
        mse = mean_flat((self.training_target(x0, t, noise) - prediction) ** 2)
        weighted = mse if mse_weights is None else mse_weights.to(mse.device) * mse
        if v is None:
            return {"loss": weighted, "mse": mse}
        # Stop-gradient on the mean: the VB term trains only Σ (Nichol & Dhariwal Sec. 3.1).
        frozen = torch.cat([prediction.detach(), v], dim=1)
        step = self.reverse_step(frozen, x_t, t, clip_denoised=False)
        vb = self.vb_terms_bits_per_dim(x0, x_t, t, step) * (self.num_timesteps / 1000.0)
        return {"loss": weighted + vb, "mse": mse, "vb": vb}
