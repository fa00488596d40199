"""Updates masked on the device (dmstab.train.optim.masked_step, dmstab.train.ema.EMA): a step
whose verdict is False leaves everything exactly as if it had not been taken, checked against
runs that simply leave those steps out (computed by torch's Adam and a plain EMA loop)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmstab.config import OptimConfig
from dmstab.train.ema import EMA
from dmstab.train.optim import build_optimizer, gradient_norm, masked_step, step_and_restore

VERDICTS = [True, False, True, False, False, True, True]
FIRST_SKIPPED = [False, True, True]  # skipped before Adam has any state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))


def _gradients(model: nn.Module, steps: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        for _ in range(steps)
    ]


# (fused, the unfused GPU path run on the CPU): found_inf, the CPU's host read, the restore.
PATHS = [(True, False), (False, False), (False, True)]


@pytest.mark.parametrize(("fused", "restore"), PATHS)
@pytest.mark.parametrize("verdicts", [VERDICTS, FIRST_SKIPPED])
def test_a_masked_step_is_exactly_no_step(fused: bool, restore: bool, verdicts: list[bool]) -> None:
    config = OptimConfig(name="adamw", lr=0.1, weight_decay=0.01)
    masked, reference = _model(), _model()
    masked_opt = build_optimizer(masked, config, fused)
    reference_opt = build_optimizer(reference, config, fused)
    for accept, grads in zip(verdicts, _gradients(masked, len(verdicts)), strict=True):
        for p, g in zip(masked.parameters(), grads, strict=True):
            p.grad = g.clone() if accept else torch.full_like(g, float("nan"))
        (step_and_restore if restore else masked_step)(masked_opt, torch.tensor(accept))
        if accept:
            for p, g in zip(reference.parameters(), grads, strict=True):
                p.grad = g.clone()
            reference_opt.step()
    for mine, theirs in zip(masked.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(masked_opt.state.values(), reference_opt.state.values(), strict=True):
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize(("rate", "warmup"), [(0.9999, True), (0.9, False), (0.5, True)])
def test_the_masked_ema_equals_a_plain_loop_over_the_accepted_steps(
    rate: float, warmup: bool
) -> None:
    model = _model()
    ema = EMA(model, rate, warmup)
    expected = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    applied = 0
    for step, accept in enumerate(VERDICTS * 3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
            model.get_buffer("1.num_batches_tracked").fill_(step)  # integer: copied if accepted
        ema.update(model, torch.tensor(accept))
        if accept:  # improved-diffusion's update with the warm-up rate of `applied` updates
            r = min(rate, (1 + applied) / (10 + applied)) if warmup else rate
            for key, value in model.state_dict().items():
                if value.dtype.is_floating_point:
                    expected[key].lerp_(value.float(), 1.0 - r)
                else:
                    expected[key].copy_(value)
            applied += 1
    assert ema.updates == applied
    for key, value in expected.items():
        assert torch.equal(ema.shadow[key], value), key


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_norm_is_clip_grad_norms_value_with_the_same_clipping(clip: float | None) -> None:
    """`gradient_norm` skips clip_grad_norm_'s multiply by 1.0 when there is no clip: the same
    norm and gradients, bit for bit (and with a clip, the same scaled gradients)."""
    ours, theirs = _model(), _model()
    for model in (ours, theirs):
        for p, g in zip(model.parameters(), _gradients(model, 1)[0], strict=True):
            p.grad = g
    norm = gradient_norm(ours, clip)
    max_norm = float("inf") if clip is None else clip
    assert torch.equal(norm, nn.utils.clip_grad_norm_(theirs.parameters(), max_norm))
    assert clip is None or norm > clip  # the clip case really scales
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
