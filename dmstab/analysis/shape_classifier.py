"""FID features that know the synthetic shapes: a small CNN trained to tell the ten classes apart.

Inception was trained on ImageNet photographs, and the random-conv stand-in on nothing; neither
knows what a synthetic image should contain. This classifier is trained on freshly generated
shapes (dmstab.data.synthetic) from seeds the diffusion model's training data does not use by
default, checked on a third seed, and its penultimate layer (global-average-pooled conv
features) is the feature space (`eval.features: classifier`, `dmstab fid --features
classifier`).

Training is deterministic: explicit generators for the weights, the data and the minibatches,
one CPU thread. The weights are cached under ~/.cache/dmstab/classifiers/, one file per
resolution, keyed by the hyper-parameters and a digest of the generator's output; a cache
file that does not load is retrained and overwritten. Images are scored at their own
resolution (no resize): the network for each resolution is loaded or trained at first use.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dmstab.analysis.features import INPUT_OFFSET, PreprocessedNetwork
from dmstab.checkpoint import load_checkpoint, save_checkpoint
from dmstab.data.synthetic import CLASS_NAMES, generate_shapes
from dmstab.devices import one_thread
from dmstab.errors import DmstabError

CLASSIFIER_KEY = "classifier"
PROBE_IMAGES, PROBE_RESOLUTION = 64, 32  # the generator's fingerprint in the cache key


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training of the shape classifier; every field is in its cache key."""

    widths: tuple[int, ...] = (16, 32, 64, 128)  # 3x3 convs, stride 2 after the first; last = D
    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 2e-3  # Adam
    train_images: int = 20_000
    held_out_images: int = 2_000
    # Not data.synthetic_seed's default 0: the classifier never sees the diffusion training set.
    train_seed: int = 1_000_001
    held_out_seed: int = 2_000_002
    init_seed: int = 0
    # Chance is 10%; trained as above it scores over 99% at 16 and 32 px (docs/synthetic.md).
    # Below 90% its features do not separate the classes, and its FID would miss wrong shapes.
    min_accuracy: float = 0.9


class ShapeClassifier(nn.Module):
    """Conv layers, global average pooling, a linear layer; float images on the 0..255 scale."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, len(CLASS_NAMES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, widths[-1]) penultimate-layer features."""
        pixels = (images - INPUT_OFFSET) / INPUT_OFFSET
        return cast(torch.Tensor, self.body(pixels)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.head(self.features(images)))


@dataclass(frozen=True)
class TrainedClassifier:
    """A classifier in eval mode, its accuracy on the held-out seed, and its cache file."""

    network: ShapeClassifier
    held_out_accuracy: float
    path: Path


def classifier_cache() -> Path:
    """Where trained classifiers are cached (read at call time, so HOME can move)."""
    return Path.home() / ".cache" / "dmstab" / "classifiers"


def classifier_digest(config: ClassifierConfig) -> str:
    """Names the hyper-parameters and the synthetic generator's output (a few probe images)."""
    images, labels = generate_shapes(PROBE_IMAGES, PROBE_RESOLUTION, seed=config.train_seed)
    hasher = hashlib.sha256(repr(config).encode())
    hasher.update(images.numpy().tobytes())
    hasher.update(labels.numpy().tobytes())
    return hasher.hexdigest()[:12]


def classifier_key(config: ClassifierConfig) -> str:
    """The feature pipeline's name in the statistics cache."""
    return f"{CLASSIFIER_KEY}-{classifier_digest(config)}"


def classifier_file(resolution: int, config: ClassifierConfig) -> Path:
    """The cache file of the `resolution` px classifier trained per `config`."""
    return classifier_cache() / f"shapes-{resolution}px-{classifier_digest(config)}.pt"


def _untrained(config: ClassifierConfig) -> ShapeClassifier:
    """Built on the meta device, so the global RNG is neither used nor seeded."""
    with torch.device("meta"):
        network = ShapeClassifier(config.widths)
    return network.to_empty(device="cpu")


def _initialise(network: ShapeClassifier, seed: int) -> None:
    """He-normal weights (He et al. 2015) from `seed`, zero biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            else:
                std = math.sqrt(2.0 / parameter[0].numel())
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))


@torch.no_grad()
def held_out_accuracy(network: ShapeClassifier, resolution: int, config: ClassifierConfig) -> float:
    """Fraction of `held_out_images` fresh images (seed `held_out_seed`) classified right."""
    images, labels = generate_shapes(config.held_out_images, resolution, config.held_out_seed)
    predicted = torch.cat(
        [network(batch.float()).argmax(dim=1) for batch in torch.split(images, 500)]
    )
    return (predicted == labels).double().mean().item()


def train_classifier(resolution: int, config: ClassifierConfig) -> tuple[ShapeClassifier, float]:
    """Adam on cross-entropy over minibatches drawn with replacement; the held-out accuracy.

    Gradients are on even when called while features are extracted (under inference mode).
    """
    with one_thread(), torch.inference_mode(False), torch.enable_grad():
        network = _untrained(config)
        _initialise(network, config.init_seed)
        images, labels = generate_shapes(config.train_images, resolution, config.train_seed)
        optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
        batches = torch.Generator().manual_seed(config.train_seed)
        for _ in range(config.steps):
            index = torch.randint(len(labels), (config.batch_size,), generator=batches)
            loss = F.cross_entropy(network(images[index].float()), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        network.eval().requires_grad_(False)
        return network, held_out_accuracy(network, resolution, config)


def _cached(path: Path, config: ClassifierConfig) -> TrainedClassifier | None:
    """The classifier in `path`, or None when it is missing, corrupt or not good enough."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
        network = _untrained(config)
        network.load_state_dict(state["model"])
        accuracy = float(state["held_out_accuracy"])
    except (DmstabError, RuntimeError, KeyError, TypeError, ValueError):
        return None
    if not accuracy >= config.min_accuracy:
        return None
    return TrainedClassifier(network.eval().requires_grad_(False), accuracy, path)


def load_or_train(
    resolution: int, config: ClassifierConfig | None = None
) -> tuple[TrainedClassifier, bool]:
    """The cached classifier for `resolution`, else a new one (cached); and whether it trained.

    A classifier below `min_accuracy` on held-out images is refused, not cached.
    """
    config = config or ClassifierConfig()
    path = classifier_file(resolution, config)
    cached = _cached(path, config)
    if cached is not None:
        return cached, False
    network, accuracy = train_classifier(resolution, config)
    if accuracy < config.min_accuracy:
        raise DmstabError(
            f"the {resolution}px shape classifier reached {accuracy:.1%} held-out accuracy, "
            f"below the {config.min_accuracy:.0%} its features need to judge shapes"
        )
    save_checkpoint({"model": network.state_dict(), "held_out_accuracy": accuracy}, path)
    return TrainedClassifier(network, accuracy, path), True


class ClassifierFeatures(nn.Module):
    """clean-fid's feature-model contract on the shape classifier of the images' resolution."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        self.by_resolution = nn.ModuleDict()

    def classifier(self, resolution: int) -> ShapeClassifier:
        """Loaded (or trained) once per resolution."""
        name = str(resolution)
        if name not in self.by_resolution:
            self.by_resolution[name] = load_or_train(resolution, self.config)[0].network
        return cast(ShapeClassifier, self.by_resolution[name])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height != width:
            raise DmstabError(f"classifier features score square images, got {height}x{width}")
        return self.classifier(width).to(images.device).features(images)


def native_resolution(images: torch.Tensor) -> torch.Tensor:
    """The classifier's preprocessing: uint8 to float32, same scale, no resize."""
    return images.to(torch.float32)


def classifier_extractor(config: ClassifierConfig | None = None) -> PreprocessedNetwork:
    """A FeatureExtractor: uint8 images at any resolution to the classifier's features."""
    return PreprocessedNetwork(native_resolution, ClassifierFeatures(config))
