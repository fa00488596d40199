"""FID core: Fréchet distance, KID and IS, clean-fid's resize, feature networks, the batched path.

Every parity check runs clean-fid itself (its resizers, its folder pipeline with a custom
feature extractor, its Inception wrappers on stand-in weight files) on the same images; no
test downloads anything.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from cleanfid.features import build_feature_extractor
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from dmstab.analysis.features import (
    PYTORCH_FID_INCEPTION,
    TORCHSCRIPT_INCEPTION,
    WEIGHTS_ENV,
    RandomConvFeatures,
    extractor_for,
    inception_weights_path,
    load_inception,
    pytorch_fid_inception_v3,
)
from dmstab.analysis.fid import compute_features, compute_stats, fid_from_stats
from dmstab.analysis.frechet import FeatureStats, frechet_distance, inception_score, kid
from dmstab.analysis.resize import pil_bicubic_matrix, preprocessor, resize_clean
from dmstab.data.synthetic import generate_shapes
from dmstab.errors import DmstabError
from tests.inception_standin import calibrated

CPU = torch.device("cpu")
# clean-fid's frechet_distance calls scipy.linalg.sqrtm(disp=False), deprecated in scipy 1.17.
sqrtm_deprecation = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
# clean-fid's InceptionV3W calls torch.jit.load, deprecated in recent torch.
torch_jit_deprecation = pytest.mark.filterwarnings("ignore:`torch.jit.load`:FutureWarning")


def noise_images(count: int, resolution: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (count, 3, resolution, resolution)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def shapes(count: int, resolution: int, seed: int) -> torch.Tensor:
    return generate_shapes(count, resolution, seed)[0]


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def write_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return folder


# ---------------------------------------------------------------- Fréchet distance


@sqrtm_deprecation
@pytest.mark.parametrize(
    ("dim", "count1", "count2"),
    [(2, 50, 60), (16, 200, 150), (64, 500, 400), (32, 20, 200), (48, 30, 25)],
    ids=["2d", "16d", "64d", "rank-deficient-first", "rank-deficient-both"],
)
def test_frechet_distance_equals_clean_fid(dim: int, count1: int, count2: int) -> None:
    rng = np.random.default_rng(dim + count1)
    mixing = rng.normal(size=(dim, dim))
    first = rng.normal(size=(count1, dim)) @ mixing
    second = rng.normal(size=(count2, dim)) @ (mixing + 0.3 * rng.normal(size=(dim, dim))) + 0.5
    ours = frechet_distance(*moments(first), *moments(second))
    theirs = float(cleanfid_fid.frechet_distance(*moments(first), *moments(second)))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form() -> None:
    # Commuting covariances: tr √(Σ1Σ2) = Σ √(a_i b_i), so FID = ‖Δμ‖² + Σ (√a_i − √b_i)².
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=40), rng.normal(size=40)
    var1, var2 = rng.uniform(0.0, 3.0, size=40), rng.uniform(0.0, 3.0, size=40)
    var1[:5] = 0.0  # singular covariance
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    ours = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert ours == pytest.approx(expected, rel=1e-10)


def test_rank_deficient_statistics_against_themselves_score_zero() -> None:
    # 6 images in 512 dimensions: square roots of Σ's rounding-level eigenvalues would add up
    # to about -0.9 here; they must count as zero.
    features = np.abs(np.random.default_rng(0).normal(size=(6, 512))) * 100
    mu, sigma = moments(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)


def test_frechet_distance_rejects_statistics_of_different_sizes() -> None:
    with pytest.raises(DmstabError, match="different feature sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- KID and Inception Score


@pytest.mark.parametrize("seed", [0, 7])
def test_kid_draws_clean_fids_subsets_and_matches_its_kernel_distance(seed: int) -> None:
    rng = np.random.default_rng(seed)
    first = rng.normal(size=(120, 16))
    second = rng.normal(size=(90, 16)) * 1.2 + 0.2
    np.random.seed(seed)
    theirs = cleanfid_fid.kernel_distance(first, second, num_subsets=7, max_subset_size=50)
    ours = kid(
        torch.from_numpy(first),
        torch.from_numpy(second),
        num_subsets=7,
        max_subset_size=50,
        seed=seed,
    )
    assert ours == pytest.approx(theirs, rel=1e-10)


def test_kid_with_one_subset_of_everything_is_the_unbiased_mmd() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.4
    kernel = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
    off_diagonal = ~np.eye(40, dtype=bool)
    expected = (
        kernel(x, x)[off_diagonal].mean()
        + kernel(y, y)[off_diagonal].mean()
        - 2 * kernel(x, y).mean()
    )
    ours = kid(torch.from_numpy(x), torch.from_numpy(y), num_subsets=1, seed=11)
    assert ours == pytest.approx(expected, rel=1e-10)


def test_inception_score_equals_the_original_numpy_formula() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(103, 12)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for i in range(5):  # Salimans et al.'s inception_score, in numpy
        part = probs[i * 103 // 5 : (i + 1) * 103 // 5]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    mean, std = inception_score(torch.from_numpy(logits), splits=5)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-9)


def test_inception_score_is_one_for_uniform_and_k_for_confident_balanced_predictions() -> None:
    classes = 7
    uniform = torch.zeros(70, classes)
    confident = 100.0 * F.one_hot(torch.arange(70) % classes, classes).double()
    assert inception_score(uniform, splits=2) == pytest.approx((1.0, 0.0))
    mean, std = inception_score(confident, splits=2)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("resolution", [32, 64])
def test_batched_clean_resize_matches_clean_fids_pil_resize(resolution: int) -> None:
    images = torch.cat([noise_images(100, resolution, seed=1), shapes(100, resolution, seed=2)])
    pil_resize = build_resizer("clean")
    expected = np.stack([pil_resize(image) for image in images.permute(0, 2, 3, 1).numpy()])
    ours = resize_clean(images).permute(0, 2, 3, 1).numpy()
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-3  # issue 4: max-abs on the 0..255 scale


@pytest.mark.parametrize(("height", "width"), [(300, 410), (512, 512), (299, 299)])
def test_clean_resize_matches_pil_when_shrinking_and_at_299(height: int, width: int) -> None:
    images = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8)
    pil_resize = build_resizer("clean")
    expected = np.stack([pil_resize(image) for image in images.permute(0, 2, 3, 1).numpy()])
    assert np.abs(resize_clean(images).permute(0, 2, 3, 1).numpy() - expected).max() <= 1e-3


@pytest.mark.parametrize(("count", "height", "width"), [(9, 32, 32), (2, 40, 17), (1, 512, 300)])
def test_banded_resize_is_the_dense_product_with_pils_matrices(
    count: int, height: int, width: int
) -> None:
    """The band-by-band products skip only zero weights: the same float32 values as one dense
    float64 product per pass with PIL's full coefficient matrices (width, then height)."""
    generator = torch.Generator().manual_seed(count)
    images = torch.randint(
        0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8
    )
    across, down = pil_bicubic_matrix(width, 299), pil_bicubic_matrix(height, 299)
    widened = (images.to(torch.float64) @ across.T).to(torch.float32)
    dense = (down @ widened.to(torch.float64)).to(torch.float32).clamp(0.0, 255.0)
    assert torch.equal(resize_clean(images), dense)


def test_pil_bicubic_weights_sum_to_one_and_are_the_identity_at_equal_size() -> None:
    for in_size, out_size in [(32, 299), (512, 299), (7, 5)]:
        rows = pil_bicubic_matrix(in_size, out_size).sum(dim=1)
        assert torch.allclose(rows, torch.ones(out_size, dtype=torch.float64))
    assert torch.equal(pil_bicubic_matrix(299, 299), torch.eye(299, dtype=torch.float64))


def test_legacy_pytorch_resize_matches_clean_fids() -> None:
    images = shapes(20, 32, seed=5)
    torch_resize = build_resizer("legacy_pytorch")
    expected = np.stack([torch_resize(image) for image in images.permute(0, 2, 3, 1).numpy()])
    ours = preprocessor("legacy_pytorch")(images).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - expected).max() <= 1e-4


def test_unknown_mode_names_the_allowed_ones() -> None:
    with pytest.raises(DmstabError, match="clean, legacy_pytorch, legacy_tensorflow"):
        preprocessor("bicubic")


# ---------------------------------------------------------------- the batched path


@sqrtm_deprecation
@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch", "legacy_tensorflow"])
def test_fast_path_fid_equals_clean_fids_folder_pipeline(mode: str, tmp_path: Path) -> None:
    real, fake = shapes(100, 32, seed=1), shapes(100, 32, seed=2)
    fake[::4] = noise_images(25, 32, seed=3)  # a quarter of the "generated" images are noise
    network = RandomConvFeatures(dim=32, seed=0)
    expected = cleanfid_fid.compute_fid(
        str(write_pngs(real, tmp_path / "real")),
        str(write_pngs(fake, tmp_path / "fake")),
        mode=mode,
        custom_feat_extractor=network,
        device=CPU,
        num_workers=0,
        batch_size=64,
        verbose=False,
    )
    extractor = extractor_for(network, mode)
    ours = fid_from_stats(
        compute_stats(real, extractor, device=CPU, batch_size=64),
        compute_stats(fake.split(37), extractor, device=CPU, batch_size=64),  # batch iterable
    )
    assert ours == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_dataset_against_itself_is_zero_and_blur_raises_fid_monotonically() -> None:
    images = shapes(150, 32, seed=4)
    extractor = extractor_for(RandomConvFeatures(dim=32, seed=1), "clean")
    reference = compute_stats(images, extractor, device=CPU)
    scores = [
        fid_from_stats(reference, compute_stats(blurred, extractor, device=CPU))
        for blurred in [images] + [gaussian_blur(images, 9, [s, s]) for s in (0.6, 1.2, 2.4)]
    ]
    assert abs(scores[0]) < 1e-8
    assert all(a < b for a, b in itertools.pairwise(scores)), scores


def test_random_conv_features_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first, again, other = (
        RandomConvFeatures(seed=3),
        RandomConvFeatures(seed=3),
        RandomConvFeatures(4),
    )
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(first.mix.weight, again.mix.weight)
    assert not torch.equal(first.mix.weight, other.mix.weight)


def test_batched_path_rejects_non_uint8_images() -> None:
    extractor = extractor_for(RandomConvFeatures(), "clean")
    with pytest.raises(DmstabError, match="uint8 RGB"):
        compute_features(torch.rand(4, 3, 32, 32), extractor, device=CPU)
    with pytest.raises(DmstabError, match="no images"):
        compute_features([], extractor, device=CPU)


# ---------------------------------------------------------------- statistics files


def test_stats_round_trip_through_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stats = FeatureStats.from_features(torch.from_numpy(rng.normal(size=(50, 6))))
    loaded = FeatureStats.load(stats.save(tmp_path / "sub" / "stats.npz"))
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 50


def test_reads_clean_fid_and_guided_diffusion_reference_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=5), np.cov(rng.normal(size=(30, 5)), rowvar=False)
    np.savez_compressed(tmp_path / "cleanfid.npz", mu=mu, sigma=sigma)
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    spatial = dict(mu_s=np.zeros(3), sigma_s=np.eye(3))
    np.savez(tmp_path / "guided.npz", arr_0=images, mu=mu, sigma=sigma, **spatial)
    for name in ("cleanfid.npz", "guided.npz"):
        loaded = FeatureStats.load(tmp_path / name)
        assert np.array_equal(loaded.mu, mu) and np.array_equal(loaded.sigma, sigma)
        assert loaded.num_images is None


def test_unusable_statistics_files_are_one_line_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("not an archive")
    cases = {
        "missing.npz": "FID statistics file not found",
        "images.npz": "is not a FID statistics file \\(no 'mu', 'sigma' array; it holds arr_0\\)",
        "shapes.npz": "mu must be",
        "array.npy": "single .npy array",
        "text.npz": "is corrupt or truncated: not a readable .npz archive",
    }
    for name, message in cases.items():
        with pytest.raises(DmstabError, match=message) as caught:
            FeatureStats.load(tmp_path / name)
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- Inception weights


def test_missing_weights_name_the_file_and_where_it_comes_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for mode, needed in [
        ("clean", TORCHSCRIPT_INCEPTION),
        ("legacy_pytorch", PYTORCH_FID_INCEPTION),
    ]:
        with pytest.raises(DmstabError) as caught:
            load_inception(mode)
        message = str(caught.value)
        assert needed.name in message and needed.url in message and WEIGHTS_ENV in message
        assert str(tmp_path / ".cache" / "dmstab" / needed.name) in message
        assert "\n" not in message
    with pytest.raises(DmstabError, match=r"nowhere\.pt \(--inception-weights\)"):
        inception_weights_path("clean", tmp_path / "nowhere.pt")


@pytest.mark.slow
@torch_jit_deprecation
@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_torchscript_inception_path_equals_clean_fids_wrapper(
    mode: str, torchscript_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(torchscript_folder))
    images = torch.cat([shapes(3, 32, seed=6), noise_images(2, 32, seed=7)])
    ours = compute_features(images, extractor_for(load_inception(mode), mode), device=CPU)
    theirs_model = InceptionV3W(
        str(torchscript_folder), download=False, resize_inside=mode == "legacy_tensorflow"
    )
    resize = build_resizer(mode)
    prepared = [
        torch.from_numpy(np.asarray(resize(image), np.float32))
        for image in images.permute(0, 2, 3, 1).numpy()
    ]
    with torch.no_grad():
        theirs = theirs_model(torch.stack(prepared).permute(0, 3, 1, 2)).double()
    assert ours.shape == (5, 2048) and theirs.std() > 1e-3
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


@pytest.mark.slow
def test_real_inception_path_runs_end_to_end_from_a_weights_file(torchscript_folder: Path) -> None:
    network = load_inception("clean", torchscript_folder / TORCHSCRIPT_INCEPTION.name)
    extractor = extractor_for(network, "clean")
    images = shapes(6, 32, seed=8)
    features = compute_features(images.split(4), extractor, device=CPU, batch_size=3)
    score = fid_from_stats(
        FeatureStats.from_features(features), compute_stats(images, extractor, device=CPU)
    )
    assert abs(score) < 1e-6
    # IS logits are the file's softmax layer less its bias: with the bias added back they give
    # the probabilities the file's own forward returns.
    with torch.no_grad():
        probabilities = network.scripted(resize_clean(images))
    logits = network.class_logits(features.float()) + network.scripted.output.bias
    assert torch.allclose(logits.softmax(dim=1), probabilities, atol=1e-6)
    mean, _ = inception_score(network.class_logits(features), splits=2)
    assert 1.0 <= mean <= 1008.0


def test_corrupt_torchscript_file_is_a_one_line_error(tmp_path: Path) -> None:
    weights = tmp_path / TORCHSCRIPT_INCEPTION.name
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(DmstabError, match="corrupt or truncated: not a readable TorchScript"):
        load_inception("clean", weights)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # clean-fid's call
def test_legacy_pytorch_network_equals_clean_fids_from_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    weights = tmp_path / "hub" / "checkpoints" / PYTORCH_FID_INCEPTION.name
    weights.parent.mkdir(parents=True)
    torch.save(calibrated(pytorch_fid_inception_v3()).state_dict(), weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # clean-fid finds the file in torch's hub cache
    assert Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_INCEPTION.name == weights
    images = shapes(4, 32, seed=10)
    ours = compute_features(
        images,
        extractor_for(load_inception("legacy_pytorch", weights), "legacy_pytorch"),
        device=CPU,
    )
    theirs_model = build_feature_extractor("legacy_pytorch", device=CPU, use_dataparallel=False)
    resize = build_resizer("legacy_pytorch")
    prepared = np.stack([resize(image) for image in images.permute(0, 2, 3, 1).numpy()])
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(prepared).permute(0, 3, 1, 2)).double()
    assert theirs.std() > 1e-3
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


@pytest.mark.gpu
def test_cuda_path_matches_clean_fids_resize_and_the_cpu_path() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = torch.device("cuda")
    images = torch.cat([noise_images(100, 32, seed=1), shapes(100, 32, seed=2)])
    pil_resize = build_resizer("clean")
    expected = np.stack([pil_resize(image) for image in images.permute(0, 2, 3, 1).numpy()])
    ours = resize_clean(images.to(cuda)).permute(0, 2, 3, 1).cpu().numpy()
    assert np.abs(ours - expected).max() <= 1e-3
    network = RandomConvFeatures(dim=32, seed=0)
    on_cpu = [
        compute_stats(half, extractor_for(network, "clean"), device=CPU) for half in images.chunk(2)
    ]
    network.to(cuda)
    on_cuda = [
        compute_stats(half, extractor_for(network, "clean"), device=cuda)
        for half in images.chunk(2)
    ]
    assert fid_from_stats(*on_cuda, device=cuda) == pytest.approx(fid_from_stats(*on_cpu), rel=1e-4)
