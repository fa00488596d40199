"""Respacing, fixed noise, and DDPM/DDIM sampling checked against oracles and identities."""

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from dmstab.diffusion.ddpm_sampling import DiscreteSchedule, space_timesteps
from dmstab.diffusion.gaussian import GaussianDiffusion
from dmstab.diffusion.samplers import find_sampler
from dmstab.diffusion.sampling import NoiseSource, with_labels
from dmstab.diffusion.schedules import make_betas

T = 1000
SHAPE = (3, 8, 8)
Model = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def cosine_diffusion(target: str = "eps", learn_sigma: bool = False) -> GaussianDiffusion:
    return GaussianDiffusion(
        make_betas("cosine", T), target=target, learn_sigma=learn_sigma, hybrid_loss=learn_sigma
    )


class Recorder:
    """Wraps a model and records the x and model time it is called with."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.inputs: list[Tensor] = []
        self.times: list[Tensor] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        self.inputs.append(x.clone())
        self.times.append(t.clone())
        return self.model(x, t, y)


def smooth_model(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """A per-pixel ε-model whose output depends on x and t (no batch mixing)."""
    return 0.4 * torch.tanh(x) + 0.1 * torch.sin(t / 100).reshape(-1, 1, 1, 1)


def improved_diffusion_even(T: int, N: int) -> list[int]:
    """improved-diffusion's one-section `space_timesteps`, restated from its definition: a
    float position that starts at 0 and grows by (T−1)/(N−1) after each kept step, rounded
    with Python's round()."""
    kept, position = [], 0.0
    while len(kept) < N:
        kept.append(round(position))
        position += (T - 1) / (N - 1)
    return kept


def improved_diffusion_ddim(T: int, N: int) -> list[int] | None:
    """improved-diffusion's "ddimN": the first stride 1, 2, … whose range(0, T, stride) has N
    entries, or None where none has."""
    return next((list(range(0, T, i)) for i in range(1, T) if len(range(0, T, i)) == N), None)


def test_even_spacing_keeps_both_ends() -> None:
    kept = space_timesteps(4000, 250, "even")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 3999
    assert set(np.diff(kept).tolist()) <= {16, 17}  # 3999/249 ≈ 16.06


@pytest.mark.parametrize("T", [1000, 4000])
def test_even_spacing_equals_improved_diffusions_for_every_step_count(T: int) -> None:
    for N in range(2, T + 1):
        assert space_timesteps(T, N, "even") == improved_diffusion_even(T, N), N


def test_even_spacing_breaks_ties_where_the_running_sum_does() -> None:
    # 999/20 = 49.95: the exact 10·49.95 = 499.5 rounds to 500 (ties to even); the running sum
    # of ten 49.95s is 499.49999999999994 and rounds to 499, which improved-diffusion keeps.
    assert sum([999 / 20] * 10) < 499.5 == 10 * 999 / 20
    assert space_timesteps(1000, 21, "even")[10] == 499


def test_ddim_spacing_equals_improved_diffusions_for_every_step_count() -> None:
    T = 1000
    for N in range(2, T + 1):
        expected = improved_diffusion_ddim(T, N)
        if expected is None:
            with pytest.raises(ValueError, match="no integer stride"):
                space_timesteps(T, N, "ddim")
        else:
            assert space_timesteps(T, N, "ddim") == expected, N


def test_ddim_spacing_uses_an_integer_stride() -> None:
    assert space_timesteps(4000, 250, "ddim") == list(range(0, 4000, 16))
    assert space_timesteps(1000, 50, "ddim") == list(range(0, 1000, 20))
    assert space_timesteps(1000, 30, "ddim") == list(range(0, 1000, 34))
    assert space_timesteps(1000, 2, "ddim") == [0, 500]  # the smallest of strides 500 … 999
    # strides 3 and 4 give 334 and 250 steps; none gives 300
    with pytest.raises(
        ValueError, match="300 of 1000 steps; the nearest counts one gives are 250 and 334"
    ):
        space_timesteps(1000, 300, "ddim")
    with pytest.raises(ValueError, match="num_steps must lie in"):
        space_timesteps(1000, 1, "even")


def test_respaced_schedule_keeps_alpha_bar_and_original_times() -> None:
    diffusion = GaussianDiffusion(
        make_betas("cosine", 4000), target="eps", learn_sigma=True, hybrid_loss=True
    )
    kept = space_timesteps(4000, 250, "even")
    spaced = diffusion.respaced(kept)
    assert spaced.num_timesteps == 250
    torch.testing.assert_close(
        spaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-12, atol=0
    )
    steps = torch.tensor([0, 1, 249])
    expected = torch.tensor([0, kept[1], 3999], dtype=torch.float32) * 1000 / 4000
    assert torch.equal(spaced.model_time(steps), expected)


def test_noise_source_repeats_per_seed_and_ignores_batch_split() -> None:
    whole = NoiseSource(seed=3, first_index=0, count=8, shape=SHAPE)
    halves = (NoiseSource(3, 0, 4, SHAPE), NoiseSource(3, 4, 4, SHAPE))
    for _ in range(3):
        draw = whole.next()
        assert draw.dtype == torch.float32 and draw.shape == (8, *SHAPE)
        assert torch.equal(draw, torch.cat([half.next() for half in halves]))
    first, second = NoiseSource(3, 0, 8, SHAPE), NoiseSource(4, 0, 8, SHAPE)
    x_first = first.next()
    assert not torch.equal(x_first, second.next())
    assert not torch.equal(x_first, first.next())  # successive draws differ
    assert not torch.equal(x_first[0], x_first[1])  # images differ


def test_noise_source_is_standard_normal() -> None:
    draws = torch.cat([NoiseSource(11, 0, 64, SHAPE).next() for _ in range(4)])
    assert abs(draws.mean().item()) < 0.02
    assert abs(draws.std().item() - 1) < 0.02


def step_noises(
    diffusion: GaussianDiffusion, recorder: Recorder, final: Tensor, num_steps: int
) -> list[Tensor]:
    """The noise z each DDPM step added, (x_{t−1} − μ_θ(x_t)) / σ_t, from the recorded states."""
    spaced = diffusion.respaced(space_timesteps(T, num_steps, "even"))
    states = [*recorder.inputs, final]
    noises = []
    for index, (x_t, x_next) in enumerate(itertools.pairwise(states)):
        t = torch.full((x_t.shape[0],), num_steps - 1 - index)
        output = recorder.model(x_t, spaced.model_time(t), None)
        step = spaced.reverse_step(output, x_t, t, clip_denoised=True)
        noises.append((x_next - step.mean) / torch.exp(0.5 * step.log_variance))
    return noises


def test_different_models_see_the_same_noise() -> None:
    """The consistency experiment's premise: same seed ⇒ same x_T and same per-step noise."""
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.2, generator=torch.Generator().manual_seed(0))

    def conv_model(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        output: Tensor = conv(x)
        return output.detach()

    diffusion, num_steps = cosine_diffusion(), 8
    reference = NoiseSource(5, 0, 4, SHAPE)
    expected = [reference.next() for _ in range(num_steps)]  # x_T, then N − 1 step noises
    for model in (smooth_model, conv_model):
        recorder = Recorder(model)
        final = find_sampler("ddpm")(
            with_labels(recorder, None), NoiseSource(5, 0, 4, SHAPE),
            DiscreteSchedule(diffusion, num_steps, eta=0.0),
        )  # fmt: skip
        assert torch.equal(recorder.inputs[0], expected[0])
        *noises, last = step_noises(diffusion, recorder, final, num_steps)
        for seen, drawn in zip(noises, expected[1:], strict=True):
            torch.testing.assert_close(seen, drawn, atol=1e-4, rtol=1e-4)
        assert last.abs().max().item() < 1e-6  # the last step adds no noise


def single_point_oracle(target: str, x_star: Tensor, learn_sigma: bool) -> Model:
    """The optimal predictor when the data is the single point x*: ε = (x_t − √ᾱ x*)/√(1−ᾱ)."""
    alpha_bar = np.cumprod(1 - make_betas("cosine", T).numpy())

    def model(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        index = np.rint(t.numpy() * T / 1000).astype(np.int64)
        a = torch.from_numpy(alpha_bar[index]).reshape(-1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * x_star.double()) / (1 - a).sqrt()
        prediction = (eps if target == "eps" else x_star.expand_as(x)).float()
        if not learn_sigma:
            return prediction
        return torch.cat([prediction, torch.zeros_like(prediction)], dim=1)

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize(("target", "learn_sigma"), [("eps", False), ("x0", False), ("eps", True)])
def test_single_point_oracle_returns_the_point(
    sampler: str, target: str, learn_sigma: bool
) -> None:
    x_star = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(2)) * 1.8 - 0.9
    recorder = Recorder(single_point_oracle(target, x_star, learn_sigma))
    images = find_sampler(sampler)(
        with_labels(recorder, None), NoiseSource(9, 0, 4, SHAPE),
        DiscreteSchedule(cosine_diffusion(target, learn_sigma), 50, eta=0.0),
    )  # fmt: skip
    assert images.shape == (4, *SHAPE) and images.dtype == torch.float32
    torch.testing.assert_close(images, x_star.expand_as(images), atol=1e-3, rtol=0)
    kept = space_timesteps(T, 50, "even" if sampler == "ddpm" else "ddim")
    assert [int(t[0]) for t in recorder.times] == kept[::-1]  # original timesteps, T = 1000


def test_ddim_eta0_stays_on_the_oracle_trajectory() -> None:
    """Song et al.: with the exact ε, DDIM η = 0 moves along x_k = √ᾱ_k x* + √(1−ᾱ_k) ε̂_T."""
    x_star = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(4)) * 1.8 - 0.9
    recorder = Recorder(single_point_oracle("eps", x_star, False))
    find_sampler("ddim")(
        with_labels(recorder, None), NoiseSource(1, 0, 2, SHAPE),
        DiscreteSchedule(cosine_diffusion(), 20, eta=0.0),
    )  # fmt: skip
    alpha_bar = np.cumprod(1 - make_betas("cosine", T).numpy())
    kept = space_timesteps(T, 20, "ddim")[::-1]
    a_start = float(alpha_bar[kept[0]])
    eps = (recorder.inputs[0].double() - a_start**0.5 * x_star) / (1 - a_start) ** 0.5
    for x, k in zip(recorder.inputs, kept, strict=True):
        a = float(alpha_bar[k])
        expected = a**0.5 * x_star + (1 - a) ** 0.5 * eps
        torch.testing.assert_close(x.double(), expected, atol=1e-3, rtol=0)


class SwappedTail(NoiseSource):
    """x_T from one seed, every later draw from another; counts its draws."""

    def __init__(self, seed: int, tail_seed: int, count: int) -> None:
        super().__init__(seed, 0, count, SHAPE)
        self.tail = NoiseSource(tail_seed, 0, count, SHAPE)
        self.draws = 0

    def next(self) -> Tensor:
        self.draws += 1
        return super().next() if self.draws == 1 else self.tail.next()


def test_ddim_eta0_depends_only_on_x_T() -> None:
    def run(noise: NoiseSource, eta: float) -> Tensor:
        return find_sampler("ddim")(
            with_labels(smooth_model, None), noise,
            DiscreteSchedule(cosine_diffusion(), 10, eta=eta, clip_denoised=False),
        )  # fmt: skip

    swapped = SwappedTail(1, 2, 3)
    assert torch.equal(run(NoiseSource(1, 0, 3, SHAPE), 0.0), run(swapped, 0.0))
    assert swapped.draws == 1
    assert not torch.allclose(run(NoiseSource(1, 0, 3, SHAPE), 0.5), run(SwappedTail(1, 2, 3), 0.5))


def test_ddpm_with_posterior_variance_equals_ddim_eta1() -> None:
    """Song et al. Sec. 4.1: DDIM with η = 1 is DDPM with σ_t² = β̃_t (learned v = −1)."""

    def model(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return torch.cat([smooth_model(x, t, y), -torch.ones_like(x)], dim=1)

    diffusion = cosine_diffusion(learn_sigma=True)

    def run(sampler: str, eta: float) -> Tensor:
        return find_sampler(sampler)(
            with_labels(model, None), NoiseSource(8, 0, 3, SHAPE),
            DiscreteSchedule(diffusion, 12, eta=eta, spacing="even"),
        )  # fmt: skip

    images = {"ddpm": run("ddpm", 0.0), "ddim": run("ddim", 1.0)}
    torch.testing.assert_close(images["ddpm"], images["ddim"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_batch_split_does_not_change_the_images(sampler: str) -> None:
    def run(first_index: int, count: int) -> Tensor:
        return find_sampler(sampler)(
            with_labels(smooth_model, None), NoiseSource(6, first_index, count, SHAPE),
            DiscreteSchedule(cosine_diffusion(), 10, eta=0.0),
        )  # fmt: skip

    torch.testing.assert_close(run(0, 8), torch.cat([run(0, 4), run(4, 4)]), atol=1e-6, rtol=0)


def test_callback_reports_progress_and_labels_reach_the_model() -> None:
    progress: list[tuple[int, int]] = []
    labels_seen: list[Tensor | None] = []

    def model(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        labels_seen.append(y)
        return smooth_model(x, t, y)

    labels = torch.tensor([3, 1])
    find_sampler("ddpm")(
        with_labels(model, labels), NoiseSource(0, 0, 2, SHAPE),
        DiscreteSchedule(cosine_diffusion(), 5, eta=0.0),
        callback=lambda done, total: progress.append((done, total)),
    )  # fmt: skip
    assert progress == [(i, 5) for i in range(1, 6)]
    assert all(seen is not None and torch.equal(seen, labels) for seen in labels_seen)


def test_bad_sampling_arguments_are_rejected() -> None:
    def run(sampler: str, eta: float, labels: Tensor | None = None) -> Tensor:
        return find_sampler(sampler)(
            with_labels(smooth_model, labels), NoiseSource(0, 0, 2, SHAPE),
            DiscreteSchedule(cosine_diffusion(), 5, eta=eta),
        )  # fmt: skip

    with pytest.raises(ValueError, match="eta must be 0 for DDPM"):
        run("ddpm", 0.5)
    with pytest.raises(ValueError, match="non-negative for DDIM"):
        run("ddim", -0.1)
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        run("ddim", 0.0, torch.zeros(3, dtype=torch.long))
