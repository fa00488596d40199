"""Hessian spectra from Hessian-vector products against the explicit Hessian of a small net."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from dmstab.analysis.hessian import (
    HessianOperator,
    hutchinson_trace,
    spectral_density,
    top_eigenvalues,
)


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


@pytest.mark.gpu
def test_a_model_on_cuda_takes_and_returns_host_vectors() -> None:
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
        product = operator(v)
        assert product.device.type == "cpu"
        torch.testing.assert_close(product, hessian @ v, rtol=1e-10, atol=1e-12)


def test_top_three_eigenvalues_match_eigvalsh() -> None:
    hessian = _explicit_hessian()
    exact = torch.linalg.eigvalsh(hessian)
    by_magnitude = exact[exact.abs().argsort(descending=True)][:3].tolist()
    op = _operator()
    found = top_eigenvalues(
        op, op.size, 3, iterations=5000, tol=1e-12, generator=torch.Generator().manual_seed(2)
    )
    assert found == pytest.approx(by_magnitude, rel=1e-4)


def test_top_eigenvalues_keep_repeated_and_opposite_signed_eigenvalues() -> None:
    """H = Q·diag(d)·Qᵀ with a random orthogonal Q: the top of d by magnitude is -9 and 8.9
    (a GAN-like ± pair that power iteration separates slowly) and a triple 3."""
    generator = torch.Generator().manual_seed(5)
    d = torch.cat(
        [
            torch.tensor([-9.0, 8.9, 3.0, 3.0, 3.0], dtype=torch.float64),
            torch.rand(295, generator=generator, dtype=torch.float64) * 4 - 2,
        ]
    )
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64))
    matrix = q @ torch.diag(d) @ q.T
    found = top_eigenvalues(lambda v: matrix @ v, 300, 5, generator=generator)
    assert found == pytest.approx([-9.0, 8.9, 3.0, 3.0, 3.0], rel=1e-6)


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
