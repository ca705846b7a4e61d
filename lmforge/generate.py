"""Sampling from a trained model: temperature, top-k, top-p, stop tokens/strings, KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint import load_model_weights, read_state, resolve_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.kv_cache import KVCache
from lmforge.models.transformer import Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits (B, V) outside the top-k and outside the top-p nucleus with -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) → next ids (B,). Temperature 0 is greedy."""
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / p.temperature, p.top_k, p.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eos_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time, using a KV cache; the context slides when it is full."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ctx_len = model.cfg.seq_len
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed)
    tokens = list(prompt_ids) or ([eos_id] if eos_id is not None else [0])
    cache = KVCache(model.cfg, 1, ctx_len, device, dtype)
    window = tokens[-ctx_len:]
    logits = model(torch.tensor([window], device=device), kv_cache=cache, start_pos=0)[:, -1]
    pos = len(window)
    for _ in range(params.max_new_tokens):
        nxt = int(sample_next(logits, params, gen)[0])
        if eos_id is not None and nxt == eos_id:
            return
        yield nxt
        tokens.append(nxt)
        if pos >= ctx_len:
            # full: keep the last half of the context and prefill it again (amortised cost)
            window = tokens[-(ctx_len // 2):]
            logits = model(torch.tensor([window], device=device), kv_cache=cache, start_pos=0)[:, -1]
            pos = len(window)
        else:
            logits = model(torch.tensor([[nxt]], device=device), kv_cache=cache, start_pos=pos)[:, -1]
            pos += 1


def generate_text(model: Transformer, tokenizer, prompt: str, params: SamplingParams) -> str:
    """The completion of `prompt` (without the prompt), cut at the first stop string."""
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    out: list[int] = []
    for tok in generate_ids(model, ids, params, eos_id=tokenizer.eos_id):
        out.append(tok)
        if params.stop:
            text = tokenizer.decode(out)
            hits = [text.index(s) for s in params.stop if s in text]
            if hits:
                return text[: min(hits)]
    return tokenizer.decode(out)


def load_for_inference(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, object, dict]:
    """A checkpoint or run dir → (model in eval mode, tokenizer, state)."""
    from lmforge.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    if "model_config" not in state:
        raise CheckpointError(f"{ckpt}/state.json has no model_config")
    cfg = ModelConfig.model_validate(state["model_config"])
    model = Transformer(cfg)
    load_model_weights(model, ckpt)
    model.to(device).eval()
    if not (ckpt / "tokenizer.json").exists() and not (ckpt / "lmforge_tokenizer.json").exists():
        raise CheckpointError(f"{ckpt} has no tokenizer files")
    tokenizer = Tokenizer.load(ckpt)
    return model, tokenizer, {**state, "path": str(ckpt)}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
