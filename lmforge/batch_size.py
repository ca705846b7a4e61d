"""`lmforge train --find-batch-size`: the largest micro-batch that fits on the GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.config import Recipe
from lmforge.errors import LmforgeError


def _fits(recipe: Recipe, batch: int, device: torch.device) -> bool:
    from lmforge.models.transformer import Transformer
    from lmforge.objectives import autoregressive_loss
    from lmforge.optim import make_optimizer
    from lmforge.runtime import autocast_ctx, resolve_dtype

    model = opt = None
    try:
        model = Transformer(recipe.model).to(device)
        opt = make_optimizer(model, recipe.train, device)
        x = torch.randint(0, recipe.model.vocab_size, (batch, recipe.model.seq_len), device=device)
        for _ in range(2):  # the second step holds the optimizer state as well
            with autocast_ctx(device, resolve_dtype(recipe.train.dtype, device)):
                loss = autoregressive_loss(model, x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, opt
        torch.cuda.empty_cache()


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest batch in 1..limit for which `fits` holds (0 if none), assuming that every batch
    below a fitting one fits too: doubling until one fails, then bisecting, about 2*log2 trials."""
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def find_batch_size(recipe: Recipe, log: Callable[[str], None] = print, limit: int = 4096) -> int:
    """Binary search over real forward/backward/optimizer steps; prints the gradient accumulation too."""
    if not torch.cuda.is_available():
        raise LmforgeError("--find-batch-size needs a CUDA GPU (on the CPU, memory is rarely the limit)")
    device = torch.device("cuda")
    if recipe.model.vocab_size == 0:
        from lmforge.tokenizer import load_tokenizer

        recipe.model.vocab_size = load_tokenizer(recipe.tokenizer.dir).vocab_size
    lo = largest_fitting(lambda batch: _fits(recipe, batch, device), limit)
    if lo == 0:
        raise LmforgeError("not even a micro-batch of 1 fits: use a smaller model or train.seq_len")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    per_micro = lo * recipe.model.seq_len * world
    log(f"largest micro_batch_size that fits: {lo} ({per_micro:,} tokens per micro-step)")
    if recipe.train.batch_size_tokens:
        accum = -(-recipe.train.batch_size_tokens // per_micro)
        log(f"for batch_size_tokens = {recipe.train.batch_size_tokens:,}: gradient accumulation {accum}")
    return lo
