"""Optimisers and learning-rate schedules from the recipe."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmstab.config import OptimConfig
from dmstab.train.lr_schedules import edm2_learning_rate


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """Adam or AdamW with the recipe's betas (AAAI paper: β1 0.8, β2 0.999); `fused`: torch's
    one-kernel update (same formula, other float rounding), which can skip a step on the
    device (`masked_step`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return kind(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None
    )


@torch.no_grad()
def masked_step(optimizer: torch.optim.Optimizer, accept: Tensor) -> None:
    """`optimizer.step()` where the boolean tensor `accept` is True; else leave the parameters
    and the optimiser state exactly as they were, without reading `accept` on the host.

    A fused Adam takes `found_inf` as GradScaler passes it: the kernel skips the update and
    the step count is rolled back on the device. On the CPU, where reading `accept` waits for
    nothing, the step runs only when it is True. Otherwise the step runs and `torch.where`
    restores the parameters and state saved before it (bit for bit either way); on the CPU
    that backup and restore cost as much as the step itself.
    """
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = (~accept).to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        return
    if accept.device.type == "cpu":  # no device to wait for: the host reads it for free
        if bool(accept):
            optimizer.step()
        return
    step_and_restore(optimizer, accept)


@torch.no_grad()
def step_and_restore(optimizer: torch.optim.Optimizer, accept: Tensor) -> None:
    """`masked_step` of an unfused optimiser on a GPU: the step, then parameters and state put
    back by `torch.where` where `accept` is False."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    before = [(p.clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for p in params]
    optimizer.step()
    for param, (old_param, old_state) in zip(params, before, strict=True):
        pairs = [(param, old_param)]  # state Adam creates in this step was zeros (step 0) before
        state = optimizer.state[param].items()
        pairs += [(value, old_state.get(key, torch.zeros_like(value))) for key, value in state]
        for new, old in pairs:
            torch.where(accept.to(new.device), new, old, out=new)


@torch.no_grad()
def gradient_norm(model: nn.Module, clip: float | None) -> Tensor:
    """The L2 norm of all gradients as one vector (`clip_grad_norm_`'s value, bit for bit), the
    gradients scaled down to norm `clip` where it is exceeded. Without a clip `clip_grad_norm_`
    would still multiply every gradient by 1.0, one small op per tensor (on the CPU, ~1 ms a
    step for the quickstart's 149 tensors); `get_total_norm` (torch >= 2.6) skips that."""
    params = list(model.parameters())
    if clip is not None or not hasattr(nn.utils, "get_total_norm"):
        return nn.utils.clip_grad_norm_(params, float("inf") if clip is None else clip).detach()
    return nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def learning_rate(cfg: OptimConfig, step: int, batch_size: int) -> float:
    """The lr of optimiser step `step` (from 1).

    constant: `lr` after an optional linear warm-up over `warmup_steps`. inverse_sqrt: EDM2's
    α_ref/√max(t/t_ref, 1) with its warm-up, t counting the images seen before this step.
    """
    if cfg.schedule == "inverse_sqrt":
        images_seen = (step - 1) * batch_size
        ref, rampup = round(cfg.ref_kimg * 1000), round(cfg.rampup_kimg * 1000)
        return edm2_learning_rate(images_seen, cfg.lr, ref, rampup)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    return cfg.lr
