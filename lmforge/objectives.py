"""Training objectives. The loss is a mean over target tokens (ignore_index=-1 marks no-target).

`loss_for` and `evaluator_for` pick the loss and the validation metric for a model config's
objective: "autoregressive" (next-token cross-entropy) or "diffusion" (`lmforge.diffusion`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def autoregressive_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)


def token_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T) in nats, for evaluation."""
    logits = model(x)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().clamp_min(0), reduction="none")
    return nll.view_as(y)


def loss_for(model_cfg: ModelConfig, tokenizer: Any) -> LossFn:
    """The training loss `(model, x, y) -> scalar` of `model_cfg.objective`."""
    if model_cfg.objective == "autoregressive":
        return autoregressive_loss
    if model_cfg.objective == "diffusion":
        from lmforge.diffusion import diffusion_loss, mask_id_of

        return functools.partial(diffusion_loss, mask_id=mask_id_of(tokenizer))
    raise ConfigError(f"model.objective {model_cfg.objective!r} has no loss")


def evaluator_for(model_cfg: ModelConfig, tokenizer: Any) -> Callable[..., dict[str, float]]:
    """The validation metric with `evaluate_loss`'s signature and result: the NLL for autoregressive
    models, the ELBO (a bound on the NLL, in the same units) for diffusion ones."""
    if model_cfg.objective == "diffusion":
        from lmforge.diffusion import elbo_evaluator

        return elbo_evaluator(tokenizer)
    from lmforge.evaluate import evaluate_loss

    return evaluate_loss
