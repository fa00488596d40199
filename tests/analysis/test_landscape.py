"""Loss landscapes: filter-normalised directions, interpolation and surfaces against closed forms
(least squares is quadratic in θ) and against the DM loss evaluated directly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dmstab.analysis.hessian import HessianOperator
from dmstab.analysis.landscape import (
    FixedBatchLoss,
    LandscapeGrid,
    evaluate,
    interpolate,
    interpolation_curve,
    load_landscape,
    per_timestep_losses,
    random_direction,
    save_landscape,
    surface,
    timestep_loss,
)
from dmstab.analysis.landscape_metrics import surface_metrics
from dmstab.config import load_recipe
from dmstab.diffusion.objectives import build_objective
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.plots import interpolation_figure, surface_figure
from tests.helpers import RECIPES, TINY

CLASSES = 3
BATCH = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> Iterator[None]:
    yield


class ConvNet(nn.Module):
    """Conv (4-D weight), GroupNorm (1-D gain and shift), linear (2-D weight): every kind of
    parameter the filter normalisation treats differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.linear = nn.Linear(16, 5)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_problem() -> tuple[nn.Linear, Tensor, Tensor]:
    """A float64 linear model with a regression batch: its MSE is quadratic in θ."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(16, 3, generator=_generator(1), dtype=torch.float64)
    y = torch.randn(16, 2, generator=_generator(2), dtype=torch.float64)
    return model, x, y


def _dm_setup(seed: int) -> tuple[nn.Module, dict[str, FixedBatchLoss]]:
    """A TINY ADM UNet with dropout (random unless in eval mode), moved away from its
    zero-initialised output (as training would), and fixed-batch losses at two timesteps."""
    recipe = load_recipe(RECIPES / "quickstart.yaml", [*TINY, "model.dropout=0.3"])
    torch.manual_seed(seed)
    model = build_model(recipe, CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_generator(seed + 100)))
    objective = build_objective(recipe, CLASSES)
    data = _generator(7)
    x0 = torch.rand(BATCH, 3, 16, 16, generator=data) * 2 - 1
    labels = torch.randint(0, CLASSES, (BATCH,), generator=data)
    noise = torch.randn(x0.shape, generator=data)
    return model, per_timestep_losses(objective, x0, labels, noise, [5, 80])


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _assert_same_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    now = model.state_dict()
    assert all(torch.equal(now[name], value) for name, value in state.items())


# ----------------------------------------------------------------------------- directions


def test_each_direction_filter_has_the_norm_of_its_weight_filter_and_biasbn_is_zero() -> None:
    model = ConvNet()
    with torch.no_grad():
        model.conv.weight[1].zero_()  # a dead filter gets a dead direction
    direction = random_direction(model, _generator(0))
    params = dict(model.named_parameters())
    assert set(direction) == set(params)
    for name in ("conv.weight", "linear.weight"):
        weight, d = params[name].detach(), direction[name]
        assert d.shape == weight.shape
        for j in range(weight.shape[0]):
            if j == 1 and name == "conv.weight":
                assert torch.count_nonzero(d[j]) == 0
                continue
            assert float(d[j].norm()) == pytest.approx(float(weight[j].norm()), rel=1e-6)
            cosine = float((d[j] * weight[j]).sum() / (d[j].norm() * weight[j].norm()))
            assert abs(cosine) < 0.99  # random, not the weight rescaled
    for name in ("conv.bias", "norm.weight", "norm.bias", "linear.bias"):
        assert torch.count_nonzero(direction[name]) == 0


def test_ignore_none_keeps_the_filters_and_uses_the_weight_for_1d_parameters() -> None:
    model = ConvNet()
    biasbn = random_direction(model, _generator(0), ignore="biasbn")
    none = random_direction(model, _generator(0), ignore="none")
    for name, p in model.named_parameters():
        expected = biasbn[name] if p.dim() > 1 else p.detach()
        assert torch.equal(none[name], expected), name
    assert torch.count_nonzero(none["norm.weight"]) == 4  # GroupNorm gains start at 1
    with pytest.raises(DmstabError, match="ignore must be one of"):
        random_direction(model, _generator(0), ignore="bias")  # type: ignore[arg-type]


def test_layer_norm_rescales_each_layers_draw_to_the_layers_weight_norm() -> None:
    """norm="layer" (the reference's `normalize_direction`): a weight with ≥ 2 dims gets its
    Gaussian draw, the same draw as "filter", times ‖θ‖/‖draw‖; 1-D parameters stay zero."""
    model = ConvNet()
    with torch.no_grad():
        model.conv.weight[1].mul_(10.0)  # filters of unequal norms: filter ≠ layer here
    direction = random_direction(model, _generator(0), norm="layer")
    generator = _generator(0)  # the draws, one per parameter in order, 1-D ones included
    draws = {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}
    for name in ("conv.weight", "linear.weight"):
        weight, draw = dict(model.named_parameters())[name].detach(), draws[name]
        expected = draw * (weight.norm() / draw.norm())
        torch.testing.assert_close(direction[name], expected, rtol=1e-6, atol=0)
        assert float(direction[name].norm()) == pytest.approx(float(weight.norm()), rel=1e-6)
    filters = random_direction(model, _generator(0), norm="filter")
    conv_norms = torch.linalg.vector_norm(direction["conv.weight"], dim=(1, 2, 3))
    weight_norms = torch.linalg.vector_norm(model.conv.weight.detach(), dim=(1, 2, 3))
    assert not torch.allclose(conv_norms, weight_norms, rtol=0.1)  # only "filter" matches these
    assert torch.allclose(
        torch.linalg.vector_norm(filters["conv.weight"], dim=(1, 2, 3)), weight_norms, rtol=1e-6
    )
    for name in ("conv.bias", "norm.weight", "norm.bias", "linear.bias"):
        assert torch.count_nonzero(direction[name]) == 0
    with pytest.raises(DmstabError, match="norm must be one of filter, layer"):
        random_direction(model, _generator(0), norm="weight")  # type: ignore[arg-type]


def test_layer_and_filter_norm_agree_on_layers_of_one_filter() -> None:
    model = nn.Sequential(nn.Conv2d(3, 1, 3), nn.Flatten(), nn.Linear(4, 1))
    layer = random_direction(model, _generator(2), norm="layer")
    filters = random_direction(model, _generator(2), norm="filter")
    for name in ("0.weight", "2.weight"):
        torch.testing.assert_close(layer[name], filters[name], rtol=1e-6, atol=0)


def test_directions_are_reproducible_from_the_generator() -> None:
    model = ConvNet()
    first, again = random_direction(model, _generator(3)), random_direction(model, _generator(3))
    other = random_direction(model, _generator(4))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["conv.weight"], other["conv.weight"])


# --------------------------------------------------------------------------- interpolation


def test_interpolate_mixes_floats_and_takes_integers_from_the_nearer_end() -> None:
    a = {"w": torch.tensor([1.0, -3.0]), "count": torch.tensor(7)}
    b = {"w": torch.tensor([5.0, 1.0]), "count": torch.tensor(2)}
    torch.testing.assert_close(interpolate(a, b, 0.25)["w"], torch.tensor([4.0, 0.0]))
    assert int(interpolate(a, b, 0.25)["count"]) == 2
    assert int(interpolate(a, b, 0.5)["count"]) == 7
    with pytest.raises(DmstabError, match="different networks"):
        interpolate(a, {"w": b["w"]}, 0.5)
    with pytest.raises(DmstabError, match="differ at w"):
        interpolate(a, {**b, "w": torch.zeros(3)}, 0.5)


def test_curve_ends_are_each_checkpoints_exact_loss_and_the_middle_the_mean_weights() -> None:
    model_a, losses = _dm_setup(seed=1)
    model_b, _ = _dm_setup(seed=2)
    state_a, state_b = _state(model_a), _state(model_b)
    before = _state(model_a)
    curves = interpolation_curve(model_a, state_a, state_b, [0.0, 0.5, 1.0], losses)
    _assert_same_state(model_a, before)
    midpoint = {n: (state_a[n] + state_b[n]) / 2 for n in state_a}
    assert all(torch.equal(interpolate(state_a, state_b, 0.5)[n], midpoint[n]) for n in midpoint)
    fresh, _ = _dm_setup(seed=3)
    for index, state in ((0, state_b), (1, midpoint), (2, state_a)):
        fresh.load_state_dict(state)
        for name, loss in losses.items():
            assert curves[name][index] == evaluate(loss, fresh), (name, index)
    assert curves["t=5"][2] != curves["t=80"][2]


def test_curve_of_a_least_squares_model_is_its_closed_form_quadratic() -> None:
    model, x, y = _linear_problem()
    state_a = _state(model)
    state_b = {
        n: v + torch.randn(v.shape, generator=_generator(5), dtype=v.dtype)
        for n, v in state_a.items()
    }
    alphas = np.linspace(-0.5, 1.5, 9)
    curves = interpolation_curve(
        model, state_a, state_b, alphas, {"mse": lambda m: ((m(x) - y) ** 2).mean()}
    )
    xn, yn = x.numpy(), y.numpy()

    def residual(state: dict[str, Tensor]) -> np.ndarray:
        return np.asarray(xn @ state["weight"].numpy().T + state["bias"].numpy() - yn)

    r_a, r_b = residual(state_a), residual(state_b)
    # The residual is linear in θ: r(α) = r_b + α·(r_a − r_b).
    slope = r_a - r_b
    expected = (slope**2).mean() * alphas**2 + 2 * (r_b * slope).mean() * alphas + (r_b**2).mean()
    np.testing.assert_allclose(curves["mse"], expected, rtol=1e-12)


# --------------------------------------------------------------------------------- surface


def test_surface_of_a_least_squares_model_is_its_closed_form_quadratic() -> None:
    model, x, y = _linear_problem()
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
    d1, d2 = random_direction(model, _generator(6)), random_direction(model, _generator(7))
    xs, ys = np.array([-1.0, -0.25, 0.0, 0.5, 1.0]), np.array([-1.0, 0.0, 0.75])
    values = surface(model, lambda m: ((m(x) - y) ** 2).mean(), (d1, d2), xs, ys)
    assert values.shape == (3, 5)
    xn, yn = x.numpy(), y.numpy()
    r0 = xn @ model.weight.detach().numpy().T + model.bias.detach().numpy() - yn
    e1, e2 = xn @ d1["weight"].numpy().T, xn @ d2["weight"].numpy().T  # biasbn: no bias moves
    for i, yy in enumerate(ys):
        for j, xx in enumerate(xs):
            expected = (
                (e1**2).mean() * xx**2
                + (e2**2).mean() * yy**2
                + 2 * (e1 * e2).mean() * xx * yy
                + 2 * (r0 * e1).mean() * xx
                + 2 * (r0 * e2).mean() * yy
                + (r0**2).mean()
            )
            assert values[i, j] == pytest.approx(expected, rel=1e-12), (xx, yy)
    assert values[1, 2] == evaluate(lambda m: ((m(x) - y) ** 2).mean(), model)


def test_surface_centre_is_the_dm_loss_and_weights_come_back_bit_for_bit() -> None:
    model, losses = _dm_setup(seed=1)
    loss = losses["t=80"]
    before = _state(model)
    directions = (random_direction(model, _generator(8)), random_direction(model, _generator(9)))
    values = surface(model, loss, directions, [-0.5, 0.0, 0.5], [0.0, 0.5])
    _assert_same_state(model, before)
    assert values[0, 1] == evaluate(loss, model)
    assert values[0, 0] != values[0, 1]

    calls = 0

    def failing(m: nn.Module) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory")
        return loss(m)

    with pytest.raises(RuntimeError, match="out of memory"):
        surface(model, failing, directions, [-0.5, 0.0, 0.5], [0.0, 0.5])
    _assert_same_state(model, before)


# ------------------------------------------------------------------------ fixed-batch loss


def test_fixed_batch_loss_is_deterministic_per_timestep_and_averages_timesteps() -> None:
    model, losses = _dm_setup(seed=1)
    model.train()
    first = {name: evaluate(loss, model) for name, loss in losses.items()}
    assert model.training  # the evaluation's eval mode is undone
    assert first == {name: evaluate(loss, model) for name, loss in losses.items()}
    assert first["t=5"] != first["t=80"]
    loss = losses["t=5"]
    both = timestep_loss(loss.objective, loss.x0, loss.labels, loss.noise, [5, 80])
    assert evaluate(both, model) == pytest.approx((first["t=5"] + first["t=80"]) / 2, rel=1e-6)
    with pytest.raises(DmstabError, match=r"0\.\.99"):
        timestep_loss(loss.objective, loss.x0, loss.labels, loss.noise, [100])


def test_fixed_batch_loss_keeps_gradients_for_the_hessian_operator() -> None:
    model, losses = _dm_setup(seed=1)
    # Forward-mode AD has no rule for the CPU flash-attention kernel: use the math kernel.
    with sdpa_kernel(SDPBackend.MATH):
        operator = HessianOperator(model, losses["t=80"])
        u, v = torch.randn(2, operator.size, generator=_generator(10), dtype=torch.float64)
        hu, hv = operator(u), operator(v)
    assert float(hu.norm()) > 0
    assert float(v @ hu) == pytest.approx(float(u @ hv), rel=1e-4)  # H is symmetric


# ----------------------------------------------------------------------- files and figures


def test_grids_survive_an_npz_round_trip(tmp_path: Path) -> None:
    curve = LandscapeGrid(
        np.linspace(0, 1, 5), None, {"t=5": np.arange(5.0), "t=80": np.ones(5)}, {"seed": 3}
    )
    plane = LandscapeGrid(
        np.linspace(-1, 1, 4),
        np.linspace(-1, 1, 3),
        {"t=5": np.arange(12.0).reshape(3, 4)},
        {"timesteps": [5], "ignore": "biasbn"},
    )
    for grid in (curve, plane):
        loaded = load_landscape(save_landscape(grid, tmp_path / "grid.npz"))
        np.testing.assert_array_equal(loaded.xs, grid.xs)
        if grid.ys is None:
            assert loaded.ys is None
        else:
            np.testing.assert_array_equal(loaded.ys, grid.ys)
        assert list(loaded.values) == list(grid.values)
        for name, values in grid.values.items():
            np.testing.assert_array_equal(loaded.values[name], values)
        assert loaded.metadata == grid.metadata
    with pytest.raises(ValueError, match="expected"):
        LandscapeGrid(np.zeros(4), np.zeros(3), {"t=5": np.zeros((4, 3))})
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DmstabError, match=r"bad\.npz is corrupt or truncated: not a readable"):
        load_landscape(tmp_path / "bad.npz")
    np.savez(tmp_path / "header.npz", xs=np.zeros(2), values=np.zeros((1, 2)), header="{}")
    with pytest.raises(DmstabError, match=r"header\.npz is not a landscape file \(its header"):
        load_landscape(tmp_path / "header.npz")
    with pytest.raises(DmstabError, match="landscape file not found"):
        load_landscape(tmp_path / "missing.npz")


def test_figures_draw_one_line_per_curve_and_a_contour_beside_a_surface() -> None:
    from matplotlib import pyplot as plt

    alphas = np.linspace(0, 1, 5)
    line = interpolation_figure(alphas, {"t=5": alphas**2, "t=80": alphas}, "interpolation")
    assert len(line.axes[0].lines) == 2
    xs, ys = np.linspace(-1, 1, 6), np.linspace(-1, 1, 5)
    values = np.add.outer(ys**2, xs**2)
    both = surface_figure(xs, ys, values, "t=5")
    assert [ax.name for ax in both.axes[:2]] == ["rectilinear", "3d"]
    plt.close("all")


@pytest.mark.parametrize(
    ("surface", "nonconvex", "below_center"),
    [
        (lambda x, y: 1 + x**2 + y**2, 0.0, 0.0),  # a bowl with θ at its bottom
        (lambda x, y: 1 - x**2 - y**2, 1.0, 2.0),  # a dome: every point concave, corners -1
        (lambda x, y: 1 + (x - 0.6) ** 2 + y**2, 0.0, 0.36),  # a bowl whose bottom is off θ
    ],
)
def test_surface_metrics_of_closed_form_surfaces(
    surface: Callable[[np.ndarray, np.ndarray], np.ndarray], nonconvex: float, below_center: float
) -> None:
    xs = np.linspace(-1, 1, 11)
    values = surface(xs[None, :], xs[:, None])
    metrics = surface_metrics(LandscapeGrid(xs, xs, {"mean": values}))
    assert metrics["landscape/mean/nonconvex_fraction"] == nonconvex
    assert metrics["landscape/mean/below_center"] == pytest.approx(below_center, abs=1e-12)
    assert metrics["landscape/mean/center"] == pytest.approx(float(surface(0.0, 0.0)))
