"""improved-diffusion's multi-section respacing ("10,15,20") and `sample.sections`."""

from __future__ import annotations

import pytest
import torch

from dmstab.config import load_recipe
from dmstab.diffusion.ddpm_sampling import DiscreteSchedule, space_sections, space_timesteps
from dmstab.diffusion.gaussian import GaussianDiffusion
from dmstab.diffusion.samplers import find_sampler
from dmstab.diffusion.sampling import NoiseSource, with_labels
from dmstab.diffusion.schedules import make_betas
from dmstab.errors import DmstabError
from dmstab.models.generate import sampler_label, sampling_schedule
from tests.helpers import RECIPES

QUICKSTART = RECIPES / "quickstart.yaml"  # diffusion.steps: 1000


def improved_diffusion_sections(T: int, section_counts: list[int]) -> set[int]:
    """improved-diffusion's `space_timesteps(T, section_counts)`, restated from its definition:
    len(counts) consecutive sections of T // n steps, the first T % n one longer; in a section
    of `size` steps keeping `count`, a float position starts at 0 and grows by the stride
    (size−1)/(count−1) (1 when count ≤ 1) after each kept step, kept as start + round(position);
    the union of the kept steps."""
    kept: set[int] = set()
    start = 0
    for index in range(len(section_counts)):
        size = T // len(section_counts)
        if index < T % len(section_counts):
            size += 1
        count = section_counts[index]
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


SECTION_LISTS = [
    [10, 15, 20],  # improved-diffusion's docstring example
    [1, 1],
    [2, 3, 5, 7, 11, 13, 17],  # 7 sections: T % 7 ≠ 0 for both T below
    [100, 1, 50],
    [333, 1, 1],  # T = 1000: the first section is the one longer
    [4] * 9,
    [5, 30, 2, 8, 1, 9],
    [1] * 64,
    [25, 25, 25, 25],
    [300, 330, 333],  # T = 1000: sections of 334, 333, 333, nearly full
]


@pytest.mark.parametrize("T", [1000, 4000])
@pytest.mark.parametrize("counts", SECTION_LISTS)
def test_sections_keep_improved_diffusions_steps(T: int, counts: list[int]) -> None:
    kept = space_sections(T, counts)
    assert kept == sorted(improved_diffusion_sections(T, counts))
    assert len(kept) == sum(counts)  # no step kept twice


def test_sections_split_the_remainder_over_the_first_sections() -> None:
    # T = 10 in 3 sections: sizes 4, 3, 3 starting at 0, 4, 7; count = size keeps all
    assert space_sections(10, [4, 3, 3]) == list(range(10))
    # one step per section keeps each section's first step
    assert space_sections(10, [1, 1, 1]) == [0, 4, 7]
    # two per section keep each section's two ends
    assert space_sections(10, [2, 2, 2]) == [0, 3, 4, 6, 7, 9]


def test_one_section_is_the_even_spacing_for_every_step_count() -> None:
    for N in range(2, 1001):
        assert space_sections(1000, [N]) == space_timesteps(1000, N, "even"), N


def test_impossible_sections_are_refused() -> None:
    with pytest.raises(ValueError, match="section 2 spans 500 of the 1000 steps"):
        space_sections(1000, [10, 501])
    with pytest.raises(ValueError, match="section 1 spans 334"):  # 1000 = 334 + 333 + 333
        space_sections(1000, [335, 1, 1])
    assert len(space_sections(1000, [334, 333, 333])) == 1000
    for counts in ([10, 0], [-1, 5], []):
        with pytest.raises(ValueError, match="at least 1 step"):
            space_sections(1000, counts)


def _diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(
        make_betas("linear", 1000), target="eps", learn_sigma=False, hybrid_loss=False
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_both_samplers_walk_the_sections(sampler: str) -> None:
    counts = (3, 2, 4)
    times: list[torch.Tensor] = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        times.append(t[0])
        return 0.3 * torch.tanh(x)

    schedule = DiscreteSchedule(_diffusion(), sum(counts), sections=counts)
    find_sampler(sampler)(with_labels(model, None), NoiseSource(0, 0, 2, (1, 4, 4)), schedule)
    expected = sorted(improved_diffusion_sections(1000, list(counts)), reverse=True)
    assert [round(float(t)) for t in times] == expected  # model time = original t (T = 1000)


def test_schedule_sections_must_keep_its_step_count() -> None:
    with pytest.raises(ValueError, match=r"sections \[3, 2\] keep 5 steps, not 6"):
        DiscreteSchedule(_diffusion(), 6, sections=(3, 2))


def test_recipe_sections_reach_the_schedule_and_the_label() -> None:
    for form in ("sample.sections=[10,15,20]", "sample.sections=10,15,20"):
        recipe = load_recipe(QUICKSTART, [form, "sample.steps=45", "sample.sampler=ddim"])
        assert recipe.sample.sections == (10, 15, 20)
        schedule = sampling_schedule(recipe, recipe.sample)
        assert isinstance(schedule, DiscreteSchedule)
        kept = schedule.respaced("ddim").timestep_map.tolist()
        assert kept == sorted(improved_diffusion_sections(1000, [10, 15, 20]))
        assert sampler_label(recipe, recipe.sample) == "ddim10-15-20"
    plain = load_recipe(QUICKSTART, ["sample.steps=45", "sample.sampler=ddpm", "sample.eta=0"])
    assert plain.sample.sections == () and sampler_label(plain, plain.sample) == "ddpm45"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sample.sections=[10,15,20]"],  # quickstart's sample.steps is 50
            "sample.sections=[10, 15, 20] keep 45 steps in all but sample.steps is 50; "
            "set sample.steps=45",
        ),
        (
            ["sample.sections=[10,0]", "sample.steps=10"],
            "sample.sections=[10, 0]: every section must keep at least 1 step",
        ),
        (
            ["sample.sections=[-3,8]", "sample.steps=5"],
            "sample.sections=[-3, 8]: every section must keep at least 1 step",
        ),
        (
            ["sample.sections=[400,600]", "sample.steps=1000"],
            "sample.sections=[400, 600]: section 2 spans 500 of the 1000 steps, so it keeps "
            "1 … 500, not 600",
        ),
        (
            ["sample.sections=[30,20]", "sample.steps=50", "eval.every=5", "eval.steps=20"],
            "sample.sections=[30, 20] keep 50 steps in all but eval.steps is 20",
        ),
        (["sample.sections=10,x"], "recipe key 'sample.sections' is '10,x'; expected list of int"),
    ],
)
def test_bad_sections_are_refused_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(DmstabError) as error:
        load_recipe(QUICKSTART, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_sections_are_refused_for_edm() -> None:
    with pytest.raises(DmstabError, match=r"sample.sections=\[10, 10\] respace the ddpm β"):
        load_recipe(RECIPES / "edm2_mini.yaml", ["sample.sections=[10,10]", "sample.steps=20"])
