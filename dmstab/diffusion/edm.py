"""Continuous-time EDM denoising: preconditioning, log-normal noise levels and the EDM2 loss.

Karras et al. 2022 (EDM) Table 1 preconditioning wraps a raw network F into the denoiser
D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), labels). EDM2 (Karras et al. 2024,
Sec. 2 and App. B.2) trains it with ln σ ~ N(P_mean, P_std²) and weights the loss by a
learned uncertainty u(σ): (λ(σ)/e^u)·‖D − y‖² + u, after Kendall et al. 2018.

A denoiser is any callable ``denoiser(x, sigma, class_labels)`` with x of shape
(B, C, H, W), sigma of shape (B,) and class_labels (B, …) or None, returning D(x, σ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dmstab.errors import DmstabError

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]

SIGMA_DATA = 0.5  # EDM / EDM2 σ_data for images in [−1, 1] and normalised latents


@dataclass(frozen=True)
class PrecondCoefficients:
    """EDM Table 1 scalings at one or more noise levels, each shaped like σ."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def precond_coefficients(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> PrecondCoefficients:
    """c_skip = σd²/(σ²+σd²), c_out = σ·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²), c_noise = ln(σ)/4."""
    total_variance = sigma**2 + sigma_data**2
    return PrecondCoefficients(
        c_skip=sigma_data**2 / total_variance,
        c_out=sigma * sigma_data / total_variance.sqrt(),
        c_in=total_variance.rsqrt(),
        c_noise=sigma.log() / 4,
    )


def loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """λ(σ) = (σ² + σd²)/(σ·σd)², the EDM weight that makes the effective loss 1/c_out² (Eq. 14)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def per_sample_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """σ as a float32 (batch,) tensor from a number, a 0-d tensor or a (batch, …) tensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.numel() == 1:
        return sigma.reshape(1).expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
    return sigma.reshape(batch)


def _broadcast(values: Tensor, ndim: int) -> Tensor:
    """(B,) values shaped (B, 1, …, 1) to broadcast over an ndim-dimensional batch."""
    return values.reshape(-1, *([1] * (ndim - 1)))


class EDMPrecond(nn.Module):
    """D(x, σ) from a raw network F(c_in·x, c_noise, labels) (EDM Table 1, σd = 0.5).

    ``uncertainty``, when given, maps c_noise (B,) to the log-variance u(σ) of EDM2's loss
    (EDM2 App. B.2: Fourier features of c_noise and one linear layer); ``logvar`` returns it.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        sigma_data: float = SIGMA_DATA,
        uncertainty: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise DmstabError(f"sigma_data is {sigma_data}; must be > 0")
        self.net = net
        self.sigma_data = sigma_data
        self.uncertainty = uncertainty

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        """D(x, σ) in float32; σ is a number or one value per sample."""
        x = x.to(torch.float32)
        sigma_b = per_sample_sigma(sigma, x.shape[0], x.device)
        c = precond_coefficients(_broadcast(sigma_b, x.ndim), self.sigma_data)
        raw: Tensor = self.net(c.c_in * x, c.c_noise.flatten(), class_labels)
        return c.c_skip * x + c.c_out * raw.to(torch.float32)

    def logvar(self, sigma: Tensor) -> Tensor:
        """u(σ), one value per sample (B,), from the uncertainty module."""
        if self.uncertainty is None:
            raise ValueError("this EDMPrecond has no uncertainty module, so no u(σ)")
        sigma_b = sigma.to(torch.float32).flatten()
        u: Tensor = self.uncertainty(precond_coefficients(sigma_b, self.sigma_data).c_noise)
        return u.to(torch.float32).reshape(sigma_b.shape[0])


def sample_sigmas(
    batch: int,
    p_mean: float,
    p_std: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Training noise levels, (batch,) float32: ln σ ~ N(P_mean, P_std²) (EDM Sec. 5, EDM2)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if not p_std > 0:
        raise DmstabError(f"P_std is {p_std}; must be > 0")
    normal = torch.randn(batch, generator=generator, device=device)
    return torch.exp(p_mean + p_std * normal)


def edm2_loss(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor,
    noise: Tensor,
    labels: Tensor | None = None,
    logvar: Tensor | None = None,
    sigma_data: float = SIGMA_DATA,
) -> Tensor:
    """Per-sample loss (B,): mean over pixels of (λ(σ)/e^u)·(D(x + σn, σ) − x)² + u.

    noise is unit-variance; logvar is u(σ) per sample (EDM2 Eq. 21); without it this is
    EDM's λ-weighted loss. EDM2's reference sums over pixels instead; the factor C·H·W only
    rescales the gradient, which Adam undoes.
    """
    sigma_b = per_sample_sigma(sigma, x.shape[0], x.device)
    sigma_x = _broadcast(sigma_b, x.ndim)
    denoised = denoiser(x + sigma_x * noise, sigma_b, labels)
    squared_error = ((denoised - x) ** 2).mean(dim=tuple(range(1, x.ndim)))
    weighted = loss_weight(sigma_b, sigma_data) * squared_error
    if logvar is None:
        return weighted
    u = logvar.reshape(sigma_b.shape[0])
    return weighted / u.exp() + u
