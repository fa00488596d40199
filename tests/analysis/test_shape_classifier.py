"""The synthetic-shape classifier (`eval.features: classifier`): training, cache, FID features.

Every test shares one HOME for the module, so the 16 px classifier trains once (seconds on one
core) and the later tests load it; nothing touches the real ~/.cache. The tests that need the
trained classifier are `slow`: its training alone takes about 10 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from dmstab.analysis.fid import compute_features, fid_from_stats
from dmstab.analysis.frechet import FeatureStats
from dmstab.analysis.scoring import stats_cache
from dmstab.analysis.shape_classifier import (
    ClassifierConfig,
    TrainedClassifier,
    classifier_cache,
    classifier_extractor,
    classifier_file,
    classifier_key,
    load_or_train,
)
from dmstab.commands.fid import score
from dmstab.config import load_recipe
from dmstab.data.synthetic import CLASS_NAMES, generate_shapes, sample_scenes, shape_coverage
from dmstab.errors import DmstabError
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, Runner, store

CPU = torch.device("cpu")
RESOLUTION = 16  # TINY's data.resolution
SCORED = 1000  # images per set in the Fréchet-distance properties (features are 128-d)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def shared_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(scope="module")
def trained(home: Path) -> Iterator[tuple[TrainedClassifier, bool]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        yield load_or_train(RESOLUTION)


def _same_weights(first: TrainedClassifier, second: TrainedClassifier) -> bool:
    ours, theirs = first.network.state_dict(), second.network.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_the_classifier_tells_unseen_shapes_apart(
    trained: tuple[TrainedClassifier, bool], one_thread: None
) -> None:
    classifier, was_trained = trained
    assert was_trained, "a fresh HOME has no cached classifier"
    assert classifier.path.parent == classifier_cache()
    assert classifier.held_out_accuracy >= ClassifierConfig().min_accuracy
    assert 50_000 <= sum(p.numel() for p in classifier.network.parameters()) <= 200_000
    # Independently of the stored number: a fourth seed, every class on its own.
    images, labels = generate_shapes(1000, RESOLUTION, seed=4_000_004)
    with torch.no_grad():
        predicted = classifier.network(images.float()).argmax(dim=1)
    for label, name in enumerate(CLASS_NAMES):
        members = labels == label
        accuracy = (predicted[members] == label).double().mean().item()
        assert accuracy >= ClassifierConfig().min_accuracy, name


@pytest.mark.slow
def test_a_cached_classifier_is_loaded_not_retrained(
    trained: tuple[TrainedClassifier, bool],
) -> None:
    first, _ = trained
    written = first.path.stat().st_mtime_ns
    again, was_trained = load_or_train(RESOLUTION)
    assert not was_trained
    assert first.path.stat().st_mtime_ns == written
    assert again.held_out_accuracy == first.held_out_accuracy
    assert _same_weights(again, first)


@pytest.mark.slow
def test_a_corrupt_cache_file_is_retrained_to_the_same_weights(
    trained: tuple[TrainedClassifier, bool],
) -> None:
    first, _ = trained
    first.path.write_bytes(b"not a torch file")
    replaced, was_trained = load_or_train(RESOLUTION)
    assert was_trained
    assert replaced.path == first.path
    assert _same_weights(replaced, first), "training is deterministic"
    assert not load_or_train(RESOLUTION)[1], "the corrupt file was overwritten"
    assert sorted(p.name for p in classifier_cache().iterdir()) == [first.path.name]


def test_an_inaccurate_classifier_is_refused_and_not_cached() -> None:
    config = ClassifierConfig(steps=2, train_images=100, held_out_images=200)
    with pytest.raises(DmstabError, match=r"held-out accuracy, below the 90%"):
        load_or_train(RESOLUTION, config)
    assert not classifier_file(RESOLUTION, config).exists()


def test_the_cache_key_names_resolution_and_hyper_parameters() -> None:
    default = classifier_file(RESOLUTION, ClassifierConfig())
    assert classifier_file(32, ClassifierConfig()) != default
    assert classifier_file(RESOLUTION, ClassifierConfig(steps=999)) != default
    assert classifier_file(RESOLUTION, ClassifierConfig(train_seed=7)) != default
    assert classifier_file(RESOLUTION, ClassifierConfig()) == default


def _stats(images: torch.Tensor) -> FeatureStats:
    return FeatureStats.from_features(compute_features(images, classifier_extractor(), device=CPU))


def _blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    blurred: torch.Tensor = gaussian_blur(images.float(), 2 * int(3 * sigma) + 1, [sigma])
    return blurred.round().byte()


def _shapes_as_noise(images: torch.Tensor, seed: int, fraction: float) -> torch.Tensor:
    """The first `fraction` of the images with their shape's pixels replaced by uniform noise."""
    scenes = sample_scenes(len(images), seed)  # the scenes generate_shapes drew for `images`
    alpha = shape_coverage(scenes.labels, scenes.centres, scenes.sizes, images.shape[-1])
    chosen = (torch.arange(len(images)) < fraction * len(images)).float()
    alpha = alpha[:, None] * chosen[:, None, None, None]
    noise = 255 * torch.rand(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images.float() * (1 - alpha) + noise * alpha).round().byte()


@pytest.mark.slow
def test_frechet_distance_in_classifier_features_grows_with_blur_and_noise(
    trained: tuple[TrainedClassifier, bool], one_thread: None
) -> None:
    reference, _ = generate_shapes(SCORED, RESOLUTION, seed=11)
    other, _ = generate_shapes(SCORED, RESOLUTION, seed=12)
    reference_stats = _stats(reference)
    assert abs(fid_from_stats(_stats(reference), reference_stats)) < 1e-6
    independent = fid_from_stats(_stats(other), reference_stats)
    # Two draws of the same distribution differ by sampling error only: a small fraction of
    # the features' total variance.
    assert 0 < independent < 0.02 * np.trace(reference_stats.sigma)
    blurred = [fid_from_stats(_stats(_blurred(other, s)), reference_stats) for s in (0.5, 1, 2)]
    assert independent < blurred[0] < blurred[1] < blurred[2]
    noised = [
        fid_from_stats(_stats(_shapes_as_noise(other, 12, p)), reference_stats)
        for p in (0.25, 0.5, 1.0)
    ]
    assert independent < noised[0] < noised[1] < noised[2]


@pytest.mark.slow
def test_training_logs_eval_fid_in_classifier_features(
    trained: tuple[TrainedClassifier, bool],
) -> None:
    overrides = ["train.steps=2", "eval.at=[2]", "eval.features=classifier", "eval.num_images=16"]
    recipe = load_recipe(RECIPES / "quickstart.yaml", [*TINY, *overrides, "data.synthetic_size=32"])
    result = train(recipe)
    history = store().get_metric_history(result.run_id, "eval/fid")
    assert [m.step for m in history] == [2]
    assert np.isfinite(history[0].value) and history[0].value > 0
    key = classifier_key(ClassifierConfig())
    assert len(list(stats_cache().glob(f"synthetic-16-{key}-*.npz"))) == 1
    assert not list(stats_cache().glob("*random_conv*"))


def test_classifier_features_refuse_other_datasets() -> None:
    with pytest.raises(DmstabError, match="classifier knows the synthetic shapes only"):
        load_recipe(
            RECIPES / "quickstart.yaml",
            [*TINY, "eval.at=[1]", "eval.features=classifier", "data.name=npz", "data.root=x"],
        )


def _npz(path: Path, seed: int) -> Path:
    images, _ = generate_shapes(200, RESOLUTION, seed=seed)
    np.savez(path, images.permute(0, 2, 3, 1).numpy())
    return path


@pytest.mark.slow
def test_dmstab_fid_scores_in_classifier_features(
    trained: tuple[TrainedClassifier, bool], isolated_workdir: Path, dmstab: Runner
) -> None:
    first, second = _npz(isolated_workdir / "a.npz", 1), _npz(isolated_workdir / "b.npz", 2)
    scored = dmstab("fid", str(first), "--ref", str(second), "--features", "classifier", "--kid")
    assert scored.returncode == 0, scored.stderr
    assert scored.stdout.startswith("FID ") and "KID " in scored.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"features": "classifier", "with_is": True}, "Inception Score needs --features incep"),
        ({"features": "vgg"}, "choose one of inception, random_conv, classifier"),
    ],
)
def test_unusable_feature_choices_are_refused_before_scoring(
    options: dict[str, Any], message: str, isolated_workdir: Path
) -> None:
    first = _npz(isolated_workdir / "a.npz", 1)
    with pytest.raises(DmstabError, match=message):
        score(first, first, device=CPU, **options)
    assert not (isolated_workdir / "mlflow.db").exists(), "no run is logged"
