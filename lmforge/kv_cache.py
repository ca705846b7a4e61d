"""A preallocated key/value cache for incremental decoding, one slot per batch row.

Two ways to write into it, chosen by `select` before a forward pass:
- block writes (the default, and prefill): every selected row stores T new positions at the same
  `start_pos`, which is what `Attention` passes to `update`;
- per-row writes (batched decoding): each selected row stores its one new token at its own position,
  so prompts of different lengths, and requests that joined at different steps, share one batch
  without padding. Keys past a row's own length are stale and must be masked by the caller.
"""

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
        self.batch_size = batch_size
        self._rows = slice(0, batch_size)
        self._pos: torch.Tensor | None = None
        self._row_index: torch.Tensor | None = None
        self._kv_len = 0

    def select(self, start: int = 0, stop: int | None = None, positions: torch.Tensor | None = None,
               kv_len: int = 0) -> KVCache:
        """Make the next forward pass use rows [start, stop).

        positions (stop - start,) gives each row's write position for a one-token decode step, and
        kv_len how many positions the attention then reads (the longest row's length). Without
        positions, writes are blocks at the `start_pos` the model passes.
        """
        stop = self.batch_size if stop is None else stop
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) outside a cache of {self.batch_size} rows")
        self._rows = slice(start, stop)
        self._pos = positions
        if positions is not None:
            if kv_len > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions, asked for {kv_len}")
            self._row_index = torch.arange(start, stop, device=self.k.device)
            self._kv_len = kv_len
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int):
        """Store k/v (B, n_kv, T, head_dim); return this layer's keys/values for the selected rows."""
        rows = self._rows
        if self._pos is not None:
            if k.shape[2] != 1:
                raise ValueError("per-row positions take one token per row")
            # (B, n_kv, head_dim) written at (row, position) pairs in one indexed copy
            self.k[layer, self._row_index, :, self._pos] = k[:, :, 0]
            self.v[layer, self._row_index, :, self._pos] = v[:, :, 0]
            end = self._kv_len
        else:
            end = start_pos + k.shape[2]
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
            self.k[layer, rows, :, start_pos:end] = k
            self.v[layer, rows, :, start_pos:end] = v
        return self.k[layer, rows, :, :end], self.v[layer, rows, :, :end]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (keeps live rows contiguous)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (rows that finished are dropped)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.batch_size = self.k.shape[1]
        self._rows = slice(0, self.batch_size)
        self._pos = None

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def kv_cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, bytes_per_value: int = 4) -> int:
    """Memory a KVCache of this shape takes, to warn before allocating several models."""
    return 2 * cfg.n_layer * batch_size * cfg.kv_heads * max_len * cfg.head_dim * bytes_per_value
