"""A toy prediction target `diffusion.target: toy_negated_eps`: the network learns −ε.

x̂0 = (x_t + s·(−ε̂))/a inverts AAAI Eq. 3; its MSE equals the ε-MSE, so ε's weights apply.
The reverse mean is PredictionTarget's: the posterior mean at x̂0.
`CALLS` counts what training and sampling asked of it.
"""

from __future__ import annotations

from collections import Counter

from torch import Tensor

from dmstab.diffusion.targets import PredictionTarget, StepCoefficients, register_target

CALLS: Counter[str] = Counter()


class NegatedEpsilon(PredictionTarget):
    def training_target(self, x0: Tensor, noise: Tensor, c: StepCoefficients) -> Tensor:
        CALLS["training_target"] += 1
        return -noise

    def predict_x0(self, x_t: Tensor, prediction: Tensor, c: StepCoefficients) -> Tensor:
        CALLS["predict_x0"] += 1
        return (x_t + c.s * prediction) / c.a

    def weights_from_eps(self, eps_weights: Tensor, c: StepCoefficients) -> Tensor:
        return eps_weights


register_target("toy_negated_eps", NegatedEpsilon())
