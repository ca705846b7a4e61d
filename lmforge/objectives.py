"""Training objectives. The loss is a mean over target tokens (ignore_index=-1 marks no-target)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autoregressive_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)


def token_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T) in nats, for evaluation."""
    logits = model(x)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().clamp_min(0), reduction="none")
    return nll.view_as(y)
