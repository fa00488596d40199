"""Feature extractors for FID: clean-fid's Inception-v3 networks from local files, and a test net.

A *network* follows clean-fid's feature-model contract: float32 (N, 3, H, W) images on the
0..255 scale, already preprocessed for the mode, to (N, D) features. An *extractor* is the
whole pipeline on uint8 images: the mode's preprocessing, then the network.

clean-fid downloads its weights at first use; dmstab never does. The file comes from
`--inception-weights PATH`, the DMSTAB_INCEPTION_WEIGHTS environment variable or
~/.cache/dmstab/, each a file or the folder holding it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import nn

from dmstab.analysis.resize import INCEPTION_SIZE, Preprocess, preprocessor
from dmstab.errors import DmstabError
from dmstab.reading import not_a, read_torch, read_torchscript

WEIGHTS_ENV = "DMSTAB_INCEPTION_WEIGHTS"
INCEPTION_FEATURES = 2048  # pool_3
INCEPTION_CLASSES = 1008
BIAS_STD = 0.1  # RandomConvFeatures: small random biases keep its ReLUs asymmetric
INPUT_OFFSET = 128.0  # clean-fid's InceptionV3W: (x - 128) / 128 maps 0..255 to [-1, 1)


@dataclass(frozen=True)
class WeightsFile:
    name: str
    url: str


# The StyleGAN2-ADA TorchScript port of TF Inception (clean-fid's `clean`, `legacy_tensorflow`).
TORCHSCRIPT_INCEPTION = WeightsFile(
    "inception-2015-12-05.pt",
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt",
)
# pytorch-fid's port of the same network (clean-fid's `legacy_pytorch`).
PYTORCH_FID_INCEPTION = WeightsFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
)
WEIGHTS_FOR_MODE = {
    "clean": TORCHSCRIPT_INCEPTION,
    "legacy_tensorflow": TORCHSCRIPT_INCEPTION,
    "legacy_pytorch": PYTORCH_FID_INCEPTION,
}


class FeatureExtractor(Protocol):
    """uint8 (N, 3, H, W) images on the extractor's device -> (N, D) float features."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PreprocessedNetwork:
    """A FeatureExtractor: a mode's preprocessing (dmstab.analysis.resize), then a network."""

    preprocess: Preprocess
    network: nn.Module

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.network(self.preprocess(images)))


class RandomConvFeatures(nn.Module):
    """A fixed random conv net with global average pooling: a seeded stand-in for Inception.

    Cheap on a CPU, sensitive to blur (its first layer sees 4x4 patches), and deterministic in
    `seed` whatever the global RNG; it follows clean-fid's feature-model contract, so the same
    module runs in clean-fid's `custom_feat_extractor` path and in dmstab's.
    """

    def __init__(self, dim: int = 64, seed: int = 0, hidden: int = 16) -> None:
        super().__init__()
        # Built on the meta device, so the weights come from `seed` alone, not the global RNG.
        self.patches = nn.Conv2d(3, hidden, kernel_size=4, stride=4, device="meta")
        self.mix = nn.Conv2d(hidden, dim, kernel_size=3, stride=2, device="meta")
        self.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in (self.patches, self.mix):
                he_std = math.sqrt(2.0 / conv.weight[0].numel())
                for name, parameter in conv.named_parameters():
                    std = he_std if name == "weight" else BIAS_STD
                    parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - INPUT_OFFSET) / INPUT_OFFSET
        x = self.mix(torch.relu(self.patches(x)))
        return torch.relu(x).mean(dim=(2, 3))


class TorchscriptInception(nn.Module):
    """clean-fid's `InceptionV3W` on a loaded TorchScript file.

    `clean` feeds 299x299 images through `layers` after (x - 128) / 128; `legacy_tensorflow`
    calls the whole module with `return_features=True`, which resizes inside.
    """

    def __init__(self, scripted: nn.Module, resize_inside: bool) -> None:
        super().__init__()
        self.scripted = scripted
        self.resize_inside = resize_inside

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if self.resize_inside:
            return cast(torch.Tensor, self.scripted(images, return_features=True)).reshape(
                count, INCEPTION_FEATURES
            )
        if images.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"expected 299x299 images, got {tuple(images.shape)}")
        layers = cast(nn.Module, self.scripted.layers)
        features = layers((images - INPUT_OFFSET) / INPUT_OFFSET)
        return cast(torch.Tensor, features).reshape(count, INCEPTION_FEATURES)

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The softmax layer without its bias, as StyleGAN2-ADA's IS (`no_output_bias`)."""
        output = cast(nn.Linear, self.scripted.output)
        return features.to(output.weight.dtype) @ output.weight.T


def pytorch_fid_inception_v3() -> nn.Module:
    """pytorch-fid's FID Inception-v3 (torchvision's, 1008 classes, patched blocks), untrained."""
    # Imported here: torchvision brings torch._dynamo with it, seconds that a command refusing a
    # bad input should not wait. The FID variants of the mixed blocks are clean-fid's own classes.
    import torchvision
    from cleanfid.inception_pytorch import (
        FIDInceptionA,
        FIDInceptionC,
        FIDInceptionE_1,
        FIDInceptionE_2,
    )

    network = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=INCEPTION_CLASSES, init_weights=False
    )
    network.Mixed_5b = FIDInceptionA(192, pool_features=32)
    network.Mixed_5c = FIDInceptionA(256, pool_features=64)
    network.Mixed_5d = FIDInceptionA(288, pool_features=64)
    network.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    network.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    network.Mixed_7b = FIDInceptionE_1(1280)
    network.Mixed_7c = FIDInceptionE_2(2048)
    return cast(nn.Module, network)


POOL3_LAYERS = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
)


class PytorchFidInception(nn.Module):
    """clean-fid's `legacy_pytorch` network: pytorch-fid's Inception up to the final pooling."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.pool3 = nn.Sequential(*(getattr(network, name) for name in POOL3_LAYERS))
        self.fc = cast(nn.Linear, network.fc)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # clean-fid calls the network on x / 255, which maps it to 2x - 1.
        features = self.pool3(2.0 * (images / 255.0) - 1.0)
        return cast(torch.Tensor, features).reshape(images.shape[0], INCEPTION_FEATURES)

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The 1008-way classifier without its bias, as for the TorchScript network."""
        return features.to(self.fc.weight.dtype) @ self.fc.weight.T


def inception_weights_path(mode: str, weights: str | Path | None = None) -> Path:
    """The local weights file FID `mode` needs, or a DmstabError naming the file and its URL."""
    preprocessor(mode)  # validates the mode name
    needed = WEIGHTS_FOR_MODE[mode]
    env_value = os.environ.get(WEIGHTS_ENV)
    if weights is not None:
        path, source = Path(weights).expanduser(), "--inception-weights"
    elif env_value:
        path, source = Path(env_value).expanduser(), WEIGHTS_ENV
    else:
        path, source = Path.home() / ".cache" / "dmstab" / needed.name, "the default place"
    if path.is_dir():
        path = path / needed.name
    if not path.is_file():
        raise DmstabError(
            f"FID mode {mode!r} needs {needed.name} (download it from {needed.url}); "
            f"not found at {path} ({source}): put it there or pass --inception-weights PATH "
            f"or set {WEIGHTS_ENV}=PATH (the file or its folder); dmstab never downloads"
        )
    return path


WEIGHTS_KIND = "Inception weights file"


def _load_torchscript(path: Path, device: torch.device) -> nn.Module:
    scripted = read_torchscript(path, WEIGHTS_KIND, device)
    if not (hasattr(scripted, "layers") and hasattr(scripted, "output")):
        raise not_a(path, WEIGHTS_KIND, f"TorchScript, but not {TORCHSCRIPT_INCEPTION.name}")
    return cast(nn.Module, scripted.eval())


def _load_pytorch_fid(path: Path, device: torch.device) -> nn.Module:
    network = pytorch_fid_inception_v3()
    state = read_torch(path, WEIGHTS_KIND)
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError) as error:  # other weights, or not a state dict at all
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise not_a(path, WEIGHTS_KIND, f"not {PYTORCH_FID_INCEPTION.name}: {first_line}") from None
    return network.to(device)


def load_inception(
    mode: str, weights: str | Path | None = None, device: torch.device | None = None
) -> PytorchFidInception | TorchscriptInception:
    """clean-fid's Inception network for `mode`, from a local file, in eval mode on `device`."""
    path = inception_weights_path(mode, weights)
    device = device or torch.device("cpu")
    network: PytorchFidInception | TorchscriptInception
    if mode == "legacy_pytorch":
        network = PytorchFidInception(_load_pytorch_fid(path, device))
    else:
        scripted = _load_torchscript(path, device)
        network = TorchscriptInception(scripted, resize_inside=mode == "legacy_tensorflow")
    return network.requires_grad_(False).eval()


def extractor_for(network: nn.Module, mode: str) -> PreprocessedNetwork:
    """The FeatureExtractor clean-fid runs in `mode` with `network` as its feature model."""
    return PreprocessedNetwork(preprocessor(mode), network)
