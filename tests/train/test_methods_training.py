"""Targets, loss weightings and timestep samplers trained end to end on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmstab.checkpoint import load_checkpoint
from dmstab.config import Recipe, load_recipe
from dmstab.diffusion.objectives import DDPMObjective, whole_batch_losses
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.models.generate import generate_for_recipe
from dmstab.train.loop import train
from dmstab.train.trainer import Trainer
from tests.helpers import RECIPES, TINY, Runner, store

# T = 8 and history 2: the importance sampler warms up within a few steps of batch 8.
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_T = ["diffusion.steps=8", "timesteps.mu=3", "timesteps.history=2", "sample.steps=4"]


CPU = torch.device("cpu")


def _recipe(*extra: str) -> Recipe:
    return load_recipe(RECIPES / "quickstart.yaml", [*TINY, *SMALL_T, *extra])


def _history(run_id: str, key: str) -> list[float]:
    metrics = store().get_metric_history(run_id, key)
    return [m.value for m in sorted(metrics, key=lambda m: m.step)]


# Every new option is trained in one of two runs.
RUN_A = ["diffusion.target=v", "diffusion.weighting=min_snr", "timesteps.sampler=importance"]
RUN_B = [
    "diffusion.target=x0",
    "diffusion.weighting=p2",
    "model.learn_sigma=true",
    "timesteps.sampler=shifted_gaussian",
]


@pytest.mark.parametrize(
    ("overrides", "metric"), [(RUN_A, "timesteps/warmed_up"), (RUN_B, "timesteps/mean")]
)
def test_each_method_trains_and_samples(overrides: list[str], metric: str) -> None:
    result = train(_recipe("train.steps=3", *overrides))
    values = _history(result.run_id, metric)
    assert len(values) == 3 and all(map(torch.isfinite, torch.tensor(values)))
    weights = _history(result.run_id, "train/loss_weight")
    # T = 8: the weights of both lie in (0, 1] and the cosine SNR makes them not all 1.
    assert len(weights) == 3 and all(0 < w <= 1 for w in weights) and min(weights) < 1
    assert result.samples is not None and result.samples.is_file()


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {**state["model"], **{"ema." + k: v for k, v in state["ema"]["shadow"].items()}}


class _CrashAt:
    """A progress display that fails the run at a given step, after an earlier checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, total: int, completed: int) -> None:
        return None

    def advance(self, step: int, loss: float, images_per_s: float) -> None:
        if step == self.step:
            raise RuntimeError("simulated crash")

    def stop(self) -> None:
        return None


@pytest.mark.slow
def test_importance_sampler_run_resumes_bit_for_bit() -> None:
    long = ["timesteps.sampler=importance", "train.steps=12", "train.checkpoint_every=6"]
    reference = train(_recipe(*long, "tracking.experiment=reference", "train.out_dir=reference"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_recipe(*long), progress=_CrashAt(8))
    client = store()
    run_id = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[
        0
    ].info.run_id
    checkpoint = load_checkpoint(Path("runs") / run_id / "checkpoint.pt")
    assert checkpoint["step"] == 6
    assert int(checkpoint["objective"]["timesteps.loss_counts"].min()) == 2, "not warmed up"
    resumed = train(_recipe(*long), resume=run_id)
    assert resumed.step == 12
    resumed_weights, reference_weights = (
        _final_weights(r.checkpoint) for r in (resumed, reference)
    )
    for key, value in reference_weights.items():
        assert torch.equal(resumed_weights[key], value), key


@pytest.mark.parametrize("entry", ["objective", "loss_guard", "optimizer", "ema"])
@pytest.mark.parametrize("sampler", ["uniform", "importance"])
def test_a_checkpoint_missing_an_entry_is_refused_naming_it(sampler: str, entry: str) -> None:
    """Every checkpoint dmstab writes has each entry; one without it is not a dmstab checkpoint."""
    recipe = _recipe(f"timesteps.sampler={sampler}")
    state = Trainer(recipe, torch.device("cpu")).state_dict("run")
    del state[entry]
    with pytest.raises(DmstabError, match=f"checkpoint has no '{entry}' state"):
        Trainer(recipe, torch.device("cpu")).load_state_dict(state)


def test_an_objective_state_of_another_shape_is_refused() -> None:
    """An importance sampler's loss history must match the recipe's history length."""
    written = Trainer(_recipe("timesteps.sampler=importance", "timesteps.history=10"), CPU)
    reader = Trainer(_recipe("timesteps.sampler=importance", "timesteps.history=5"), CPU)
    with pytest.raises(DmstabError, match="objective state does not fit"):
        reader.load_state_dict(written.state_dict("run"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("diffusion.min_snr_gamma=0", "diffusion.min_snr_gamma is 0.0; must be > 0"),
        ("diffusion.p2_k=0", "diffusion.p2_k is 0.0; must be > 0"),
        ("diffusion.p2_gamma=-1", "diffusion.p2_gamma is -1.0; must be >= 0"),
        ("timesteps.history=0", "timesteps.history is 0; must be at least 1"),
        ("timesteps.uniform_prob=1", r"timesteps.uniform_prob is 1.0; must be in \[0, 1\)"),
        ("diffusion.weighting=snr", "allowed: 'none' | 'min_snr' | 'p2' | 'fdm'"),
        (
            "timesteps.sampler=imp",
            "timesteps.sampler 'imp' is not registered; "
            "registered: clts, importance, shifted_gaussian, uniform",
        ),
        (
            "diffusion.target=score",
            "diffusion.target 'score' is not registered; registered: eps, ",
        ),
    ],
)
def test_bad_values_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(DmstabError, match=message) as info:
        _recipe(override)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override", ["timesteps.sampler=importance", "diffusion.weighting=p2", "diffusion.target=v"]
)
def test_ddpm_methods_are_refused_for_edm(override: str) -> None:
    with pytest.raises(DmstabError, match="EDM"):
        load_recipe(RECIPES / "edm2_mini.yaml", [override])


def test_cli_exits_2_on_a_bad_weighting_value(dmstab: Runner) -> None:
    command = ["train", str(RECIPES / "quickstart.yaml")]
    result = dmstab(*command, "diffusion.min_snr_gamma=-5", "--dry-run")
    assert result.returncode == 2
    assert "diffusion.min_snr_gamma is -5.0" in result.stderr


@pytest.mark.parametrize("sampler", ["uniform", "clts", "shifted_gaussian"])
def test_curricula_leave_every_loss_at_weight_one(sampler: str) -> None:
    """CLTS is a curriculum, not importance sampling: the loss minimised is the plain MSE."""
    recipe = _recipe(f"timesteps.sampler={sampler}")
    objective = DDPMObjective(recipe)
    model = build_model(recipe, num_classes=10)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 16, 16, generator=generator) * 2 - 1
    labels = torch.randint(0, 10, (8,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    terms = whole_batch_losses(
        objective, model, x0, labels, noise, generator, step=20
    )  # past the target
    assert torch.equal(terms["loss"], terms["mse"]) and bool((terms["loss_weight"] == 1).all())


def test_previous_x_trains_with_learned_sigma_and_samples() -> None:
    """The x_{t−1} target through the objective (hybrid loss, Min-SNR) and DDPM over all T = 8
    steps of its chain (the only respacing such a model samples as trained)."""
    recipe = _recipe(
        "diffusion.target=previous_x",
        "model.learn_sigma=true",
        "diffusion.weighting=min_snr",
        "sample.sampler=ddpm",
        "sample.steps=8",
    )
    torch.manual_seed(0)
    objective, model = DDPMObjective(recipe), build_model(recipe, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 16, 16, generator=generator) * 2 - 1
    labels = torch.randint(0, 10, (8,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    draws = {"t": torch.arange(8)}  # every step of the chain, the same ones each update
    losses = []
    for step in range(1, 7):
        terms = objective.terms(model, x0, labels, noise, draws, step)
        assert set(terms) >= {"mse", "vb", "loss_weight"}
        losses.append(terms["loss"].mean())
        optimizer.zero_grad()
        losses[-1].backward()
        optimizer.step()
    assert all(map(torch.isfinite, losses)) and losses[-1] < losses[0]

    images = generate_for_recipe(model.eval(), recipe, dataset_classes=10, device=CPU)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
