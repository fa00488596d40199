"""Optimisers and learning-rate schedules from the recipe."""

from __future__ import annotations

import torch
from torch import nn

from dmstab.recipe import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW with the recipe's betas (AAAI paper: β1 0.8, β2 0.999)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def learning_rate(cfg: OptimConfig, step: int) -> float:
    """Constant lr after an optional linear warm-up over `warmup_steps` (step counts from 1)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    return cfg.lr
