"""A random-weight stand-in for StyleGAN2-ADA's inception-2015-12-05.pt (torchvision's
architecture, BatchNorm calibrated on one batch): the Inception paths run without a download."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dmstab.analysis.features import POOL3_LAYERS, TORCHSCRIPT_INCEPTION


def calibrated(network: nn.Module) -> nn.Module:
    """Random weights with BatchNorm statistics from one batch, so activations stay O(1)."""
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 1.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        network.train()(torch.rand(4, 3, 299, 299, generator=generator) * 2 - 1)
    return network.eval()


class StandInTorchscriptInception(nn.Module):
    """The call signature and attributes of StyleGAN2-ADA's inception-2015-12-05.pt."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(getattr(network, name) for name in POOL3_LAYERS))
        self.output = network.fc

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        return torch.softmax(self.output(features), dim=1)


def write_torchscript_inception(folder: Path) -> Path:
    """`folder` with a random-weight stand-in for inception-2015-12-05.pt written into it."""
    torch.manual_seed(0)
    network = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        scripted = torch.jit.script(StandInTorchscriptInception(calibrated(network)))
        torch.jit.save(scripted, str(folder / TORCHSCRIPT_INCEPTION.name))
    return folder
