"""Magnitude-preserving (MP) building blocks of EDM2 (Karras et al. 2024, Secs. 2.2–2.5).

Each piece keeps unit-variance inputs at unit variance on expectation, whatever its weights:
that is what lets EDM2 (config G) drop normalisation layers without activations drifting.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMALIZE_EPS = 1e-4
SILU_RMS = 0.596  # E_{x~N(0,1)}[silu(x)²]^½ (EDM2 Sec. 2.5)


def normalize(
    x: Tensor, dim: int | tuple[int, ...] | None = None, eps: float = NORMALIZE_EPS
) -> Tensor:
    """Scale every slice of `x` over `dim` (default: all but the first) to unit RMS."""
    dims = tuple(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    slice_size = x.numel() // norm.numel()
    normalized: Tensor = x / (eps + norm / math.sqrt(slice_size)).to(x.dtype)
    return normalized


def mp_silu(x: Tensor) -> Tensor:
    """SiLU rescaled to unit second moment for standard-normal input."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """(1−t)·a + t·b divided by its standard deviation for independent unit-variance a, b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, t: float = 0.5, dim: int = 1) -> Tensor:
    """Concatenation whose parts contribute (1−t)² : t² of its energy, at unit RMS overall."""
    size_a, size_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((size_a + size_b) / ((1 - t) ** 2 + t**2))
    weight_a = scale * (1 - t) / math.sqrt(size_a)
    weight_b = scale * t / math.sqrt(size_b)
    return torch.cat([a * weight_a, b * weight_b], dim=dim)


class FourierFeatures(nn.Module):
    """cos(f·x + φ) with f ~ 2π·N(0, 1), φ ~ 2π·U[0, 1) fixed at init; ×√2 gives unit variance."""

    freqs: Tensor
    phases: Tensor

    def __init__(self, num_channels: int, magnitude_preserving: bool = True) -> None:
        super().__init__()
        self.amplitude = math.sqrt(2.0) if magnitude_preserving else 1.0
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B,) → (B, num_channels)."""
        angles = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (angles.cos() * self.amplitude).to(x.dtype)


class MPConv(nn.Module):
    """Convolution (kernel (k, k)) or linear layer (kernel ()) with weight normalisation.

    Each output unit's weight is used as w_i/‖w_i‖, so the layer maps unit-variance input to
    unit-variance output for any stored weight (EDM2 config D). With `forced_weight_norm`
    (config E) a training-mode call first rescales the stored weight rows to ‖w_i‖² = fan_in
    whenever the weight changed since the last such call (an optimizer step, a load), which
    keeps the weight norms, and so the effective learning rate, fixed over training. Skipping
    the rescale of an unchanged weight lets several forward passes share one backward pass.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...] = (),
        forced_weight_norm: bool = True,
    ) -> None:
        super().__init__()
        self.forced_weight_norm = forced_weight_norm
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._normalized_version = -1  # the weight's version counter after the last rescale

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.forced_weight_norm:
            self._force_weight_norm()
        fan_in = self.weight[0].numel()
        w = (normalize(self.weight) / math.sqrt(fan_in)).to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def _force_weight_norm(self) -> None:
        """EDM2 Eq. 66: w_i ← w_i·√fan_in/‖w_i‖ before use, if w changed since the last time."""
        if self.weight._version == self._normalized_version:
            return
        with torch.no_grad():
            self.weight.copy_(normalize(self.weight))
        self._normalized_version = self.weight._version
