"""Training objectives: what one batch of clean data costs under a recipe's formulation.

An objective turns (model, x0, labels, noise, generator, step) into per-sample losses, in three
parts a distributed step calls separately: `draw` makes every per-sample random choice of the
whole global batch (identical on every rank), `terms` computes the losses of some of its rows,
and `learn` feeds the whole batch's losses back (a loss-aware timestep sampler). `DDPM`
draws timesteps from the recipe's sampler (uniform, CLTS of AAAI Eqs. 6–7, shifted Gaussian or
loss-aware importance sampling) and uses the ε/x0/v losses (Eqs. 4–5) with the recipe's loss
weighting;
`EDM` draws ln σ ~ N(P_mean, P_std²) and uses EDM2's loss with learned uncertainty (Eq. 21),
with labels dropped at `label_dropout` for classifier-free guidance.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmstab.config import Recipe
from dmstab.diffusion import build_diffusion, build_timestep_sampler
from dmstab.diffusion.edm import EDMPrecond, edm2_loss, sample_sigmas
from dmstab.diffusion.weighting import mse_weights

Draws = dict[str, Tensor]
"""A batch's per-sample random draws (timesteps, σ, label keep masks), one row per sample."""

# The DDPM per-sample loss before importance weights: what a loss-aware sampler learns from.
LOSS_BEFORE_IMPORTANCE = "loss_before_importance"


def take_rows(draws: Draws, rows: range) -> Draws:
    """The draws of rows `rows` of the batch."""
    return {key: value[rows.start : rows.stop] for key, value in draws.items()}


class Objective(Protocol):
    def draw(self, batch: int, step: int, generator: torch.Generator) -> Draws:
        """Every per-sample random draw of a batch of `batch` rows (on the CPU)."""
        ...

    def terms(
        self,
        model: nn.Module,
        x0: Tensor,
        labels: Tensor | None,
        noise: Tensor,
        draws: Draws,
        step: int,
    ) -> dict[str, Tensor]:
        """Per-sample terms (B,) of rows with these draws; "loss" is the one to minimise."""
        ...

    def learn(self, draws: Draws, terms: dict[str, Tensor], accept: Tensor | None = None) -> None:
        """Feed back the terms of the whole batch `draws` was made for, where the boolean tensor
        `accept` is True (a step the loss guard let through)."""
        ...

    def metrics(self, step: int) -> dict[str, float]:
        """Scalars describing the objective at `step` (e.g. the CLTS mixing weight γ)."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """What a resumed run needs besides the model (e.g. an importance sampler's history)."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class DDPMObjective:
    """Discrete timesteps from the recipe's sampler; counts kept for the histogram figure."""

    def __init__(self, recipe: Recipe) -> None:
        self.config = recipe.diffusion
        self.diffusion = build_diffusion(recipe)
        self.timesteps = build_timestep_sampler(recipe)
        self.sampler_name = recipe.timesteps.sampler
        self.timestep_counts = torch.zeros(recipe.diffusion.steps, dtype=torch.long)

    def draw(self, batch: int, step: int, generator: torch.Generator) -> Draws:
        t, weights = self.timesteps.sample(batch, step, generator)
        # counted where t is (a loss-aware sampler draws on the losses' device)
        self.timestep_counts = self.timestep_counts.to(t.device)
        self.timestep_counts += torch.bincount(t, minlength=self.timestep_counts.numel())
        draws = {"t": t}
        if weights is not None:  # importance-sampling weights; the curricula return none
            draws["weights"] = weights
        return draws

    def terms(
        self,
        model: nn.Module,
        x0: Tensor,
        labels: Tensor | None,
        noise: Tensor,
        draws: Draws,
        step: int,
    ) -> dict[str, Tensor]:
        t = draws["t"].to(x0.device)
        loss_weight = mse_weights(self.config, self.diffusion, t, step)
        terms = self.diffusion.training_losses(model, x0, t, noise, labels, loss_weight)
        if "weights" in draws:
            terms[LOSS_BEFORE_IMPORTANCE] = terms["loss"].detach()
            terms["loss"] = terms["loss"] * draws["weights"].to(x0.device)
        terms["loss_weight"] = loss_weight
        return terms

    def learn(self, draws: Draws, terms: dict[str, Tensor], accept: Tensor | None = None) -> None:
        # As improved-diffusion: the sampler learns from the per-sample loss before its own
        # importance weights (here: after the loss weighting, i.e. the objective minimised).
        losses = terms.get(LOSS_BEFORE_IMPORTANCE, terms["loss"]).detach()
        self.timesteps.update(draws["t"], losses, accept)

    def metrics(self, step: int) -> dict[str, float]:
        return self.timesteps.metrics(step)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"timesteps.{k}": v for k, v in self.timesteps.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        prefix = "timesteps."
        self.timesteps.load_state_dict(
            {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        )


class EDMObjective:
    """EDM2 training: log-normal σ, preconditioned denoiser, loss weighted by 1/e^u(σ) plus u."""

    def __init__(self, recipe: Recipe, num_classes: int) -> None:
        self.p_mean = recipe.diffusion.p_mean
        self.p_std = recipe.diffusion.p_std
        self.sigma_data = recipe.diffusion.sigma_data
        self.num_classes = num_classes
        self.label_dropout = recipe.diffusion.label_dropout

    def draw(self, batch: int, step: int, generator: torch.Generator) -> Draws:
        sigma = sample_sigmas(batch, self.p_mean, self.p_std, generator)
        keep = torch.rand(batch, generator=generator) >= self.label_dropout  # unused if no labels
        return {"sigma": sigma, "keep": keep}

    def terms(
        self,
        model: nn.Module,
        x0: Tensor,
        labels: Tensor | None,
        noise: Tensor,
        draws: Draws,
        step: int,
    ) -> dict[str, Tensor]:
        if not isinstance(model, EDMPrecond):
            raise TypeError("the EDM objective trains an EDMPrecond denoiser")
        sigma = draws["sigma"].to(x0.device)
        one_hot = None
        if labels is not None:
            keep = draws["keep"][:, None].to(x0.device)
            one_hot = one_hot_labels(labels, self.num_classes) * keep
        logvar = model.logvar(sigma) if model.uncertainty is not None else None
        loss = edm2_loss(model, x0, sigma, noise, one_hot, logvar, self.sigma_data)
        terms = {"loss": loss}
        if logvar is not None:
            terms["logvar"] = logvar.detach()
        return terms

    def learn(self, draws: Draws, terms: dict[str, Tensor], accept: Tensor | None = None) -> None:
        return None

    def metrics(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"the EDM objective has no state; got {sorted(state)}")


def whole_batch_losses(
    objective: Objective,
    model: nn.Module,
    x0: Tensor,
    labels: Tensor | None,
    noise: Tensor,
    generator: torch.Generator,
    step: int,
) -> dict[str, Tensor]:
    """`draw`, `terms` and `learn` for one whole batch in one process: its per-sample terms."""
    draws = objective.draw(x0.shape[0], step, generator)
    terms = objective.terms(model, x0, labels, noise, draws, step)
    objective.learn(draws, terms)
    return terms


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Integer class labels (B,) → float32 one-hot (B, K), the EDM2 UNet's label input."""
    return F.one_hot(labels.long(), num_classes).to(torch.float32)


def build_objective(recipe: Recipe, num_classes: int) -> DDPMObjective | EDMObjective:
    if recipe.diffusion.formulation == "edm":
        return EDMObjective(recipe, num_classes)
    return DDPMObjective(recipe)
