"""A toy analysis `dmstab analyse weight_norm`: the ‖θ‖_p of a trained model's weights.

Its recipe section is `weight_norm:` with the key `p`; its check refuses p < 1. It logs the
metric `weight_norm/total` to a new MLflow run of kind "weight_norm", like every analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from dmstab.commands.study import open_analysis
from dmstab.commands.subjects import subjects_from_arguments
from dmstab.config import ANALYSES, AnalysisSection, Recipe
from dmstab.errors import DmstabError


@dataclass(frozen=True)
class WeightNormConfig(AnalysisSection):
    section: ClassVar[str] = "weight_norm"

    p: float = 2.0


def check(recipe: Recipe) -> None:
    p = recipe.analysis(WeightNormConfig).p
    if p < 1:
        raise DmstabError(f"weight_norm.p is {p}; must be at least 1 (a norm)")


def main(arguments: Sequence[str]) -> None:
    for subject in subjects_from_arguments(arguments):
        p = subject.recipe.analysis(WeightNormConfig).p
        model = subject.network(torch.device("cpu"), use_ema=True)
        weights = torch.cat([w.detach().flatten().double() for w in model.parameters()])
        with open_analysis(subject, "weight_norm") as run:
            run.tracker.log_metrics({"weight_norm/total": float(weights.norm(p))}, subject.step)


ANALYSES.register(WeightNormConfig.section, main, config=WeightNormConfig, check=check)
