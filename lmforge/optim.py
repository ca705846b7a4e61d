"""Optimizer construction and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings (>= 2-D); never norms or biases."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Learning rate for the 0-based `step`.

    cosine: linear warmup to lr, cosine decay to min_lr at total_steps.
    wsd: warmup, constant, then linear decay to min_lr over the last `decay_fraction` of steps.
    constant: warmup, then lr.
    """
    total = total_steps or cfg.max_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = cfg.decay_start or total - max(1, int(round(total * cfg.decay_fraction)))
        decay_steps = max(1, total - decay_start)
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start + 1) / decay_steps)
        return cfg.lr + (cfg.min_lr - cfg.lr) * frac
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps + 1) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
