"""Timestep samplers for training: uniform, and the AAAI 2024 curriculum (CLTS, Eqs. 6–7).

Every sampler returns int64 timesteps on the generator's device and optional per-sample loss
weights; the training loop multiplies the losses by the weights when they are not None.
"""

from typing import Protocol

import torch
from torch import Tensor


class TimestepSampler(Protocol):
    """A distribution over {0, …, T−1} that may change with the training iteration."""

    def probabilities(self, iteration: int) -> Tensor:
        """P(t) as float64 of shape (T,), summing to 1."""
        ...

    def sample(
        self, batch_size: int, iteration: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """(t, weights): int64 timesteps (B,) and optional loss weights (B,)."""
        ...

    def metrics(self, iteration: int) -> dict[str, float]:
        """Values worth logging at this iteration."""
        ...


def _check_iteration(iteration: int) -> None:
    if iteration < 0:
        raise ValueError(f"iteration must be non-negative, got {iteration}")


class UniformSampler:
    """U(t) = 1/T, the usual DDPM timestep distribution."""

    def __init__(self, num_timesteps: int) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def probabilities(self, iteration: int) -> Tensor:
        _check_iteration(iteration)
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, iteration: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        _check_iteration(iteration)
        t = torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=generator.device
        )
        return t, None

    def metrics(self, iteration: int) -> dict[str, float]:
        return {}


def discrete_gaussian(num_timesteps: int, mu: float, sigma: float) -> Tensor:
    """AAAI Eq. 6 evaluated at t ∈ {0, …, T−1} and renormalised over that set (float64)."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    # The 1/(σ√2π) factor cancels in the renormalisation.
    density = torch.exp(-((t - mu) ** 2) / (2.0 * sigma**2))
    return density / density.sum()


class CLTSSampler:
    """Curriculum Learning-based Timestep Schedule, AAAI 2024 Eq. 7.

    P(t) = (1 − γ)·U(t) + γ·N(t; μ, σ) with γ = min(iteration / target_iteration, 1).
    CLTS is a curriculum, not importance sampling: it returns no loss weights.
    """

    def __init__(self, num_timesteps: int, mu: float, sigma: float, target_iteration: int) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
        if not 0 <= mu < num_timesteps:
            raise ValueError(f"CLTS mu must lie in [0, {num_timesteps}), got {mu}")
        if not sigma > 0:
            raise ValueError(f"CLTS sigma must be positive, got {sigma}")
        if target_iteration <= 0:
            raise ValueError(f"CLTS target_iteration must be positive, got {target_iteration}")
        self.num_timesteps = num_timesteps
        self.target_iteration = target_iteration
        self.gaussian = discrete_gaussian(num_timesteps, mu, sigma)

    def gamma(self, iteration: int) -> float:
        """AAAI Eq. 7's mixing factor, held at 1 after the target iteration."""
        _check_iteration(iteration)
        return min(iteration / self.target_iteration, 1.0)

    def probabilities(self, iteration: int) -> Tensor:
        gamma = self.gamma(iteration)
        return (1.0 - gamma) / self.num_timesteps + gamma * self.gaussian

    def sample(
        self, batch_size: int, iteration: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        probabilities = self.probabilities(iteration).to(generator.device)
        t = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
        return t, None

    def metrics(self, iteration: int) -> dict[str, float]:
        return {"timesteps/gamma": self.gamma(iteration)}
