"""Evaluation during training (recipe `eval:`): FID, KID and IS of the model at chosen steps.

The feature network and the reference statistics are resolved when the Evaluator is built,
before training starts, so missing Inception weights or a bad reference stop a run at once.
Each evaluation generates `eval.num_images` with the recipe's sampler and the same seed, so
the curve over steps compares the same noise; each batch of images goes from the sampler to
the feature network on the device (no PNG, no host round trip), and only features are kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dmstab.analysis.scoring import (
    FeaturePipeline,
    image_metrics,
    load_reference,
    network_pipeline,
    require_images,
)
from dmstab.config import EvalConfig, Recipe
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError
from dmstab.models.generate import gather_rows, generated_batches
from dmstab.train.restore import load_guide

METRIC_PREFIX = "eval/"


def feature_pipeline(ev: EvalConfig, device: torch.device) -> FeaturePipeline:
    """The network `eval.features` names (dmstab.analysis.scoring.network_pipeline)."""
    if ev.features != "inception" and "is" in ev.metrics:
        raise DmstabError("eval.metrics 'is' needs eval.features: inception (its 1008 classes)")
    return network_pipeline(ev.features, ev.mode, ev.inception_weights, device, ev.batch_size)


class Evaluator:
    """Scores a model under training against fixed reference statistics (recipe `eval:`)."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        num_classes: int,
        device: torch.device,
        context: DistributedContext = SINGLE_PROCESS,
    ) -> None:
        """Only rank 0 of `context` scores, so only it loads (and caches) the reference."""
        ev = recipe.eval
        require_images(recipe, device)  # a missing VAE stops training before it starts
        self.recipe = recipe
        self.config = ev
        self.num_classes = num_classes
        self.device = device
        self.context = context
        self.pipeline = feature_pipeline(ev, device)  # missing weights stop everything here
        source = Path(ev.reference).expanduser() if ev.reference else recipe.data
        self.reference = (
            load_reference(source, self.pipeline, with_features="kid" in ev.metrics)
            if context.is_main
            else None
        )
        self.sample = dataclasses.replace(
            recipe.sample,
            num_images=ev.num_images,
            batch_size=ev.batch_size,
            sampler=ev.sampler or recipe.sample.sampler,
            steps=ev.steps or recipe.sample.steps,
        )
        self.guide = load_guide(recipe, device)

    def due(self, step: int) -> bool:
        """At the steps in `eval.at`, every `eval.every` steps, and at the last step."""
        every = self.config.every
        return (
            step in self.config.at
            or (every > 0 and step % every == 0)
            or step == self.recipe.train.total_steps
        )

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """`eval/fid`, `eval/kid`, `eval/is` (as `eval.metrics` asks) of `model`'s samples.

        Under torchrun (call it on every rank) each rank samples and featurises its share of
        the images; rank 0 scores the gathered features and every rank returns its numbers.
        """
        images = generated_batches(  # each batch goes from the sampler to the network on device
            model,
            self.recipe,
            dataset_classes=self.num_classes,
            device=self.device,
            sample=self.sample,
            guide=self.guide,
            context=self.context,
        )
        context = self.context
        features = gather_rows(self.pipeline.features(images), self.device, context)
        metrics: dict[str, float] = {}
        if context.is_main:
            assert self.reference is not None, "rank 0 loads the reference"
            scores = image_metrics(features, self.reference, self.pipeline, self.config.metrics)
            metrics = {METRIC_PREFIX + name: value for name, value in scores.items()}
        shared = context.broadcast_object(metrics)
        assert isinstance(shared, dict)
        return shared


def build_evaluator(
    recipe: Recipe,
    *,
    num_classes: int,
    device: torch.device,
    context: DistributedContext = SINGLE_PROCESS,
) -> Evaluator | None:
    """The recipe's Evaluator, or None when `eval.every` is 0 and `eval.at` is empty."""
    if not (recipe.eval.every or recipe.eval.at):
        return None
    return Evaluator(recipe, num_classes=num_classes, device=device, context=context)
