"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig


class KVCache:
    """Keys and values for every layer, allocated once: (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Store k/v (B, n_kv, T, head_dim) at start_pos; return all keys/values up to the new end."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (rows that finished are dropped)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
