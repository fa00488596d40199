"""Prediction targets of the ddpm formulation, by name (`diffusion.target`).

With x_t = a·x0 + s·ε (AAAI Eq. 3; a = √ᾱ_t, s = √(1 − ᾱ_t), a² + s² = 1) a network can be
trained to output ε (AAAI Eq. 4), x0 (Eq. 5), v = a·ε − s·x0 (Salimans & Ho 2022 Sec. 4) or
x_{t−1}'s posterior mean (improved-diffusion's PREVIOUS_X). A target says four things: what
the network is trained to output, how x̂0 follows from its output, the mean of
p_θ(x_{t−1}|x_t) (the posterior mean at x̂0 unless the network predicts that mean itself), and
which weight on its MSE equals a given weight on the ε-MSE, so that a loss weighting
(dmstab.diffusion.weighting) is the same objective whatever the target.

A new target is one class with these methods (subclass ``PredictionTarget`` to inherit the
usual reverse mean) and one `register_target` call; its name is then a valid
`diffusion.target` for training, sampling and every analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from dmstab.config import TARGETS


@dataclass(frozen=True)
class StepCoefficients:
    """The forward process at each sample's timestep t, gathered from float64 tables.

    a = √ᾱ_t and s = √(1 − ᾱ_t) (x_t = a·x0 + s·ε, AAAI Eq. 3); q(x_{t−1} | x_t, x0) has mean
    posterior_x0·x0 + posterior_xt·x_t (Ho et al. 2020 Eq. 7); snr = ᾱ_t/(1 − ᾱ_t). Float32
    shaped (B, 1, …, 1) for the network's outputs, float64 shaped (B,) for loss weights.
    """

    a: Tensor
    s: Tensor
    posterior_x0: Tensor
    posterior_xt: Tensor
    snr: Tensor

    def posterior_mean(self, x0: Tensor, x_t: Tensor) -> Tensor:
        """Ho et al. 2020 Eq. 7: μ̃(x_t, x0) = posterior_x0·x0 + posterior_xt·x_t."""
        return self.posterior_x0 * x0 + self.posterior_xt * x_t


class PredictionTarget(Protocol):
    """What a network of the ddpm formulation is trained to output (`c`: StepCoefficients)."""

    def training_target(self, x0: Tensor, noise: Tensor, c: StepCoefficients) -> Tensor:
        """What the network is trained to output for x_t = c.a·x0 + c.s·noise."""
        ...

    def predict_x0(self, x_t: Tensor, prediction: Tensor, c: StepCoefficients) -> Tensor:
        """x̂0 implied by the network's output `prediction` at x_t."""
        ...

    def reverse_mean(
        self, x_t: Tensor, prediction: Tensor, x0_estimate: Tensor, c: StepCoefficients
    ) -> Tensor:
        """The mean of p_θ(x_{t−1} | x_t): Ho et al. 2020 Eq. 11's μ̃(x_t, x̂0), with
        `x0_estimate` the x̂0 sampling uses (clipped when it clips)."""
        return c.posterior_mean(x0_estimate, x_t)

    def weights_from_eps(self, eps_weights: Tensor, c: StepCoefficients) -> Tensor:
        """The weight on this target's MSE that gives the loss `eps_weights` gives on the
        ε-MSE (float64 `c`; dmstab.diffusion.weighting derives the ratios)."""
        ...


class Epsilon(PredictionTarget):
    """ε (AAAI Eq. 4): x̂0 = (x_t − s·ε̂)/a, Eq. 3 inverted."""

    def training_target(self, x0: Tensor, noise: Tensor, c: StepCoefficients) -> Tensor:
        return noise

    def predict_x0(self, x_t: Tensor, prediction: Tensor, c: StepCoefficients) -> Tensor:
        return (x_t - c.s * prediction) / c.a

    def weights_from_eps(self, eps_weights: Tensor, c: StepCoefficients) -> Tensor:
        return eps_weights


class Data(PredictionTarget):
    """x0 (AAAI Eq. 5): MSE_x0 = MSE_ε/SNR, so w_x0 = w_ε·SNR."""

    def training_target(self, x0: Tensor, noise: Tensor, c: StepCoefficients) -> Tensor:
        return x0

    def predict_x0(self, x_t: Tensor, prediction: Tensor, c: StepCoefficients) -> Tensor:
        return prediction

    def weights_from_eps(self, eps_weights: Tensor, c: StepCoefficients) -> Tensor:
        return eps_weights * c.snr


class Velocity(PredictionTarget):
    """v = a·ε − s·x0, x̂0 = a·x_t − s·v̂ (Salimans & Ho 2022 Sec. 4): MSE_v = MSE_ε/a², so
    w_v = w_ε·SNR/(1 + SNR)."""

    def training_target(self, x0: Tensor, noise: Tensor, c: StepCoefficients) -> Tensor:
        return c.a * noise - c.s * x0

    def predict_x0(self, x_t: Tensor, prediction: Tensor, c: StepCoefficients) -> Tensor:
        return c.a * x_t - c.s * prediction

    def weights_from_eps(self, eps_weights: Tensor, c: StepCoefficients) -> Tensor:
        return eps_weights * c.snr / (1.0 + c.snr)


class PreviousX(PredictionTarget):
    """x_{t−1}'s posterior mean μ̃(x_t, x0) (Ho et al. 2020 Eq. 7; improved-diffusion's
    PREVIOUS_X). x̂0 = (μ̂ − posterior_xt·x_t)/posterior_x0, and μ̂ itself is the reverse mean,
    unclipped even when x̂0 is clipped, as improved-diffusion's p_mean_variance has it.
    μ̃ − μ̂ = posterior_x0·(x0 − x̂0), so MSE_μ = posterior_x0²·MSE_ε/SNR and
    w_μ = w_ε·SNR/posterior_x0². The coefficients are the chain's own: sampled over fewer steps
    (respaced), μ̂ would be read as the mean of the longer respaced step (improved-diffusion does
    so), which is why recipe validation allows only sampling with every trained step.
    """

    def training_target(self, x0: Tensor, noise: Tensor, c: StepCoefficients) -> Tensor:
        return c.posterior_mean(x0, c.a * x0 + c.s * noise)

    def predict_x0(self, x_t: Tensor, prediction: Tensor, c: StepCoefficients) -> Tensor:
        return (prediction - c.posterior_xt * x_t) / c.posterior_x0

    def reverse_mean(
        self, x_t: Tensor, prediction: Tensor, x0_estimate: Tensor, c: StepCoefficients
    ) -> Tensor:
        return prediction

    def weights_from_eps(self, eps_weights: Tensor, c: StepCoefficients) -> Tensor:
        return eps_weights * c.snr / c.posterior_x0**2


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
register_target("previous_x", PreviousX())
