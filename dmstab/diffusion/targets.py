"""Prediction targets of the ddpm formulation, by name (`diffusion.target`).

With x_t = a·x0 + s·ε (AAAI Eq. 3; a = √ᾱ_t, s = √(1 − ᾱ_t), a² + s² = 1) a network can be
trained to output ε (AAAI Eq. 4), x0 (Eq. 5) or v = a·ε − s·x0 (Salimans & Ho 2022 Sec. 4).
A target says three things: what the network is trained to output, how x̂0 follows from its
output, and which weight on its MSE equals a given weight on the ε-MSE, so that a loss
weighting (dmstab.diffusion.weighting) is the same objective whatever the target.

A new target is one class with these three methods and one `register_target` call; its name
is then a valid `diffusion.target` for training, sampling and every analysis.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from dmstab.config import TARGETS


class PredictionTarget(Protocol):
    """`a` and `s` are √ᾱ_t and √(1 − ᾱ_t) per sample, float32, shaped (B, 1, …, 1)."""

    def training_target(self, x0: Tensor, noise: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """What the network is trained to output for x_t = a·x0 + s·noise."""
        ...

    def predict_x0(self, x_t: Tensor, prediction: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """x̂0 implied by the network's output `prediction` at x_t."""
        ...

    def weights_from_eps(self, eps_weights: Tensor, snr: Tensor) -> Tensor:
        """The weight on this target's MSE that gives the loss `eps_weights` gives on the
        ε-MSE; SNR = a²/s² (dmstab.diffusion.weighting derives the ratios)."""
        ...


class Epsilon:
    """ε (AAAI Eq. 4): x̂0 = (x_t − s·ε̂)/a, Eq. 3 inverted."""

    def training_target(self, x0: Tensor, noise: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return noise

    def predict_x0(self, x_t: Tensor, prediction: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return (x_t - s * prediction) / a

    def weights_from_eps(self, eps_weights: Tensor, snr: Tensor) -> Tensor:
        return eps_weights


class Data:
    """x0 (AAAI Eq. 5): MSE_x0 = MSE_ε/SNR, so w_x0 = w_ε·SNR."""

    def training_target(self, x0: Tensor, noise: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return x0

    def predict_x0(self, x_t: Tensor, prediction: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return prediction

    def weights_from_eps(self, eps_weights: Tensor, snr: Tensor) -> Tensor:
        return eps_weights * snr


class Velocity:
    """v = a·ε − s·x0, x̂0 = a·x_t − s·v̂ (Salimans & Ho 2022 Sec. 4): MSE_v = MSE_ε/a², so
    w_v = w_ε·SNR/(1 + SNR)."""

    def training_target(self, x0: Tensor, noise: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return a * noise - s * x0

    def predict_x0(self, x_t: Tensor, prediction: Tensor, a: Tensor, s: Tensor) -> Tensor:
        return a * x_t - s * prediction

    def weights_from_eps(self, eps_weights: Tensor, snr: Tensor) -> Tensor:
        return eps_weights * snr / (1.0 + snr)


def register_target(name: str, target: PredictionTarget) -> None:
    """Make `target` trainable as `diffusion.target: name`; a name is registered once."""
    TARGETS.register(name, target)


def prediction_target(name: str) -> PredictionTarget:
    """The registered target `name` (a one-line error naming the registered ones if none)."""
    target: PredictionTarget = TARGETS.get(name).implementation
    return target


register_target("eps", Epsilon())
register_target("x0", Data())
register_target("v", Velocity())
