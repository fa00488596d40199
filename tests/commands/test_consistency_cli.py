"""`dmstab consistency` through the CLI on tiny trained DMs (AAAI Eq. 1)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dmstab.commands.consistency import member_recipes
from dmstab.config import fingerprint, load_recipe
from dmstab.errors import DmstabError
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, TINY_GAN, CachedRun, Runner, Training, store

SMALL = [*TINY, "model.attention_resolutions=[]", "data.resolution=8"]
TrainedRuns = Callable[..., list[CachedRun]]
SAMPLING = ["consistency.num_images=3", "sample.steps=4", "sample.batch_size=3"]


def _small(*extra: str) -> Training:
    """The tiny DM at 8x8 without attention (the runs are trained once a session, see below)."""
    return Training.of(RECIPES / "quickstart.yaml", [*SMALL, *extra])


def _consistency_runs(client: MlflowClient) -> list[str]:
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`dmstab.kind` = 'consistency'",
        order_by=["attributes.start_time DESC"],
    )
    return [str(run.info.run_id) for run in runs]


def _logged_images(run_id: str, sampler: str) -> np.ndarray:
    with np.load(Path("analyses/consistency") / run_id / sampler / "images.npz") as arrays:
        return np.asarray(arrays["images"])


def _independent_eq_1(images: np.ndarray) -> float:
    """Eq. 1 from scratch: PSNR = 10·log10(255² / MSE) against model 1, mean over j ≥ 2, i."""
    values = []
    for j in range(1, images.shape[0]):
        for i in range(images.shape[1]):
            diff = images[0, i].astype(np.float64) - images[j, i].astype(np.float64)
            values.append(10 * math.log10(255.0**2 / np.mean(diff**2)))
    return float(np.mean(values))


@pytest.mark.slow
def test_checkpoint_and_run_id_give_eq_1_of_the_logged_images(
    dmstab: Runner, trained_runs: TrainedRuns
) -> None:
    first, second, third = trained_runs(_small(), _small("train.seed=1"), _small("train.seed=2"))
    result = dmstab(
        "consistency", str(first.checkpoint), second.run_id, str(third.run_dir), *SAMPLING
    )
    assert result.returncode == 0, result.stderr
    client = store()
    (run_id,) = _consistency_runs(client)
    directory = Path("analyses/consistency") / run_id / "ddim4"
    images = _logged_images(run_id, "ddim4")
    assert images.shape == (3, 3, 3, 8, 8) and images.dtype == np.uint8
    expected = _independent_eq_1(images)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["consistency/psnr"] == pytest.approx(expected, rel=1e-9)
    assert metrics["consistency/ddim4/psnr"] == pytest.approx(expected, rel=1e-9)
    scores = json.loads((directory / "scores.json").read_text())
    assert np.array(scores["per_pair"]).shape == (2, 3)
    artifacts = {a.path for a in client.list_artifacts(run_id, "consistency/ddim4")}
    assert {"images.npz", "scores.json", "grid.png"} <= {Path(a).name for a in artifacts}


def test_the_same_model_twice_is_counted_identical_and_scores_the_cap(
    dmstab: Runner, trained_runs: TrainedRuns
) -> None:
    (run,) = trained_runs(_small())
    result = dmstab("consistency", str(run.checkpoint), run.run_id, *SAMPLING)
    assert result.returncode == 0, result.stderr
    metrics = store().get_run(_consistency_runs(store())[0]).data.metrics
    assert metrics["consistency/ddim4/identical_pairs"] == 3
    assert metrics["consistency/psnr"] == pytest.approx(10 * math.log10(255.0**2 * 3 * 8 * 8))


@pytest.mark.slow
def test_a_recipe_trains_its_group_once_and_scores_samplers_and_targets(dmstab: Runner) -> None:
    recipe = RECIPES / "quickstart.yaml"
    members = (
        'consistency.members=["train.seed=0", "train.seed=1", '
        '"train.seed=0 diffusion.target=x0", "train.seed=1 diffusion.target=x0"]'
    )
    arguments = [str(recipe), *SMALL, members, "consistency.samplers=[ddpm,ddim]", *SAMPLING]
    assert dmstab("consistency", *arguments).returncode == 0
    client = store()
    experiment = client.get_experiment_by_name("tests").experiment_id
    trained = client.search_runs([experiment], filter_string="tags.`dmstab.kind` = 'train'")
    assert len(trained) == 4
    again = dmstab("consistency", *arguments)
    assert again.returncode == 0, again.stderr
    assert "C(q), target x0 only" in again.stdout
    assert len(client.search_runs([experiment], "tags.`dmstab.kind` = 'train'")) == 4
    run = client.get_run(_consistency_runs(client)[0])
    member_runs = {run.data.tags[f"dmstab.member.{i}.run_id"] for i in range(4)}
    assert member_runs == {str(r.info.run_id) for r in trained}
    assert run.data.tags["dmstab.member.2"] == "train.seed=0 diffusion.target=x0"
    for sampler in ("ddpm4", "ddim4"):
        images = _logged_images(run.info.run_id, sampler)
        for target, members_of_target in (("eps", [0, 1]), ("x0", [2, 3])):
            expected = _independent_eq_1(images[members_of_target])
            logged = run.data.metrics[f"consistency/{sampler}/target_{target}/psnr"]
            assert logged == pytest.approx(expected, rel=1e-9)
    first_sampler_x0 = _independent_eq_1(_logged_images(run.info.run_id, "ddpm4")[[2, 3]])
    assert run.data.metrics["consistency/target_x0/psnr"] == pytest.approx(first_sampler_x0)


@pytest.mark.parametrize(
    ("group", "trained_by"),
    [
        ("table1_cifar10_id_consistency", "cifar10_baseline"),
        ("table1_cifar10_eps_vs_x0_consistency", "cifar10_baseline"),
        ("table1_cifar10_dcgan_consistency", "dcgan_cifar10"),
        ("table1_imagenet128_gd_consistency", "imagenet128_gd"),
        ("table1_imagenet128_biggan_consistency", "biggan_imagenet128"),
        ("table1_imagenet512_biggan_consistency", "biggan_imagenet512"),
        ("table1_uvit_consistency", "uvit_cifar10_s2"),
        ("mini_table1_eps_vs_x0_consistency", "mini_stability_dm"),
    ],
)
def test_a_groups_first_member_reuses_the_run_of_the_recipe_it_builds_on(
    group: str, trained_by: str
) -> None:
    (_, first), *_ = member_recipes(load_recipe(RECIPES / f"{group}.yaml"))
    assert fingerprint(first) == fingerprint(load_recipe(RECIPES / f"{trained_by}.yaml"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.resolution=16"], "cannot share noise: data.resolution is 8 vs 16"),
        (["diffusion.steps=50"], "cannot share noise: diffusion.steps is 100 vs 50"),
    ],
)
def test_models_that_cannot_share_noise_are_refused(
    extra: list[str], message: str, dmstab: Runner, trained_runs: TrainedRuns
) -> None:
    first, other = trained_runs(_small(), _small(*extra))
    result = dmstab("consistency", first.run_id, other.run_id, *SAMPLING)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_member_overrides_split_as_a_shell_would() -> None:
    members = 'consistency.members=["train.seed=1", "train.seed=2 model.channel_mult=\'[1, 2]\'"]'
    recipe = load_recipe(RECIPES / "quickstart.yaml", [*SMALL, members])
    (_, first), (label, second) = member_recipes(recipe)
    assert (first.train.seed, second.train.seed) == (1, 2)
    assert label == "train.seed=2 model.channel_mult='[1, 2]'"
    assert second.model.channel_mult == (1, 2)  # type: ignore[attr-defined]
    unclosed = load_recipe(
        RECIPES / "quickstart.yaml", [*SMALL, 'consistency.members=["train.seed=1", "a=\'b"]']
    )
    message = 'consistency.members entry "a=\'b": No closing quotation'
    with pytest.raises(DmstabError, match=re.escape(message)):
        member_recipes(unclosed)


def test_fewer_than_two_models_is_one_line_and_exit_2(
    dmstab: Runner, trained_runs: TrainedRuns
) -> None:
    (run,) = trained_runs(_small())
    for arguments in ([run.run_id], [str(RECIPES / "quickstart.yaml"), *SMALL]):
        result = dmstab("consistency", *arguments)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_gans_share_z_and_a_gan_cannot_join_a_diffusion_group(dmstab: Runner) -> None:
    gan = [*TINY_GAN, "train.steps=3"]
    first, second = (
        train(load_recipe(RECIPES / "mini_dcgan.yaml", [*gan, f"train.seed={seed}"]))
        for seed in (0, 1)
    )
    sampling = ["consistency.num_images=4", "consistency.samplers=[ddpm,ddim]"]
    result = dmstab("consistency", first.run_id, second.run_id, *sampling)
    assert result.returncode == 0, result.stderr
    (run_id,) = _consistency_runs(store())
    images = _logged_images(run_id, "gan")  # scored once: a GAN has no sampler
    assert images.shape == (2, 4, 3, 16, 16)
    assert "do not apply" in store().get_run(run_id).data.tags["dmstab.consistency.note"]
    metrics = store().get_run(run_id).data.metrics
    assert metrics["consistency/gan/psnr"] == pytest.approx(_independent_eq_1(images), rel=1e-9)
    diffusion = train(load_recipe(RECIPES / "quickstart.yaml", [*TINY, "data.resolution=16"]))
    mixed = dmstab("consistency", first.run_id, diffusion.run_id)
    assert mixed.returncode == 2
    assert "cannot share noise: kind is GAN vs diffusion model" in mixed.stderr
