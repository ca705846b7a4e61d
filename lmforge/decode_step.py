"""One decode step (one new token per row) of `models.transformer.Transformer`, written for speed.

It computes what `Transformer.forward` computes for T = 1, with fewer operator calls per layer
(rotary embedding of q and k together, 2-D activations, cache writes in place, RMSNorm as one
LayerNorm kernel) and, on the CPU, with each weight also kept in other fp32 layouts: for the few
rows of a decode step, the BLAS call behind `nn.Linear` is far from the best kernel. On one 2-core
AVX2 machine the output layer (16,384 x 384) took 4.3 ms at B=1 as nn.Linear, 2.0 ms from weights
packed for oneDNN, 1.7 ms from an (in, out) copy and 1.2 ms from that copy cut into two batched
halves (one per thread: a matrix-vector product runs on one core); at B=8, 7.7, 2.8, 10.8 and
6.2 ms. Another machine ranked them differently (at B=8 it preferred nn.Linear over 2048-row
blocks). So each layer times these ways inside the first decode steps of each batch size and keeps
the fastest. The copies cost memory (two fp32 copies of each weight, up to COPY_BUDGET). Tests
compare the engine's output with the model's own forward pass, so the ways cannot drift apart.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kv_cache import KVCache
from lmforge.models.layers import RMSNorm

ROW_BLOCK = 2048
TRIALS = 3
"""Timed calls of each layout per (layer, batch size) before the faster one is kept."""
COPY_BUDGET = 2 << 30
"""Bytes of weight copies (packed, transposed) a DecodeStep may hold; layers met once it is spent
keep nn.Linear alone, so a billion-parameter model does not triple its memory."""


def supports(model: nn.Module) -> bool:
    """True for the lmforge Transformer layout this step re-implements."""
    cfg = getattr(model, "cfg", None)
    return (getattr(cfg, "arch", None) in ("gpt2", "llama") and hasattr(model, "blocks")
            and hasattr(model, "tok_emb") and not model.training)


class DecodeStep:
    def __init__(self, model: nn.Module) -> None:
        self.m, cfg = model, model.cfg
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.llama = cfg.arch == "llama"
        if self.llama:
            half = self.hd // 2
            # rotate_half(x) * sin == roll(x, half) * sin_signed, one roll instead of slice+neg+cat
            self.sin_signed = torch.cat([-model.rope_sin[:, :half], model.rope_sin[:, half:]], -1)
        p = model.tok_emb.weight
        # on the CPU each linear layer times other ways (see the module's docstring); bf16/fp16 layers
        # also try fp32 copies: without native bf16 matmuls (AVX2) the bf16 output layer took 7.9 ms
        # at 8 rows here, its fp32 oneDNN copy 2.8 ms (at 1 row bf16 wins: half the bytes to read)
        self.cpu = p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        self._ways: dict[nn.Module, list[Callable[[torch.Tensor], torch.Tensor]] | None] = {}
        self._times: dict[tuple[nn.Module, int], list[list[float]]] = {}
        self._choice: dict[tuple[nn.Module, int], int] = {}
        self._copied = 0
        # RMSNorm as a LayerNorm of [x, -x] (mean 0, variance mean(x^2): the same numbers): on the
        # CPU, F.rms_norm is six operator calls (~80 us per call inside the decode loop, ~1 ms of a
        # 9 ms step), LayerNorm one fused kernel
        self._doubled = {mod: torch.cat([mod.weight, mod.weight]).detach() for mod in model.modules()
                         if isinstance(mod, RMSNorm)} if self.cpu else {}

    def _ways_of(self, mod: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
        """The ways to compute a linear layer, made on first use: as it is, from weights packed in
        oneDNN's blocked layout, from an (in, out) copy, from that copy split along `in` into
        batched matmuls (one per thread), and (very wide layers) in row blocks. None where only the
        first applies (quantized layers)."""
        ways = self._ways.get(mod, False)
        if ways is False:
            w = getattr(mod, "weight", None)
            ways = None
            if isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.is_floating_point():
                w, bias = w.detach().float(), None if mod.bias is None else mod.bias.detach().float()
                ways = [mod]
                size = 2 * w.numel() * w.element_size()
                if self._copied + size <= COPY_BUDGET:
                    self._copied += size
                    fast = []
                    packed = _onednn_pack(w)
                    if packed is not None:
                        fast.append(functools.partial(_onednn, packed, bias))
                    wt = w.t().contiguous()
                    fast.append(functools.partial(_transposed, wt, bias))
                    fast += [functools.partial(_split_inputs, wt.view(p, -1, wt.shape[1]), bias)
                             for p in k_splits(wt.shape[0])]
                    if mod.weight.dtype != torch.float32:
                        fast = [functools.partial(_in_fp32, f) for f in fast]
                    ways += fast
                if w.shape[0] >= 2 * ROW_BLOCK and mod.weight.dtype == torch.float32:  # views, no copy
                    bias = mod.bias.split(ROW_BLOCK) if mod.bias is not None else [None] * len(w.split(ROW_BLOCK))
                    ways.append(functools.partial(_rows, list(zip(w.split(ROW_BLOCK), bias, strict=True))))
                if len(ways) == 1:
                    ways = None
            self._ways[mod] = ways
        return ways

    def _linear(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ways = self._ways_of(mod) if self.cpu else None
        if ways is None:
            return mod(x)
        key = (mod, x.shape[0])
        choice = self._choice.get(key)
        if choice is not None:
            return ways[choice](x)
        # still choosing: take the ways in turn, timing each in the real decode loop (warm or cold caches alike)
        times = self._times.setdefault(key, [[] for _ in ways])
        way = min(range(len(ways)), key=lambda k: len(times[k]))
        t0 = time.perf_counter()
        y = ways[way](x)
        times[way].append(time.perf_counter() - t0)
        if len(times[-1]) == TRIALS:
            self._choice[key] = min(range(len(ways)), key=lambda k: sorted(times[k])[TRIALS // 2])
        return y

    def __call__(self, tokens: torch.Tensor, positions: list[int], cache: KVCache) -> torch.Tensor:
        """tokens (B,) at `positions` (one per row, rows [0, B) of the cache) → logits (B, vocab)."""
        m, B = self.m, tokens.shape[0]
        shared = min(positions) == max(positions)
        kv_len = max(positions) + 1
        pos = torch.tensor(positions, device=tokens.device)
        x = m.tok_emb(tokens)  # (B, n_embd)
        if self.llama:
            cos, sin = m.rope_cos[pos].unsqueeze(1), self.sin_signed[pos].unsqueeze(1)  # (B, 1, head_dim)
        else:
            x = x + m.pos_emb(pos)
        mask = None
        if not shared:
            mask = (torch.arange(kv_len, device=tokens.device) <= pos[:, None]).view(B, 1, 1, kv_len)
            rows = torch.arange(B, device=tokens.device)
        nq, nqk = self.nh, self.nh + self.nkv
        for i, blk in enumerate(m.blocks):
            qkv = self._linear(blk.attn.qkv, self._norm(blk.norm1, x)).view(B, nqk + self.nkv, self.hd)
            qk = qkv[:, :nqk]
            if self.llama:
                qk = torch.addcmul(qk * cos, qk.roll(self.hd // 2, -1), sin)
            if shared:
                cache.k[i, :B, :, positions[0]] = qk[:, nq:]
                cache.v[i, :B, :, positions[0]] = qkv[:, nqk:]
            else:
                cache.k[i, rows, :, pos] = qk[:, nq:]
                cache.v[i, rows, :, pos] = qkv[:, nqk:]
            y = F.scaled_dot_product_attention(
                qk[:, :nq].unsqueeze(2), cache.k[i, :B, :, :kv_len], cache.v[i, :B, :, :kv_len],
                attn_mask=mask, enable_gqa=self.nkv != self.nh)  # (B, n_head, 1, head_dim)
            x = x + self._linear(blk.attn.proj, y.view(B, nq * self.hd))
            x = x + self._mlp(blk.mlp, self._norm(blk.norm2, x))
        return self._linear(m.lm_head, self._norm(m.norm, x))

    def _norm(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w2 = self._doubled.get(mod)
        if w2 is None:
            return mod(x)
        n = x.shape[-1]
        return F.layer_norm(torch.cat([x, x.neg()], -1), (2 * n,), w2, None, mod.eps)[:, :n]

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = self._linear(mlp.up, x)
        if mlp.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self._linear(mlp.down, h)


def _onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """W reordered into oneDNN's blocked layout, None where this PyTorch build has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w)
    except (RuntimeError, AttributeError):
        return None


def _onednn(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T with oneDNN's matmul on the packed W (the fastest way at 2-16 rows on an AVX2 CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def k_splits(n_in: int) -> list[int]:
    """How many pieces to cut a layer's inputs into for `_split_inputs`: one or two per thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        return []
    return [p for p in (threads, 2 * threads) if n_in % p == 0 and n_in // p >= 16]


def _transposed(wt: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T from an (in, out) copy of W."""
    return x @ wt if bias is None else torch.addmm(bias, x, wt)


def _split_inputs(wt: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T as the sum of P products of slices of x's features and of wt (P, in/P, out): a
    batched matmul spreads its batch over the threads, where one matrix-vector product of a few rows
    runs on one thread (the bandwidth of one core: on a 2-core AVX2 machine 12 GB/s, 20 with two)."""
    P, k, _ = wt.shape
    y = torch.bmm(x.reshape(x.shape[0], P, k).transpose(0, 1), wt).sum(0)
    return y if bias is None else y + bias


def _in_fp32(way: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return way(x.float()).to(x.dtype)


def _rows(blocks: list[tuple[torch.Tensor, torch.Tensor | None]], x: torch.Tensor) -> torch.Tensor:
    """x @ W.T from row blocks of W as it is (smaller matmuls that can stay in cache)."""
    return torch.cat([F.linear(x, w, b) for w, b in blocks], dim=-1)
