"""One decoder-only Transformer for both architectures ("gpt2" and "llama"), single-device."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.layers import Block, make_norm, rope_tables


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
            # not saved in checkpoints: they are a pure function of the config
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        kv_cache=None,
        start_pos: int = 0,
        causal: bool = True,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) token ids → logits (B, T, vocab). `start_pos` offsets positions when decoding."""
        B, T = idx.shape
        end = start_pos + T
        # with explicit positions (packed rows: branches that restart after a shared prefix) a row may
        # be longer than the context; its positions may not
        if end > self.cfg.seq_len and (positions is None or int(positions.max()) >= self.cfg.seq_len):
            raise ValueError(f"sequence of {end} tokens exceeds the model's context of {self.cfg.seq_len}")
        x = self.tok_emb(idx)  # (B, T, n_embd)
        rope = None
        if self.pos_emb is not None:
            pos = positions if positions is not None else torch.arange(start_pos, end, device=idx.device)
            x = x + self.pos_emb(pos)
        else:
            if positions is not None:
                rope = (self.rope_cos[positions], self.rope_sin[positions])
            else:
                rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, kv_cache, start_pos, causal, attn_mask)
        return self.lm_head(self.norm(x))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * matmul params + the attention term 12 * L * d * T."""
        c = self.cfg
        n = self.num_params() - (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        if not c.tie_embeddings:
            n -= self.tok_emb.weight.numel()  # a lookup, not a matmul (tied: counted once, as lm_head)
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * c.seq_len


def param_summary(model: Transformer) -> dict[str, int]:
    total = model.num_params()
    non_emb = model.num_params(non_embedding=True)
    return {"total": total, "embedding": total - non_emb, "non_embedding": non_emb}
