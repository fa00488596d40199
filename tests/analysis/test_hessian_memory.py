"""The memory estimate of `dmstab hessian` against the tensors a spectrum really holds, and
its dry run on the paper's recipe."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dmstab.analysis.hessian_memory import hessian_memory
from dmstab.analysis.spectrum import HessianConfig, spectrum
from tests.helpers import RECIPES, Runner


def _live_tensor_bytes() -> int:
    """Bytes of every storage a live Python tensor holds (views counted once)."""
    storages = {}
    for item in gc.get_objects():
        if issubclass(type(item), Tensor) and item.device.type != "meta":
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_the_vectors_a_spectrum_holds_are_what_the_estimate_says() -> None:
    """A float32 MLP of P = 8,286 parameters, 20 Lanczos steps for each of 2 eigenvalues (the
    tolerance never stops them) and 16-step SLQ: the estimate's basis rows are 20 + 2. In each
    Lanczos phase the live tensors, less those before the spectrum, are measured as a product
    returns: their peak holds the basis and eigenvectors, and stays within them plus the work
    vectors (double backward's kept parameters' copy and gradient among them: the loss is
    evaluated once, for all 58 products)."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 40), nn.Tanh(), nn.Linear(40, 6))
    x, y = torch.randn(4, 200, generator=generator), torch.randn(4, 6, generator=generator)
    config = HessianConfig(
        top_k=2, max_iterations=20, tolerance=1e-30, trace_samples=2, slq_runs=1, lanczos_steps=16
    )
    gc.collect()
    before = _live_tensor_bytes()
    peak, products, evaluations = 0, 0, 0

    def loss(m: nn.Module) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        return ((m(x) - y) ** 2).mean()

    def progress(done: int, total: int) -> None:
        nonlocal peak, products
        products = done
        if done in (2, 22, 44):  # the first and second top-k runs and the SLQ run
            peak = max(peak, _live_tensor_bytes() - before)

    spectrum(model, loss, config, progress)
    estimate = hessian_memory(config, model)
    size = estimate.parameters
    assert size == 8286 and estimate.entry_bytes == 4 and estimate.basis_rows == 22
    assert estimate.basis == 22 * size * 4
    assert products == 2 * 20 + 2 + 16 and evaluations == 1
    assert estimate.basis <= peak <= estimate.basis + estimate.work


def test_dry_run_of_the_paper_recipe_fits_an_80_gb_gpu(dmstab: Runner, tmp_path: Path) -> None:
    """`dmstab hessian recipes/fig4_hessian_cifar10_dm.yaml --dry-run`: the 52,546,438
    parameters of improved-diffusion's CIFAR-10 model (FACTS), counted on the meta device, and
    100 Lanczos steps beside 3 eigenvectors in float32, well under 80 GB; nothing is trained
    or written."""
    recipe = RECIPES / "fig4_hessian_cifar10_dm.yaml"
    done = dmstab("hessian", str(recipe), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["parameters"] == 52_546_438 and plan["basis_rows"] == 103
    assert plan["device_bytes"] < 80e9
    assert "Lanczos basis and top-k eigenvectors" in done.stderr  # the table, beside the JSON
    assert list(tmp_path.iterdir()) == []
