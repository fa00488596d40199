"""Optimisers and learning-rate schedules from the recipe."""

from __future__ import annotations

import torch
from torch import nn

from dmstab.config import OptimConfig
from dmstab.train.lr_schedules import edm2_learning_rate


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW with the recipe's betas (AAAI paper: β1 0.8, β2 0.999)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


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
