"""Timestep samplers for training: uniform, the AAAI 2024 curriculum (CLTS, Eqs. 6–7), its
shifted-Gaussian first attempt, and improved-diffusion's loss-aware importance sampler.

Every sampler returns int64 timesteps on the generator's device and optional per-sample loss
weights; the objective multiplies the losses by the weights when they are not None. Only the
importance sampler learns from the losses it is fed (`update`) and has state to checkpoint.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from dmstab.devices import upload


class TimestepSampler(Protocol):
    """A distribution over {0, …, T−1} that may change with the iteration or the losses seen."""

    def probabilities(self, iteration: int) -> Tensor:
        """P(t) as float64 of shape (T,), summing to 1."""
        ...

    def sample(
        self, batch_size: int, iteration: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """(t, weights): int64 timesteps (B,) and optional float32 loss weights (B,)."""
        ...

    def metrics(self, iteration: int) -> dict[str, float]:
        """Values worth logging at this iteration."""
        ...

    def update(self, t: Tensor, losses: Tensor, accept: Tensor | None = None) -> None:
        """Feed back the per-sample losses of timesteps t (no-op unless loss-aware), unless the
        boolean tensor `accept` is False (a step the loss guard skipped)."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint must keep for a resumed run to draw the same timesteps."""
        ...

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None: ...


def _check_iteration(iteration: int) -> None:
    if iteration < 0:
        raise ValueError(f"iteration must be non-negative, got {iteration}")


def _check_num_timesteps(num_timesteps: int) -> None:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")


class ScheduledSampler(ABC):
    """Base of samplers whose P(t) depends on the iteration only: draws from probabilities(),
    returns no loss weights, ignores losses and has no state."""

    @abstractmethod
    def probabilities(self, iteration: int) -> Tensor:
        """P(t) as float64 of shape (T,), summing to 1."""

    def sample(
        self, batch_size: int, iteration: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        probabilities = self.probabilities(iteration).to(generator.device)
        t = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
        return t, None

    def metrics(self, iteration: int) -> dict[str, float]:
        return {}

    def update(self, t: Tensor, losses: Tensor, accept: Tensor | None = None) -> None:
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state; got {sorted(state)}")


class UniformSampler(ScheduledSampler):
    """U(t) = 1/T, the usual DDPM timestep distribution."""

    def __init__(self, num_timesteps: int) -> None:
        _check_num_timesteps(num_timesteps)
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


def _ramp(iteration: int, target_iteration: int) -> float:
    """min(iteration / target_iteration, 1): 0 at the start, 1 from the target iteration on."""
    _check_iteration(iteration)
    return min(iteration / target_iteration, 1.0)


def _check_gaussian(
    name: str, num_timesteps: int, mu: float, sigma: float, target_iteration: int
) -> None:
    _check_num_timesteps(num_timesteps)
    if not 0 <= mu < num_timesteps:
        raise ValueError(f"{name} mu must lie in [0, {num_timesteps}), got {mu}")
    if not sigma > 0:
        raise ValueError(f"{name} sigma must be positive, got {sigma}")
    if target_iteration <= 0:
        raise ValueError(f"{name} target_iteration must be positive, got {target_iteration}")


def discrete_gaussian(num_timesteps: int, mu: float, sigma: float) -> Tensor:
    """AAAI Eq. 6 evaluated at t ∈ {0, …, T−1} and renormalised over that set (float64)."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    # The 1/(σ√2π) factor cancels in the renormalisation.
    density = torch.exp(-((t - mu) ** 2) / (2.0 * sigma**2))
    return density / density.sum()


class CLTSSampler(ScheduledSampler):
    """Curriculum Learning-based Timestep Schedule, AAAI 2024 Eq. 7.

    P(t) = (1 − γ)·U(t) + γ·N(t; μ, σ) with γ = min(iteration / target_iteration, 1).
    CLTS is a curriculum, not importance sampling: it returns no loss weights.
    """

    def __init__(self, num_timesteps: int, mu: float, sigma: float, target_iteration: int) -> None:
        _check_gaussian("CLTS", num_timesteps, mu, sigma, target_iteration)
        self.num_timesteps = num_timesteps
        self.target_iteration = target_iteration
        self.gaussian = discrete_gaussian(num_timesteps, mu, sigma)

    def gamma(self, iteration: int) -> float:
        """AAAI Eq. 7's mixing factor, held at 1 after the target iteration."""
        return _ramp(iteration, self.target_iteration)

    def probabilities(self, iteration: int) -> Tensor:
        gamma = self.gamma(iteration)
        return (1.0 - gamma) / self.num_timesteps + gamma * self.gaussian

    def metrics(self, iteration: int) -> dict[str, float]:
        return {"timesteps/gamma": self.gamma(iteration)}


class ShiftedGaussianSampler(ScheduledSampler):
    """The AAAI 2024 paper's first attempt before CLTS (text before Eq. 7), a negative result:
    "shifting the Gaussian distribution as the mean transitions from T to 0".

    P(t) = N(t; μ_i, σ) over {0, …, T−1} (Eq. 6 renormalised), μ_i = (T−1) + (μ − (T−1))·r,
    r = min(iteration / target_iteration, 1); μ = 0 is the paper's literal "T to 0".
    A curriculum like CLTS: no loss weights.
    """

    def __init__(self, num_timesteps: int, mu: float, sigma: float, target_iteration: int) -> None:
        _check_gaussian("shifted Gaussian", num_timesteps, mu, sigma, target_iteration)
        self.num_timesteps = num_timesteps
        self.mu = mu
        self.sigma = sigma
        self.target_iteration = target_iteration

    def mean(self, iteration: int) -> float:
        """μ_i: T−1 at iteration 0, moving linearly to μ at target_iteration, then held."""
        start = self.num_timesteps - 1
        return start + (self.mu - start) * _ramp(iteration, self.target_iteration)

    def probabilities(self, iteration: int) -> Tensor:
        return discrete_gaussian(self.num_timesteps, self.mean(iteration), self.sigma)

    def metrics(self, iteration: int) -> dict[str, float]:
        return {"timesteps/mean": self.mean(iteration)}


class LossSecondMomentSampler:
    """improved-diffusion's LossSecondMomentResampler (Nichol & Dhariwal 2021 Sec. 3.3).

    Keeps the last `history` losses of every timestep. Until every timestep has a full history
    it samples uniformly (weights 1); then p_t ∝ √(mean of the stored L_t²), mixed with
    uniform: p ← (1 − u)·p + u/T. Weights 1/(T·p_t) keep the loss estimate unbiased:
    E_p[w(t)·L(t)] = (1/T)·Σ_t L(t).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        _check_num_timesteps(num_timesteps)
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        if not 0.0 <= uniform_prob < 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1), got {uniform_prob}")
        self.num_timesteps = num_timesteps
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        """Whether every timestep has a full history of losses."""
        return bool((self.loss_counts == self.loss_history.shape[1]).all())

    def probabilities(self, iteration: int) -> Tensor:
        """P(t) on the history's device (the losses' device once training has fed it)."""
        _check_iteration(iteration)
        T = self.num_timesteps
        warmed_up = (self.loss_counts == self.loss_history.shape[1]).all()
        root_mean_square = self.loss_history.pow(2).mean(dim=1).sqrt()
        p = root_mean_square / root_mean_square.sum()
        uniform = torch.full((T,), 1.0 / T, dtype=torch.float64, device=p.device)
        mixed = p * (1.0 - self.uniform_prob) + self.uniform_prob / T
        return torch.where(warmed_up, mixed, uniform)

    def sample(
        self, batch_size: int, iteration: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """Draws by the inverse CDF, numpy's `choice(T, size, p=p)` that improved-diffusion
        calls: the uniforms come from `generator` (on any device the same ones), the CDF stays on
        the history's device, so that a step on a GPU reads nothing back."""
        probabilities = self.probabilities(iteration)
        cdf = torch.cumsum(probabilities, dim=0)
        cdf /= cdf[-1].clone()
        uniforms = torch.rand(
            batch_size, dtype=torch.float64, generator=generator, device=generator.device
        )
        # u < 1 = cdf[-1]: an index below T; timesteps of probability 0 are never drawn.
        t = torch.searchsorted(cdf, upload(uniforms, cdf.device), right=True)
        weights = 1.0 / (self.num_timesteps * probabilities[t])
        return t, weights.to(torch.float32)

    def update(self, t: Tensor, losses: Tensor, accept: Tensor | None = None) -> None:
        """Append each sample's loss to its timestep's history, in batch order, dropping the
        oldest when full; nothing when the boolean tensor `accept` is False (a skipped step).

        Non-finite losses are not recorded (the training loop reports the divergence). Runs as
        tensor operations on the losses' device (the history moves there), never on the host.
        """
        device, (T, full) = losses.device, self.loss_history.shape
        history, counts = self.loss_history.to(device), self.loss_counts.to(device)
        t = t.to(device, non_blocking=True)
        losses = losses.detach().to(torch.float64)
        valid = torch.isfinite(losses) if accept is None else torch.isfinite(losses) & accept
        # The k-th new loss of timestep s (batch order, valid ones only) is its rank k.
        keyed = torch.where(valid, t, T)  # invalid samples sort last, into a spare bucket T
        order = torch.sort(keyed, stable=True).indices
        new = torch.bincount(keyed, minlength=T + 1)
        first = torch.cumsum(new, 0) - new
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=device) - first[keyed[order]]
        # History + new losses, keeping the last `full`: old entries shift left by `drop`.
        new = new[:T]
        drop = torch.clamp(counts + new - full, min=0)
        slots = torch.arange(full, device=device)
        shifted = history.gather(1, torch.clamp(slots + drop[:, None], max=full - 1))
        history = torch.where(slots < (counts - drop)[:, None], shifted, history)
        position = counts[t.clamp(max=T - 1)] + rank - drop[t.clamp(max=T - 1)]
        kept = valid & (position >= 0)  # more new losses than `full`: the earliest fall out
        spare = torch.cat([history, torch.zeros(1, full, dtype=history.dtype, device=device)])
        rows = torch.where(kept, t, T)
        spare[rows, torch.where(kept, position, 0)] = torch.where(kept, losses, 0.0)
        self.loss_history = spare[:T]
        self.loss_counts = torch.clamp(counts + new, max=full)

    def metrics(self, iteration: int) -> dict[str, float]:
        return {"timesteps/warmed_up": float(self.warmed_up())}

    def state_dict(self) -> dict[str, Tensor]:
        history, counts = self.loss_history.cpu().clone(), self.loss_counts.cpu().clone()
        return {"loss_history": history, "loss_counts": counts}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        history, counts = state.get("loss_history"), state.get("loss_counts")
        if history is None or counts is None:
            raise ValueError("importance-sampler state needs loss_history and loss_counts")
        if history.shape != self.loss_history.shape or counts.shape != self.loss_counts.shape:
            raise ValueError(
                f"importance-sampler history {tuple(history.shape)} does not fit "
                f"{tuple(self.loss_history.shape)} (diffusion.steps, timesteps.history)"
            )
        self.loss_history = history.to(torch.float64).clone()
        self.loss_counts = counts.to(torch.long).clone()
