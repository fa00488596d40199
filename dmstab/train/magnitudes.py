"""Per-block weight and activation magnitudes over training (EDM2 Sec. 2.2–2.3, Fig. 3).

EDM2 Fig. 3 shows the activations of every block growing without bound in config C, the
weights growing in C and even more in D, and both held steady in config E (forced weight
normalisation). `MagnitudeMonitor` measures the same two quantities for the training network,
one value per encoder/middle/decoder block, named by the block's output resolution
(`enc.64x64.block0`, `dec.8x8.block3`, …):

- weights: the RMS of all conv-kernel and linear-matrix elements of the block (parameters with
  two or more dimensions; biases, norm scales and gains are left out). For one layer this is
  the RMS over output channels of ‖w_i‖₂/√fan_in, the per-unit norm of Sec. 2.2 on the scale
  where config E's forced weight normalisation (‖w_i‖² = fan_in, Eq. 66) reads exactly 1, the
  level Fig. 3's bottom row holds. Our copy of the paper lacks Appendix A, which details the
  figure, so the exact normalisation of its y-axes is not confirmed.
- activations: the RMS of the block's output over one fixed probe batch, read by forward hooks
  that exist only during the probe's no-grad, eval-mode forward pass (no dropout, no forced
  weight renormalisation, float32), so training steps are untouched.

The probe batch (images, noise, σ or timesteps, labels) is drawn once from `train.seed`, so
the curves of one run, and of runs with the same seed and data, are comparable step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dmstab.config import Recipe
from dmstab.data import ImageDataset
from dmstab.diffusion import build_diffusion
from dmstab.diffusion.edm import EDMPrecond, sample_sigmas
from dmstab.diffusion.objectives import one_hot_labels
from dmstab.errors import DmstabError
from dmstab.models.adm_unet import ADMUNet
from dmstab.models.edm2_unet import EDM2UNet
from dmstab.plots import magnitude_figure

ACTIVATION_PREFIX = "magnitude/act/"
WEIGHT_PREFIX = "magnitude/weight/"
MAGNITUDES_ARTIFACT = "magnitudes/magnitudes.png"
PROBE_MAX_IMAGES = 64  # never more than a training batch, so the probe fits where training does

Block = tuple[str, nn.Module]
Series = list[tuple[int, float]]


@dataclass(frozen=True)
class ProbeBatch:
    """One fixed network input: noisy images, their noise conditioning and labels.

    `noise_level` is σ for an EDM denoiser and the model time for a DDPM network, so
    `model(x, noise_level, labels)` is the call training makes either way.
    """

    x: Tensor
    noise_level: Tensor
    labels: Tensor | None


def probe_batch(recipe: Recipe, dataset: ImageDataset, device: torch.device) -> ProbeBatch:
    """Training-like noisy images, drawn once from `train.seed` on the CPU.

    EDM: x0 + σ·n with ln σ ~ N(P_mean, P_std²); DDPM: x_t of AAAI Eq. 3 with t ~ U{0..T−1}.
    """
    size = min(recipe.train.batch_size, PROBE_MAX_IMAGES, len(dataset))
    generator = torch.Generator().manual_seed(recipe.train.seed)
    indices = torch.randperm(len(dataset), generator=generator)[:size]
    x0, labels = (part.cpu() for part in dataset.get_batch(indices))  # a GPU-resident dataset
    noise = torch.randn(x0.shape, generator=generator)
    conditional = recipe.model.class_cond
    if recipe.diffusion.formulation == "edm":
        d = recipe.diffusion
        sigma = sample_sigmas(size, d.p_mean, d.p_std, generator)
        x, noise_level = x0 + sigma[:, None, None, None] * noise, sigma
        y = one_hot_labels(labels, dataset.num_classes) if conditional else None
    else:
        diffusion = build_diffusion(recipe)
        t = torch.randint(recipe.diffusion.steps, (size,), generator=generator)
        x_t = diffusion.q_sample(x0, t, noise)
        x, noise_level = diffusion.model_input(x_t, t), diffusion.model_time(t)  # FDM scales x_t
        y = labels if conditional else None
    return ProbeBatch(x.to(device), noise_level.to(device), None if y is None else y.to(device))


def named_blocks(model: nn.Module, resolution: int) -> list[Block]:
    """The blocks of an ADM or EDM2 UNet (inside EDMPrecond too), in forward order, named
    `enc|mid|dec.<R>x<R>.block<k>` by their output resolution R for `resolution`-pixel input."""
    net = model.net if isinstance(model, EDMPrecond) else model
    if isinstance(net, EDM2UNet):
        parts: list[tuple[str, Iterable[nn.Module]]] = [
            ("enc", net.encoder),
            ("dec", net.decoder),
        ]
    elif isinstance(net, ADMUNet):
        parts = [("enc", net.encoder), ("mid", [net.middle]), ("dec", net.decoder)]
    else:
        raise DmstabError(
            f"train.magnitudes_every works for adm_unet and edm2_unet, not {type(net).__name__}"
        )
    blocks: list[Block] = []
    counts: dict[str, int] = {}
    size = resolution
    for flavor, modules in parts:
        for block in modules:
            size = _output_resolution(block, size)
            level = f"{flavor}.{size}x{size}"
            counts[level] = counts.get(level, 0) + 1
            blocks.append((f"{level}.block{counts[level] - 1}", block))
    return blocks


def _output_resolution(block: nn.Module, size: int) -> int:
    """Halved by a downsampling block (resample_mode 'down', a stride-2 conv), doubled by an
    upsampling one ('up', nn.Upsample); each UNet block resamples at most once."""
    for module in block.modules():
        mode = getattr(module, "resample_mode", "none")
        if mode == "down" or (isinstance(module, nn.Conv2d) and module.stride == (2, 2)):
            return size // 2
        if mode == "up" or isinstance(module, nn.Upsample):
            return size * 2
    return size


@torch.no_grad()
def weight_magnitudes(blocks: Sequence[Block]) -> dict[str, float]:
    """RMS of each block's conv and linear weights: √(Σ‖W‖² / Σ numel) over its layers."""
    rms = []
    for _, block in blocks:
        weights = [p.detach().float() for p in block.parameters() if p.ndim >= 2]
        squares = torch.stack([w.square().sum() for w in weights]).sum()
        rms.append((squares / sum(w.numel() for w in weights)).sqrt())
    return dict(zip((name for name, _ in blocks), torch.stack(rms).tolist(), strict=True))


@torch.no_grad()
def activation_magnitudes(
    model: nn.Module, blocks: Sequence[Block], probe: ProbeBatch
) -> dict[str, float]:
    """RMS of each block's output on the probe batch, in eval mode; hooks and train mode are
    restored even if the forward pass fails."""
    rms: dict[str, Tensor] = {}
    was_training = model.training
    with _output_hooks(blocks, rms):
        model.eval()
        try:
            model(probe.x, probe.noise_level, probe.labels)
        finally:
            model.train(was_training)
    names = [name for name, _ in blocks]
    missing = [name for name in names if name not in rms]
    if missing:
        raise RuntimeError(f"blocks not reached by the forward pass: {', '.join(missing)}")
    return dict(zip(names, torch.stack([rms[name] for name in names]).tolist(), strict=True))


@contextmanager
def _output_hooks(blocks: Sequence[Block], sink: dict[str, Tensor]) -> Iterator[None]:
    """Forward hooks storing each block's output RMS into `sink`, removed on exit."""
    handles = [block.register_forward_hook(_rms_hook(name, sink)) for name, block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rms_hook(name: str, sink: dict[str, Tensor]) -> Callable[[nn.Module, Any, Tensor], None]:
    def store(module: nn.Module, inputs: Any, output: Tensor) -> None:
        sink[name] = output.detach().float().square().mean().sqrt()

    return store


def magnitude_metrics(
    model: nn.Module, blocks: Sequence[Block], probe: ProbeBatch
) -> dict[str, float]:
    """`magnitude/act/<block>` and `magnitude/weight/<block>` for every block."""
    activations = activation_magnitudes(model, blocks, probe)
    weights = weight_magnitudes(blocks)
    return {
        **{ACTIVATION_PREFIX + name: value for name, value in activations.items()},
        **{WEIGHT_PREFIX + name: value for name, value in weights.items()},
    }


class MagnitudeMonitor:
    """Measures one training network on its fixed probe batch; keeps every measurement for
    the figure (in memory: after a resume, only the steps since the resume)."""

    def __init__(
        self, model: nn.Module, recipe: Recipe, dataset: ImageDataset, device: torch.device
    ) -> None:
        self.model = model
        self.blocks = named_blocks(model, recipe.data.resolution)
        self.probe = probe_batch(recipe, dataset, device)
        self.history: dict[str, Series] = {}

    def measure(self, step: int) -> dict[str, float]:
        metrics = magnitude_metrics(self.model, self.blocks, self.probe)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, value))
        return metrics

    def figure(self) -> Any:
        """EDM2 Fig. 3 for this run: activations and weights per block against the step."""
        return magnitude_figure(
            dict(_strip(self.history, ACTIVATION_PREFIX)), dict(_strip(self.history, WEIGHT_PREFIX))
        )


def _strip(history: dict[str, Series], prefix: str) -> Iterator[tuple[str, Series]]:
    for key, series in history.items():
        if key.startswith(prefix):
            yield key.removeprefix(prefix), series
