"""Per-block weight and activation magnitudes (EDM2 Fig. 3): values, hooks, training, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from torch import Tensor, nn

from dmstab.config import Recipe, load_recipe
from dmstab.models.adm_unet import ADMUNet
from dmstab.train.magnitudes import (
    ACTIVATION_PREFIX,
    WEIGHT_PREFIX,
    MagnitudeMonitor,
    ProbeBatch,
    activation_magnitudes,
    named_blocks,
    weight_magnitudes,
)
from dmstab.train.trainer import Trainer
from tests.helpers import MINI, RECIPES, TINY, TINY_EDM, Runner, store

EDM = [
    "model.name=edm2_unet",
    "diffusion.formulation=edm",
    "sample.sampler=heun",
    "sample.steps=4",
    "timesteps.sampler=uniform",
]
# An 8×8 two-level EDM2 net with attention at 4×4: well under a second per training step.
EDM_SMALL = [
    *EDM,
    "data.resolution=8",
    "model.channels=16",
    "model.attention_resolutions=[4]",
    "model.edm2.channels_per_head=16",
    "train.batch_size=4",
]
# Table 1: config X has every switch up to X on; these turn off the later ones.
CONFIG_C = [
    f"model.edm2.{switch}=false"
    for switch in ("mp_learned_layers", "forced_weight_norm", "no_group_norm", "mp_fixed_layers")
]
CONFIG_E = ["model.edm2.no_group_norm=false", "model.edm2.mp_fixed_layers=false"]
NETWORKS = {
    "adm": [],
    "adm_resblock_updown": ["model.resblock_updown=true"],
    "edm2_config_c": [*EDM_SMALL, *CONFIG_C],
    "edm2_config_g": EDM_SMALL,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster


# edm2_mini at TINY_EDM size, trained like quickstart: Adam (0.9, 0.999) at a constant rate.
QUICKSTART_OPTIMISER = [
    "model.attention_resolutions=[8]",
    "optim.betas=[0.9,0.999]",
    "optim.lr=1e-3",
    "optim.schedule=constant",
    "optim.ref_kimg=0",
    "optim.rampup_kimg=0",
]


def _recipe(*extra: str) -> Recipe:
    """quickstart at TINY size, or edm2_mini at TINY_EDM size when `extra` selects edm2_unet
    (a recipe holds only its own network's `model.*` keys)."""
    if "model.name=edm2_unet" in extra:
        return load_recipe(MINI, [*TINY_EDM, *QUICKSTART_OPTIMISER, *extra])
    return load_recipe(RECIPES / "quickstart.yaml", [*TINY, *extra])


def _trainer(*extra: str) -> Trainer:
    return Trainer(_recipe(*extra), torch.device("cpu"))


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("network", NETWORKS)
def test_weight_magnitudes_equal_an_independent_numpy_computation(network: str) -> None:
    model = _trainer(*NETWORKS[network]).model
    blocks = named_blocks(model, 16 if network.startswith("adm") else 8)
    measured = weight_magnitudes(blocks)
    for name, block in blocks:
        # ‖w_i‖²/fan_in per output unit i, weighted by fan_in over all of the block's layers.
        squared_norms, elements = 0.0, 0
        for parameter in block.parameters():
            w = parameter.detach().numpy().astype(np.float64)
            if w.ndim < 2:
                continue  # biases, norm scales, gains
            units = w.reshape(w.shape[0], -1)
            squared_norms += float(np.sum(np.linalg.norm(units, axis=1) ** 2))
            elements += units.size
        assert measured[name] == pytest.approx(np.sqrt(squared_norms / elements), rel=1e-5)
    if isinstance(model, ADMUNet):  # the first block is the input conv alone
        first = model.encoder[0][0].weight.detach().numpy()
        assert measured["enc.16x16.block0"] == pytest.approx(np.sqrt(np.mean(first**2)), rel=1e-5)


@pytest.mark.parametrize("network", NETWORKS)
def test_block_names_give_the_resolution_each_block_outputs(network: str) -> None:
    trainer = _trainer(*NETWORKS[network])
    monitor = MagnitudeMonitor(trainer.model, trainer.recipe, trainer.dataset, trainer.device)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        block.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name, block in monitor.blocks
    ]
    metrics = monitor.measure(0)
    for handle in handles:
        handle.remove()
    assert list(shapes) == [name for name, _ in monitor.blocks], "forward order"
    for name, shape in shapes.items():
        size = name.split(".")[1]
        assert size == f"{shape[2]}x{shape[3]}"
        assert ACTIVATION_PREFIX + name in metrics and WEIGHT_PREFIX + name in metrics
    flavors = {name.split(".")[0] for name in shapes}
    assert flavors == ({"enc", "mid", "dec"} if network.startswith("adm") else {"enc", "dec"})


def test_activation_of_the_input_conv_equals_a_direct_convolution() -> None:
    trainer = _trainer()
    model = trainer.model
    assert isinstance(model, ADMUNet)
    monitor = MagnitudeMonitor(model, trainer.recipe, trainer.dataset, trainer.device)
    conv = model.encoder[0][0]
    with torch.no_grad():
        expected = F.conv2d(monitor.probe.x, conv.weight, conv.bias, padding=1)
    measured = activation_magnitudes(model, monitor.blocks, monitor.probe)
    assert measured["enc.16x16.block0"] == pytest.approx(
        float(expected.square().mean().sqrt()), rel=1e-5
    )
    assert monitor.probe.labels is not None and monitor.probe.labels.dtype == torch.long


@pytest.mark.parametrize("network", ["adm", "edm2_config_g"])
def test_probing_leaves_no_hooks_and_training_bit_for_bit_unchanged(network: str) -> None:
    settings = [*NETWORKS[network], "model.dropout=0.3"]  # dropout: eval mode must be undone
    probed, plain = _trainer(*settings), _trainer(*settings)
    monitor = MagnitudeMonitor(probed.model, probed.recipe, probed.dataset, probed.device)
    first_probe = monitor.measure(0)
    for _ in range(3):
        probed_losses, plain_losses = probed.train_step(), plain.train_step()
        monitor.measure(probed.step)
        assert _hooks_left(probed.model) == 0
        assert all(m.training for m in probed.model.modules())
        assert torch.equal(probed_losses["loss"], plain_losses["loss"])
    for key, value in plain.model.state_dict().items():
        assert torch.equal(probed.model.state_dict()[key], value), key
    trained_probe = monitor.measure(3)
    assert trained_probe == monitor.measure(3), "eval mode: no dropout in the probe"
    assert trained_probe != first_probe, "the probe sees the trained weights"


def test_a_failing_probe_still_removes_its_hooks() -> None:
    trainer = _trainer(*EDM_SMALL)
    monitor = MagnitudeMonitor(trainer.model, trainer.recipe, trainer.dataset, trainer.device)
    wrong = ProbeBatch(torch.zeros(2, 5, 8, 8), monitor.probe.noise_level[:2], None)
    with pytest.raises(ValueError, match="x must be"):
        activation_magnitudes(trainer.model, monitor.blocks, wrong)
    assert _hooks_left(trainer.model) == 0
    assert trainer.model.training


def test_probe_batch_is_fixed_by_the_seed() -> None:
    one, two, other = _trainer(*EDM_SMALL), _trainer(*EDM_SMALL), _trainer(*EDM_SMALL)
    probes = [MagnitudeMonitor(t.model, t.recipe, t.dataset, t.device).probe for t in (one, two)]
    reseeded = _recipe(*EDM_SMALL, "train.seed=1")
    probes.append(MagnitudeMonitor(other.model, reseeded, other.dataset, other.device).probe)
    assert torch.equal(probes[0].x, probes[1].x)
    assert torch.equal(probes[0].noise_level, probes[1].noise_level)
    assert not torch.equal(probes[0].x, probes[2].x)
    assert probes[0].x.shape[0] == 4, "a training batch at most"


def _train_and_measure(
    *settings: str, steps: int
) -> tuple[MagnitudeMonitor, list[dict[str, float]]]:
    """`steps` Adam steps at lr 0.05 on the synthetic shapes, measured as the loop does."""
    trainer = _trainer(*EDM_SMALL, *settings, "optim.lr=0.05")
    monitor = MagnitudeMonitor(trainer.model, trainer.recipe, trainer.dataset, trainer.device)
    measurements = [monitor.measure(0)]
    for _ in range(steps):
        trainer.train_step()
        measurements.append(monitor.measure(trainer.step))
    return monitor, measurements


def _by_block(measurement: dict[str, float], prefix: str) -> Tensor:
    return torch.tensor([v for k, v in measurement.items() if k.startswith(prefix)])


def test_forced_weight_norm_holds_weights_fixed_while_c_and_d_drift() -> None:
    """EDM2 Fig. 3 / Sec. 2.3: in C weights and activations grow; D's weight-normalised layers
    grow their stored weights every step; E's forced weight normalisation (Eq. 66) holds every
    block at RMS 1, up to the one Adam step taken since the last renormalisation."""
    _, config_c = _train_and_measure(*CONFIG_C, steps=6)
    _, config_d = _train_and_measure("model.edm2.forced_weight_norm=false", *CONFIG_E, steps=6)
    monitor, config_e = _train_and_measure(*CONFIG_E, steps=6)

    def growth(history: list[dict[str, float]], prefix: str) -> Tensor:
        return _by_block(history[-1], prefix) / _by_block(history[0], prefix)

    assert growth(config_c, WEIGHT_PREFIX).min() > 1.3
    assert growth(config_c, ACTIVATION_PREFIX).min() > 2.0
    d_means = torch.stack([_by_block(m, WEIGHT_PREFIX).mean() for m in config_d])
    assert (d_means.diff() > 0).all()
    for measurement in config_e[1:]:
        assert (_by_block(measurement, WEIGHT_PREFIX) - 1).abs().max() < 0.005

    figure = monitor.figure()
    activations_axis, weights_axis = figure.axes
    assert len(activations_axis.lines) == len(weights_axis.lines) == len(monitor.blocks)
    assert all(len(line.get_xdata()) == 7 for line in weights_axis.lines)
    plt.close(figure)


def test_dmstab_train_logs_magnitudes_and_the_figure(dmstab: Runner) -> None:
    result = dmstab(
        "train",
        str(MINI),
        *TINY_EDM,
        "model.attention_resolutions=[8]",
        *EDM,
        "train.kimg=0.032",  # 4 steps of 8 images
        "train.magnitudes_every=2",
    )
    assert result.returncode == 0, result.stderr
    client = store()
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    keys = sorted(k for k in run.data.metrics if k.startswith("magnitude/"))
    # 16×16 input, levels [1, 2], one block per level: 3 encoder and 7 decoder blocks.
    assert len(keys) == 2 * 10
    assert "magnitude/act/enc.16x16.block0" in keys and "magnitude/weight/dec.8x8.block3" in keys
    for key in keys:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 2, 4]
        assert all(np.isfinite(m.value) and m.value > 0 for m in history)
    figures = client.list_artifacts(run.info.run_id, "magnitudes")
    assert [a.path for a in figures] == ["magnitudes/magnitudes.png"]
