"""Loss, perplexity and bits per byte over batches of windows."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lmforge.objectives import token_nll
from lmforge.runtime import autocast_ctx


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    token_bytes: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Score (x, y) or (x, y, mask) batches; mask marks the targets to count (sliding windows).

    loss/perplexity average over every counted target; bits per byte divides the summed NLL of
    targets that are text by their true UTF-8 byte count, so special tokens (0 bytes) are left out
    of both sides and tokenizers of any vocabulary compare fairly.
    """
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    text_nll = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        mask = batch[2].to(device) if len(batch) > 2 else torch.ones_like(y, dtype=torch.bool)
        mask = mask & (y >= 0)
        with autocast_ctx(device, dtype):
            nll = token_nll(model, x, y).double()
        nbytes = token_bytes[y.clamp_min(0)].double() * mask
        nll_sum += (nll * mask).sum()
        count += mask.sum()
        text_nll += (nll * (nbytes > 0)).sum()
        n_bytes += nbytes.sum()
    model.train(was_training)
    n = count.item()
    if n == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "bpb": float("nan"), "tokens": 0, "bytes": 0}
    loss = nll_sum.item() / n
    nb = n_bytes.item()
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": text_nll.item() / (math.log(2) * nb) if nb else float("nan"),
        "tokens": int(n),
        "bytes": int(nb),
    }
