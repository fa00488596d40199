"""FID end to end (resize to 299, features, statistics, Fréchet distance) by dmstab's batched
pipeline against clean-fid's own, both in "clean" mode with the identical feature network, and
the resize stage alone.

clean-fid's side is its generator path, `cleanfid.fid.get_model_features` (each image through
`build_resizer("clean")`, PIL's bicubic on one CPU thread, then `get_batch_features`, batch by
batch), np.mean / np.cov and its `frechet_distance`; dmstab's is `compute_stats` (the whole
batch resized by `resize_clean` on the device, then the network) and `fid_from_stats`. Both
score the same generated images against reference statistics each computed once, untimed, by
its own pipeline from the same reference images. The network is Inception-v3 (pytorch-fid's
FID variant, `pytorch_fid_inception_v3`) with seeded random weights, since no weights are
downloaded here; the toy size takes dmstab's small `RandomConvFeatures` instead.

Targets (issue 17): the same score to 0.1%, end to end no slower than clean-fid's pipeline,
and the resize stage alone at least 3× faster (its outputs equal to 1e-3 on 0..255).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from cleanfid.fid import get_model_features
from cleanfid.resize import build_resizer
from torch import nn

from benchmarks.harness import Comparison, Side, Size, describe_device, measure
from dmstab.analysis.features import (
    PytorchFidInception,
    RandomConvFeatures,
    extractor_for,
    pytorch_fid_inception_v3,
)
from dmstab.analysis.fid import compute_stats, fid_from_stats
from dmstab.analysis.frechet import FeatureStats
from dmstab.analysis.resize import resize_clean
from dmstab.data.synthetic import generate_shapes

MODE = "clean"
SCORE_AGREEMENT = 1e-3  # "the same score to 0.1%"
# PIL and dmstab sum the same float64 terms in other orders: a float32 output may differ in its
# last bit. The FID tests hold the resize to 1e-3 on the 0..255 scale (issue 4).
RESIZE_TOLERANCE = 1e-3

# generated and reference images (32x32 synthetic shapes), feature batch, images resized alone,
# timed rounds of the end-to-end and of the resize comparison
SIZES: dict[Size, tuple[int, int, int, int, int, int]] = {
    "toy": (16, 16, 8, 16, 1, 2),
    "cpu": (24, 24, 24, 256, 2, 5),
    "full": (50_000, 10_000, 250, 10_000, 1, 3),
}


def random_inception(seed: int = 0) -> nn.Module:
    """pytorch-fid's Inception-v3 up to pool3 with He-normal random convolutions from `seed`
    (the default initialisation shrinks the activations towards zero through the depth)."""
    network = PytorchFidInception(pytorch_fid_inception_v3())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                std = math.sqrt(2.0 / module.weight[0].numel())
                module.weight.copy_(std * torch.randn(module.weight.shape, generator=generator))
    return network.requires_grad_(False).eval()


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    yield from torch.split(images, batch_size)


def cleanfid_features(
    images: torch.Tensor, network: nn.Module, batch_size: int, device: torch.device
) -> np.ndarray:
    """clean-fid's generator path on `images`: a "generator" that hands out the next batch."""
    if len(images) % batch_size:
        raise ValueError(f"{len(images)} images do not split into batches of {batch_size}")
    batches = _batches(images, batch_size)
    features: np.ndarray = get_model_features(
        lambda _: next(batches),
        network,
        mode=MODE,
        z_dim=1,
        num_gen=len(images),
        batch_size=batch_size,
        device=device,
        verbose=False,
    )
    return features


def cleanfid_score(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    with warnings.catch_warnings():  # scipy's sqrtm(disp=False), deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(
            cleanfid_frechet_distance(
                np.mean(features, axis=0), np.cov(features, rowvar=False), mu, sigma
            )
        )


def cleanfid_resize(images: torch.Tensor) -> torch.Tensor:
    """clean-fid's resize stage as its generator path runs it: per image, HWC uint8 to PIL's
    float bicubic per channel, back to CHW, concatenated into a batch."""
    resize = build_resizer(MODE)
    return torch.cat(
        [
            torch.tensor(resize(image.permute(1, 2, 0).numpy()).transpose((2, 0, 1)))[None]
            for image in images
        ]
    )


def _pipelines(size: Size, device: torch.device) -> Comparison:
    generated_count, reference_count, batch, _, repeats, _ = SIZES[size]
    generated = generate_shapes(generated_count, 32, seed=1)[0]
    reference = generate_shapes(reference_count, 32, seed=2)[0]
    network = (RandomConvFeatures(dim=64) if size == "toy" else random_inception()).to(device)
    extractor = extractor_for(network, MODE)
    # Reference statistics once per pipeline (untimed; they warm both up).
    ours_reference = compute_stats(reference, extractor, device=device, batch_size=batch)
    theirs_reference = cleanfid_features(reference, network, batch, device)
    theirs_mu = np.mean(theirs_reference, axis=0)
    theirs_sigma = np.cov(theirs_reference, rowvar=False)
    scores: dict[str, float] = {}

    def dmstab_fid() -> float:
        stats: FeatureStats = compute_stats(generated, extractor, device=device, batch_size=batch)
        scores["dmstab"] = fid_from_stats(stats, ours_reference, device=device)
        return scores["dmstab"]

    def cleanfid_fid() -> float:
        features = cleanfid_features(generated, network, batch, device)
        scores["clean-fid"] = cleanfid_score(features, theirs_mu, theirs_sigma)
        return scores["clean-fid"]

    sides = [Side("dmstab", dmstab_fid), Side("clean-fid", cleanfid_fid)]
    results = measure(sides, device=device, warmup=0, repeats=repeats)
    relative = abs(scores["dmstab"] - scores["clean-fid"]) / abs(scores["clean-fid"])
    comparison = Comparison(
        benchmark="fid",
        title=f"FID end to end, {generated_count} images",
        config={
            "generated": generated_count,
            "reference": reference_count,
            "batch": batch,
            "network": type(network).__name__,
            "mode": MODE,
        },
        device=describe_device(device),
        sides=results,
        subject="dmstab",
        baseline="clean-fid",
        target="no slower, same score to 0.1%",
        checks={**scores, "relative_difference": relative},
    )
    comparison.met = comparison.ratio <= 1.0 and relative <= SCORE_AGREEMENT
    return comparison


def _resize_stage(size: Size, device: torch.device) -> Comparison:
    _, _, _, count, _, repeats = SIZES[size]
    images = generate_shapes(count, 32, seed=3)[0]
    on_device = images.to(device)
    outputs: dict[str, torch.Tensor] = {}

    def dmstab_resize() -> torch.Tensor:
        outputs["dmstab"] = resize_clean(on_device)
        return outputs["dmstab"]

    def reference_resize() -> torch.Tensor:
        outputs["clean-fid"] = cleanfid_resize(images)
        return outputs["clean-fid"]

    sides = [Side("dmstab resize_clean", dmstab_resize), Side("clean-fid PIL", reference_resize)]
    results = measure(sides, device=device, warmup=1, repeats=repeats)
    difference = float((outputs["dmstab"].cpu() - outputs["clean-fid"]).abs().max())
    comparison = Comparison(
        benchmark="fid",
        title=f"resize to 299, {count} images",
        config={"images": count, "from": "32×32 uint8", "mode": MODE},
        device=describe_device(device),
        sides=results,
        subject="dmstab resize_clean",
        baseline="clean-fid PIL",
        target="≥ 3× faster, equal to 1e-3",
        checks={
            "max_abs_difference": difference,
            "equal": bool(torch.equal(outputs["dmstab"].cpu(), outputs["clean-fid"])),
        },
    )
    comparison.met = comparison.ratio <= 1 / 3 and difference <= RESIZE_TOLERANCE
    return comparison


def run(size: Size, device: torch.device) -> list[Comparison]:
    return [_pipelines(size, device), _resize_stage(size, device)]
