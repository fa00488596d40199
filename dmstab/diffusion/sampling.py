"""What every sampler shares: fixed noise, the denoiser it calls, and the denoiser combinators.

A sampler is one function ``sample(denoise, noise, schedule, *, callback)`` (``Sampler``):
``denoise(x, level)`` is the network with its class labels bound (``with_labels``) and any
guidance mixed in (``guided``); ``noise`` gives x_T and every later draw; ``schedule`` holds
the levels the sampler walks and its options. DDPM and DDIM live in
dmstab.diffusion.ddpm_sampling, EDM's Heun in dmstab.diffusion.edm_sampling; they are found by
name in dmstab.diffusion.samplers.

"One seed fixes everything": every random draw comes from a NoiseSource whose per-image
streams depend only on (seed, image index). Two models sampled with the same seed therefore
see the same x_T and the same per-step noise, whatever the batch split; the consistency
experiment (AAAI 2024 Table 1) relies on this.

Guidance (EDM2 Sec. 5) mixes the main denoiser with a guide:
D_w = D_guide + w·(D_main − D_guide). The guide is a smaller unconditional model (EDM2's
low-cost guidance), a smaller, less trained model (EDM2's autoguidance), or the main model
without labels, ``unconditional(main)`` (classifier-free guidance, Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from dmstab.diffusion.edm import Denoiser
from dmstab.errors import DmstabError

Denoise = Callable[[Tensor, Tensor], Tensor]
"""denoise(x, level): a network with its labels bound. level is (B,): σ for an EDM denoiser,
the model time for a DDPM model (what it returns is then its ε, x0 or v prediction)."""

Callback = Callable[[int, int], None]
"""callback(done, total), run after each sampling step."""

CPU = torch.device("cpu")


class NoiseSource:
    """Gaussian noise for images first_index … first_index+count−1, one stream per image.

    Image i's stream is numpy's PCG64 seeded by SeedSequence([seed, first_index + i]).
    (A torch CPU generator keeps only the low 32 bits of its seed, so seed·2³² + index would
    give every seed the same noise, and a 32-bit hash would collide within ~10⁵ images.)
    The first ``next()`` is x_T; each later call is one sampling step's noise. Draws are made
    on the CPU and delivered on ``device``, where the sampler then works.
    """

    def __init__(
        self,
        seed: int,
        first_index: int,
        count: int,
        shape: tuple[int, int, int],
        device: torch.device = CPU,
    ) -> None:
        if seed < 0 or first_index < 0:
            raise ValueError(
                f"seed and first_index must be non-negative, got {seed}, {first_index}"
            )
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.count = count
        self.shape = shape
        self.device = device
        self._streams = [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, first_index + i])))
            for i in range(count)
        ]

    def next(self) -> Tensor:
        """The next draw of every image's stream: (count, C, H, W) float32 on ``device``."""
        draws = np.empty((self.count, *self.shape), dtype=np.float32)
        for stream, slot in zip(self._streams, draws, strict=True):
            stream.standard_normal(dtype=np.float32, out=slot)
        return torch.from_numpy(draws).to(self.device)


Schedule = TypeVar("Schedule", contravariant=True)


class Sampler(Protocol[Schedule]):
    """noise.count samples (count, C, H, W) on noise.device from denoise, walking schedule."""

    def __call__(
        self,
        denoise: Denoise,
        noise: NoiseSource,
        schedule: Schedule,
        *,
        callback: Callback | None = None,
    ) -> Tensor: ...


def with_labels(network: Denoiser, labels: Tensor | None) -> Denoise:
    """network(x, level, labels) with labels bound: one row per image, or None (no labels)."""

    def labelled(x: Tensor, level: Tensor) -> Tensor:
        if labels is not None and labels.shape[0] != x.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {x.shape[0]} images")
        return network(x, level, labels)

    return labelled


def unconditional(network: Denoiser) -> Denoiser:
    """The network with its class labels dropped: the guide of classifier-free guidance."""

    def without_labels(x: Tensor, level: Tensor, labels: Tensor | None) -> Tensor:
        return network(x, level, None)

    return without_labels


def guided(denoise: Denoise, guide: Denoise | None, guidance: float) -> Denoise:
    """D_guide + w·(D_main − D_guide) (EDM2 Sec. 5); the main denoiser alone when w = 1."""
    if not math.isfinite(guidance):
        raise DmstabError(f"guidance is {guidance}; must be a finite number (1 = no guidance)")
    if guidance == 1.0:
        return denoise
    if guide is None:
        raise DmstabError(f"guidance is {guidance} but no guide model was given; use 1 or a guide")

    def mixed(x: Tensor, level: Tensor) -> Tensor:
        main = denoise(x, level)
        return torch.lerp(guide(x, level), main, guidance)

    return mixed
