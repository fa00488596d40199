"""What `mlflow ui` shows of a run: its name, its description, the params that apply to it
and its experiment, which opens on the training view."""

from __future__ import annotations

from dmstab.commands.plugins import load_plugins
from dmstab.config import load_recipe
from dmstab.config.describe import run_name
from dmstab.config.views import run_params
from tests.conftest import TINY_DM_RUN
from tests.helpers import QUICKSTART, RECIPES, CachedRun, store

load_plugins()

# Keys a DDPM run with CLTS timesteps and the DDIM sampler does not read (written out here, not
# derived from dmstab's rules): EDM's noise levels and sampler, other loss weightings, the
# importance sampler, the inverse-sqrt learning rate, evaluation that never runs.
NOT_FOR_A_DDPM_CLTS_DDIM_RUN = {
    "diffusion.p_mean",
    "diffusion.p_std",
    "diffusion.sigma_data",
    "diffusion.label_dropout",
    "diffusion.min_snr_gamma",
    "diffusion.p2_k",
    "diffusion.p2_gamma",
    "diffusion.fdm_multiplier",
    "timesteps.history",
    "timesteps.uniform_prob",
    "optim.ref_kimg",
    "optim.rampup_kimg",
    "sample.sigma_min",
    "sample.sigma_max",
    "sample.rho",
    "sample.s_churn",
    "sample.guidance",
    "sample.guide",
    "eval.every",
    "eval.num_images",
    "tracking.run_name",
    "train.kimg",
    "train.spike_window",
    "data.root",
}


def test_run_names_say_recipe_method_overrides_and_seed() -> None:
    quickstart = load_recipe(QUICKSTART)
    assert run_name(quickstart) == "quickstart·clts·s0"
    clts = load_recipe(RECIPES / "cifar10_clts.yaml", ["optim.lr=2e-4", "train.seed=1"])
    assert run_name(clts, ["optim.lr=2e-4", "train.seed=1"]) == "cifar10_clts·lr=2e-4·s1"
    assert run_name(load_recipe(RECIPES / "edm2_mini.yaml")) == "edm2_mini·s0"  # says edm
    uniform = load_recipe(QUICKSTART, ["timesteps.sampler=uniform"])
    assert (
        run_name(uniform, ["timesteps.sampler=uniform"]) == "quickstart·uniform·sampler=uniform·s0"
    )
    assert run_name(quickstart, kind="hessian") == "quickstart·hessian"
    trained = load_recipe(QUICKSTART, ["tracking.run_name=quickstart·clts·s0"])
    assert run_name(trained, kind="sample") == "quickstart·clts·s0·sample"
    many = ["data.resolution=16", "model.channels=32", "optim.lr=1e-3", "train.steps=5"]
    assert run_name(quickstart, many) == "quickstart·clts·resolution=16·channels=32·lr=1e-3·+1·s0"


def test_a_ddpm_run_logs_only_the_keys_it_uses_and_none_unset() -> None:
    params = run_params(load_recipe(QUICKSTART), "train")
    assert not NOT_FOR_A_DDPM_CLTS_DDIM_RUN & params.keys()
    assert "None" not in params.values()
    # What it does use: CLTS's μ, σ and target iteration, DDIM's η, the run's length in steps.
    assert {"timesteps.mu", "timesteps.sigma", "timesteps.target_iteration"} <= params.keys()
    assert {"sample.eta", "train.steps", "diffusion.schedule"} <= params.keys()


def test_an_edm_run_logs_its_noise_levels_and_heun_keys_and_no_ddpm_keys() -> None:
    params = run_params(load_recipe(RECIPES / "edm2_mini.yaml"), "train")
    assert {"diffusion.p_mean", "sample.sigma_max", "sample.rho", "train.kimg"} <= params.keys()
    assert not {"diffusion.schedule", "timesteps.sampler", "sample.eta", "train.steps"} & set(
        params
    )
    assert params["paper.source"].startswith("Analyzing and Improving")


def test_switching_the_timestep_sampler_switches_its_keys() -> None:
    importance = load_recipe(QUICKSTART, ["timesteps.sampler=importance"])
    params = run_params(importance, "train")
    assert {"timesteps.history", "timesteps.uniform_prob"} <= params.keys()
    assert "timesteps.mu" not in params


def test_the_tracked_run_is_named_described_and_counted(tiny_dm: CachedRun) -> None:
    client = store()
    run = client.get_run(tiny_dm.run_id)
    assert run.info.run_name == "quickstart·clts·s0"
    description = run.data.tags["mlflow.note.content"]
    assert "`quickstart`" in description and "clts" in description
    assert int(run.data.tags["dmstab.parameters"]) > 0
    assert "model/parameters" not in run.data.metrics
    assert run.data.params == run_params(
        load_recipe(QUICKSTART, list(TINY_DM_RUN[0].overrides)), "train"
    )
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "quickstart" in experiment.tags["mlflow.note.content"]


def test_a_paper_recipe_describes_the_table_and_the_papers_number() -> None:
    from dmstab.config.describe import run_description

    text = run_description(load_recipe(RECIPES / "cifar10_clts.yaml"), "train")
    assert "Table 3, ID+Ours" in text and "fid 2.31 at 500k" in text
