"""Hessian spectra from Hessian-vector products against the explicit Hessian of a small net,
and the broadened density against PyHessian's closed form."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dmstab.analysis.hessian import (
    HessianOperator,
    SpectralDensity,
    VectorSpace,
    hutchinson_trace,
    spectral_density,
    top_eigenpairs,
)
from dmstab.analysis.spectrum import HessianConfig, spectrum

ROOT = Path(__file__).resolve().parents[2]


def _problem() -> tuple[nn.Module, Tensor, Tensor]:
    """A small tanh MLP (a few dozen parameters) with a fixed regression batch."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(32, 2, generator=generator, dtype=torch.float64)
    return model, x, y


def _operator(method: str = "forward_over_reverse") -> HessianOperator:
    model, x, y = _problem()
    return HessianOperator(model, lambda m: ((m(x) - y) ** 2).mean(), method)  # type: ignore[arg-type]


def _explicit_hessian() -> Tensor:
    """torch.autograd.functional.hessian of the same loss over the flat parameter vector."""
    model, x, y = _problem()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector: Tensor) -> Tensor:
        pieces = torch.split(vector, [math.prod(s) for s in shapes])
        params = {n: v.reshape(s) for n, v, s in zip(names, pieces, shapes, strict=True)}
        out = torch.func.functional_call(model, params, (x,))
        return ((out - y) ** 2).mean()

    return torch.autograd.functional.hessian(loss, flat)  # type: ignore[no-any-return]


def test_both_hessian_vector_products_equal_the_explicit_hessian_times_v() -> None:
    hessian = _explicit_hessian()
    v = torch.randn(
        hessian.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    for method in ("forward_over_reverse", "double_backward"):
        torch.testing.assert_close(_operator(method)(v), hessian @ v, rtol=1e-10, atol=1e-12)


def test_double_backward_keeps_the_gradient_graph_and_gives_the_same_products_bit_for_bit() -> None:
    """The double-backward operator builds the loss's gradient graph once (one loss evaluation
    for several products) and each product equals, bit for bit on the CPU, an independent double
    backward that rebuilds the graph and differentiates g·v, on a float32 conv net."""
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)
    )
    x = torch.randn(4, 3, 8, 8, generator=generator)
    y = torch.randn(4, 3, 8, 8, generator=generator)
    evaluations = 0

    def loss(m: nn.Module) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        return ((m(x) - y) ** 2).mean()

    operator = HessianOperator(model, loss, "double_backward")
    params = list(model.parameters())
    for _ in range(3):
        v = torch.randn(operator.size, generator=generator)
        split = torch.split(v, [q.numel() for q in params])
        pieces = [piece.view_as(q) for piece, q in zip(split, params, strict=True)]
        first = torch.autograd.grad(((model(x) - y) ** 2).mean(), params, create_graph=True)
        dot = sum((g * piece).sum() for g, piece in zip(first, pieces, strict=True))
        expected = torch.cat([h.flatten() for h in torch.autograd.grad(dot, params)])
        assert torch.equal(operator(v), expected)
    assert evaluations == 1


@pytest.mark.gpu
def test_a_model_on_cuda_keeps_its_vectors_on_cuda() -> None:
    """The operator's vector space is the model's device; its vectors never leave it, and a
    host vector comes back to the host."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, x, y = _problem()
    cuda = torch.device("cuda")
    model, x, y = model.to(cuda), x.to(cuda), y.to(cuda)
    hessian = _explicit_hessian()
    v = torch.randn(
        hessian.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    for method in ("forward_over_reverse", "double_backward"):
        operator = HessianOperator(model, lambda m: ((m(x) - y) ** 2).mean(), method)  # type: ignore[arg-type]
        assert operator.space == VectorSpace(torch.float64, x.device)
        on_device = operator(v.to(cuda))
        assert on_device.device.type == "cuda"
        torch.testing.assert_close(on_device.cpu(), hessian @ v, rtol=1e-10, atol=1e-12)
        assert operator(v).device.type == "cpu"


def test_top_three_eigenvalues_match_eigvalsh() -> None:
    hessian = _explicit_hessian()
    exact = torch.linalg.eigvalsh(hessian)
    by_magnitude = exact[exact.abs().argsort(descending=True)][:3].tolist()
    op = _operator()
    found = top_eigenpairs(
        op, op.size, 3, iterations=5000, tol=1e-12, generator=torch.Generator().manual_seed(2)
    )
    assert found.values == pytest.approx(by_magnitude, rel=1e-4)


TOP_OF_D = [-9.0, 8.9, 3.0, 3.0, 3.0]


def _signed_and_repeated(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(H, Q): H = Q·diag(d)·Qᵀ with a random orthogonal Q, the top of d by magnitude
    `TOP_OF_D`: -9 and 8.9 (a GAN-like ± pair that power iteration separates slowly) and a
    triple 3, the other 295 entries in (-2, 2)."""
    d = torch.cat(
        [
            torch.tensor(TOP_OF_D, dtype=torch.float64),
            torch.rand(295, generator=generator, dtype=torch.float64) * 4 - 2,
        ]
    )
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64))
    return q @ torch.diag(d) @ q.T, q


def _assert_top_eigenvectors(vectors: Tensor, q: Tensor, atol: float) -> None:
    """Orthonormal rows: Q's first two columns up to sign, then three spanning the eigenspace
    of the triple 3 (any basis of it is right)."""
    torch.testing.assert_close(
        vectors @ vectors.T, torch.eye(5, dtype=torch.float64), atol=atol, rtol=0
    )
    for i in range(2):
        assert abs(float(vectors[i] @ q[:, i])) == pytest.approx(1.0, abs=atol)
    triple = q[:, 2:5]
    torch.testing.assert_close(
        triple.T @ vectors[2:].T @ vectors[2:] @ triple,
        torch.eye(3, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


def test_top_eigenvalues_keep_repeated_and_opposite_signed_eigenvalues() -> None:
    generator = torch.Generator().manual_seed(5)
    matrix, q = _signed_and_repeated(generator)
    found = top_eigenpairs(lambda v: matrix @ v, 300, 5, generator=generator)
    assert found.values == pytest.approx(TOP_OF_D, rel=1e-6)
    _assert_top_eigenvectors(found.vectors, q, atol=1e-6)


def test_a_float32_basis_finds_the_same_eigenpairs_to_float32_rounding() -> None:
    """The problem above with float32 vectors and float32 products (a float32 model's): the
    basis is float32, the inner products float64, and the eigenpairs hold the float64 test's
    tolerances (float32 rounding of ‖H‖ = 9 is below 1e-6)."""
    generator = torch.Generator().manual_seed(5)
    matrix, q = _signed_and_repeated(generator)
    matrix = matrix.float()
    space = VectorSpace(torch.float32)
    found = top_eigenpairs(lambda v: matrix @ v, 300, 5, generator=generator, space=space)
    assert found.values == pytest.approx(TOP_OF_D, rel=1e-6)
    assert found.vectors.dtype == torch.float32
    # Unit vectors stored in float32 are unit only to float32 rounding summed over their 300
    # entries (up to about 2e-6, depending on the threads' summation order): 4e-6 here.
    _assert_top_eigenvectors(found.vectors.double(), q, atol=4e-6)


def test_float32_slq_nodes_are_the_eigenvalues_to_float32_rounding() -> None:
    """Full-length SLQ of the MLP's Hessian in float32: each run's nodes are its eigenvalues
    to float32 rounding of ‖H‖ (the float64 test asks 1e-8, beyond float32's 6e-8 epsilon)."""
    hessian = _explicit_hessian()
    exact = torch.linalg.eigvalsh(hessian)
    size = hessian.shape[0]
    single = hessian.float()
    density = spectral_density(
        lambda v: single @ v,
        size,
        steps=size,
        runs=20,
        generator=torch.Generator().manual_seed(4),
        space=VectorSpace(torch.float32),
    )
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(20, dtype=torch.float64))
    scale = float(exact.abs().max())
    torch.testing.assert_close(density.nodes[0], exact, rtol=0, atol=1e-5 * scale)


def test_hutchinson_trace_is_within_its_standard_error_of_the_exact_trace() -> None:
    exact = float(torch.trace(_explicit_hessian()))
    op = _operator()
    estimate = hutchinson_trace(op, op.size, 400, generator=torch.Generator().manual_seed(3))
    assert abs(estimate.mean - exact) < 4 * estimate.standard_error
    assert estimate.standard_error > 0


def test_slq_density_integrates_to_one_and_has_the_spectrums_moments() -> None:
    hessian = _explicit_hessian()
    exact = torch.linalg.eigvalsh(hessian)
    size = hessian.shape[0]  # the products are tested above; the explicit matrix is faster
    density = spectral_density(
        lambda v: hessian @ v,
        size,
        steps=size,
        runs=200,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(density.weights.sum(dim=1), torch.ones(200, dtype=torch.float64))
    # With every Lanczos step, each run's nodes are the exact eigenvalues (the Krylov space is
    # the whole space) and E[weights] = 1/n: the moments converge to tr(H^p)/n.
    torch.testing.assert_close(density.nodes[0], exact, rtol=1e-8, atol=1e-10)
    for power in (1, 2):
        target = float((exact**power).mean())
        assert density.moment(power) == pytest.approx(target, rel=0.1)
    assert density.variance() > 0


def test_spectrum_of_least_squares_has_the_eigenvectors_of_2xtx_over_n() -> None:
    """L(w) = mean_i (w·x_i − y_i)², a bias-free linear model: H = 2XᵀX/n exactly, whatever w.
    The saved eigenvectors are XᵀX's top three up to sign (float32), unit and orthogonal."""
    generator = torch.Generator().manual_seed(6)
    scales = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64) * scales
    y = torch.randn(40, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    config = HessianConfig(top_k=3, tolerance=1e-10, trace_samples=2, slq_runs=1)
    result = spectrum(model, lambda m: ((m(x) - y) ** 2).mean(), config)

    values, vectors = torch.linalg.eigh(2 * x.T @ x / len(x))  # ascending, all positive
    assert result.top == pytest.approx(values.flip(0)[:3].tolist(), rel=1e-8)
    assert result.eigenvectors.dtype == torch.float32 and result.eigenvectors.shape == (3, 6)
    found = result.eigenvectors.double()
    torch.testing.assert_close(
        found @ found.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0
    )
    for i in range(3):
        assert abs(float(found[i] @ vectors[:, -1 - i])) == pytest.approx(1.0, abs=1e-6)
    assert result.layout == {"weight": (1, 6)}


def _mixture(
    grid: np.ndarray, nodes: list[float], weights: list[float], variance: float
) -> np.ndarray:
    """Σ_i w_i·N(x; λ_i, variance) at every x of the grid."""
    gaussians = [
        w * np.exp(-((grid - node) ** 2) / (2 * variance)) / np.sqrt(2 * np.pi * variance)
        for node, w in zip(nodes, weights, strict=True)
    ]
    return np.sum(gaussians, axis=0)


def test_broadened_density_of_one_run_is_the_gaussian_mixture_of_its_nodes() -> None:
    """Nodes 1, 2.5, 3 with weights .2, .5, .3: PyHessian's grid runs from 1 − 0.01 to
    3 + 0.01 in 10,000 points; the kernel variance is σ²·(grid range), the range being above 1;
    with σ² = 1e-6 every Gaussian lies well inside the grid, so the density is the mixture."""
    nodes, weights = [1.0, 2.5, 3.0], [0.2, 0.5, 0.3]
    density = SpectralDensity(
        torch.tensor([nodes], dtype=torch.float64), torch.tensor([weights], dtype=torch.float64)
    ).broadened(1e-6)
    grid = density.grid.numpy()
    np.testing.assert_allclose(grid, np.linspace(0.99, 3.01, 10_000), rtol=0, atol=1e-12)
    assert density.kernel_variance == pytest.approx(1e-6 * 2.02, rel=1e-12)
    expected = _mixture(grid, nodes, weights, 1e-6 * 2.02)
    np.testing.assert_allclose(density.density.numpy(), expected, rtol=1e-6, atol=1e-9)
    assert float(density.density.sum()) * (grid[1] - grid[0]) == pytest.approx(1.0, rel=1e-12)
    assert np.trapezoid(density.density.numpy(), grid) == pytest.approx(1.0, rel=1e-6)


def test_broadened_density_averages_runs_over_their_mean_extent_and_skips_padding() -> None:
    """Two runs, the second cut short (a zero node of weight 0 pads it): the grid spans the
    runs' mean smallest and largest nodes ± 0.01, (0.2 + 0.4)/2 − 0.01 to (0.5 + 0.6)/2 + 0.01,
    whose range is below 1, so the kernel variance is σ² itself; the density is the runs' mean
    mixture rescaled to sum to 1 over the grid (the tails beyond it are cut)."""
    nodes = [[0.2, 0.3, 0.5], [0.4, 0.6, 0.0]]
    weights = [[0.3, 0.3, 0.4], [0.5, 0.5, 0.0]]
    sigma_squared = 1e-3
    density = SpectralDensity(
        torch.tensor(nodes, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    ).broadened(sigma_squared)
    grid = density.grid.numpy()
    assert (grid[0], grid[-1]) == pytest.approx((0.29, 0.56), abs=1e-12)
    assert density.kernel_variance == sigma_squared
    mean = (
        _mixture(grid, nodes[0], weights[0], sigma_squared)
        + _mixture(grid, nodes[1][:2], weights[1][:2], sigma_squared)
    ) / 2
    expected = mean / (mean.sum() * (grid[1] - grid[0]))
    np.testing.assert_allclose(density.density.numpy(), expected, rtol=1e-10)


def test_hessian_of_an_edm2_loss_equals_double_backward_on_the_model_itself() -> None:
    """The EDM objective reads the denoiser's own methods (`logvar`), so the operator must
    evaluate the loss on the model itself with other parameter values, not on a wrapper."""
    from dmstab.commands.study import analysis_losses
    from dmstab.commands.subjects import Subject
    from dmstab.config import load_recipe
    from dmstab.data import build_dataset
    from dmstab.models import build_model

    overrides = ["model.channels=8", "model.channel_mult=[1]", "model.edm2.channels_per_head=8"]
    overrides += ["data.resolution=8"]
    recipe = load_recipe(ROOT / "recipes" / "edm2_mini.yaml", [*overrides, "hessian.batch_size=2"])
    classes = build_dataset(recipe.data).num_classes
    torch.manual_seed(0)
    state: dict[str, object] = {"model": build_model(recipe, classes).state_dict(), "step": 0}
    state["num_classes"] = classes
    subject = Subject(checkpoint=ROOT, state=state, recipe=recipe, label="edm2")
    model, losses = analysis_losses(subject, torch.device("cpu"), recipe.analysis(HessianConfig))
    loss = next(iter(losses.values()))
    operator = HessianOperator(model, loss, method="double_backward")
    v = torch.randn(operator.size, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    first = torch.autograd.grad(loss(model), params, create_graph=True)
    pieces = torch.split(v, [p.numel() for p in params])
    dot = sum((g * piece.view_as(g)).sum() for g, piece in zip(first, pieces, strict=True))
    expected = torch.cat([h.flatten() for h in torch.autograd.grad(dot, params)])
    assert torch.allclose(operator(v), expected, rtol=1e-4, atol=1e-6)
