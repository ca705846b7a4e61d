"""Batches of (x, y) token windows read straight from memory-mapped shards.

`random` mode (training): infinite; where windows start is up to `windows.WindowPlan`: anywhere or only
at document starts (`align`), drawn with replacement or visiting every window once per epoch
(`sampling`). Batch k depends only on (seed, rank, k), so resuming needs only k (the same state serves
every rank). With `resident`, the tokens are loaded onto the device once (in parts when they do not fit
the allowed share of its memory) and windows are cut there: no host-to-device copy of tokens per batch.
`sequential` mode (evaluation): windows at `stride` steps over the whole split as one stream, each
window once, shared round-robin between ranks; finite. `iter_eval` also yields a mask of the target
positions not already scored by an earlier overlapping window, so every token is scored once.
Off the device-resident path, batches for CUDA are copied from pinned memory without blocking.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from lmforge.errors import ConfigError, DataError
from lmforge.loaders.resident import ResidentTokens, parts_needed
from lmforge.loaders.windows import WindowPlan
from lmforge.shards import HEADER_BYTES, load_manifest, open_split


class MemmapLoader:
    def __init__(self, shards_dir: str | Path | None, split: str, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 mode: Literal["random", "sequential"] = "random", stride: int | None = None,
                 align: Literal["any", "bos"] = "any", sampling: Literal["random", "epoch"] = "random",
                 resident: bool = False, resident_share: float = 0.5, resident_parts: int = 0,
                 tokens: list[np.ndarray] | None = None, doc_starts: np.ndarray | None = None) -> None:
        """`tokens` (with `doc_starts`, global) stand in for `shards_dir` when the split is in memory."""
        if mode not in ("random", "sequential"):
            raise ConfigError(f"loader mode must be 'random' or 'sequential', not {mode!r}")
        if batch_size < 1 or seq_len < 1 or (stride or 1) < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"bad loader shape: batch_size={batch_size}, seq_len={seq_len}, "
                              f"stride={stride}, rank={rank}, world_size={world_size}")
        self.dir, self.split, self.mode = Path(shards_dir or "<memory>"), split, mode
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.align, self.sampling = align, sampling
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        # opened once; batches only index into them
        self._shards = tokens if tokens is not None else open_split(shards_dir, split)
        self._sizes = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)])
        self.stride = stride or seq_len
        self._resident: ResidentTokens | None = None
        if mode == "random":
            if align == "bos" and doc_starts is None and tokens is None:
                doc_starts = read_doc_starts(shards_dir, split, self._offsets)
            parts = 1
            if resident:
                parts = resident_parts or parts_needed(self.num_tokens * self._shards[0].dtype.itemsize,
                                                       self.device, resident_share)
            self._plan = WindowPlan(self._offsets, seq_len, batch_size, align=align, sampling=sampling, seed=seed,
                                    rank=rank, world_size=world_size, parts=parts, doc_starts=doc_starts)
            if resident:
                self._resident = ResidentTokens(self._shards, self._offsets, self._plan, self.device)
        else:
            self._windows = self._plan_windows()
        self._batches = 0  # batches yielded so far (random) / next batch index (sequential)

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    # ---- sequential planning ----------------------------------------------------------------------
    def _plan_windows(self) -> np.ndarray:
        """Rows (start, length, first_new) of this rank's windows; targets start+1..start+length."""
        n = self.num_tokens
        if n < 2:
            raise DataError(f"the {self.split} split in {self.dir} has {n} tokens; need at least 2")
        t = min(self.seq_len, n - 1)  # a split shorter than one window gives one shorter window
        starts = list(range(0, n - 1 - t + 1, self.stride))
        if starts[-1] + t < n - 1:
            starts.append(n - 1 - t)  # a last window flush with the end, so no token is left out
        rows, scored = [], 0  # `scored`: the last target position an earlier window covered
        for s in starts:
            rows.append((s, t, max(scored - s, 0)))  # targets at offset >= first_new are new
            scored = s + t
        return np.array(rows, dtype=np.int64)[self.rank::self.world_size]

    def __len__(self) -> int:
        if self.mode == "random":
            raise TypeError("a random-mode MemmapLoader is infinite")
        return -(-len(self._windows) // self.batch_size)

    # ---- reading ------------------------------------------------------------------------------------
    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split seen as one stream (may cross shards)."""
        out, pos = [], start
        while pos < start + length:
            i = int(np.searchsorted(self._offsets, pos, side="right")) - 1
            local = pos - self._offsets[i]
            take = min(self._sizes[i] - local, start + length - pos)
            out.append(self._shards[i][local:local + take])
            pos += take
        return np.concatenate(out)

    def window_starts(self, k: int) -> np.ndarray:
        """Random mode: where batch k's windows start in the split's token stream."""
        return self._plan.starts(k)

    def _random_batch(self) -> np.ndarray:
        """(B, T + 1) tokens of the next random-mode batch, read from the host shards."""
        k = self._batches
        self._batches += 1
        starts = self._plan.starts(k)
        which = np.searchsorted(self._offsets, starts, side="right") - 1
        local = starts - self._offsets[which]
        if len(self._shards) == 1:
            return self._rows[0][local]
        buf = np.empty((self.batch_size, self.seq_len + 1), dtype=self._shards[0].dtype)
        for i in np.unique(which):
            rows = np.nonzero(which == i)[0]
            buf[rows] = self._rows[i][local[rows]]  # one gather per shard
        return buf

    @functools.cached_property
    def _rows(self) -> list[np.ndarray]:
        """Per shard, every window as a row of a strided view: a batch is one gather of B rows, each a
        plain copy, where indexing token by token would build and walk a (B, T + 1) index array."""
        t = self.seq_len + 1
        return [sliding_window_view(s.view(np.ndarray), t) if len(s) >= t else np.zeros((0, t), s.dtype)
                for s in self._shards]

    def _next_random(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._resident is not None:
            self._batches += 1
            return self._resident.batch(self._batches - 1)
        return self._to_device(self._random_batch())

    def _to_device(self, buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T + 1) tokens of any integer dtype → int64 x, y (B, T) on the device."""
        if self.device.type == "cpu":  # convert while slicing: one pass per tensor
            return (torch.from_numpy(buf[:, :-1].astype(np.int64)),
                    torch.from_numpy(buf[:, 1:].astype(np.int64)))
        t = torch.from_numpy(buf.astype(np.int64, copy=False))
        t = t.pin_memory().to(self.device, non_blocking=True) if self._pin else t.to(self.device)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # x, y: (B, T)

    def _sequential(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(tokens (B, T+1), mask (B, T)) from the current position to the end; then rewinds."""
        while self._batches * self.batch_size < len(self._windows):
            rows = self._windows[self._batches * self.batch_size:(self._batches + 1) * self.batch_size]
            t = int(rows[0, 1])
            buf = np.stack([self._read(int(s), t + 1) for s, _, _ in rows]).astype(np.int64)
            mask = np.arange(t)[None, :] >= rows[:, 2:3]
            self._batches += 1
            yield buf, mask
        self._batches = 0  # the next pass starts from the beginning

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.mode == "random":
            while True:
                yield self._next_random()
        for buf, _ in self._sequential():
            yield self._to_device(buf)

    def iter_eval(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x, y, mask): mask (B, T) bool marks targets to score (all True in random mode)."""
        if self.mode == "random":
            while True:
                x, y = self._next_random()
                yield x, y, torch.ones(x.shape, dtype=torch.bool, device=x.device)
        for buf, mask in self._sequential():
            x, y = self._to_device(buf)
            yield x, y, torch.from_numpy(mask).to(x.device)

    # ---- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Enough to continue exactly after the batches yielded so far."""
        return {"mode": self.mode, "split": self.split, "seed": self.seed, "world_size": self.world_size,
                "batches": self._batches, "num_tokens": self.num_tokens, "align": self.align,
                "sampling": self.sampling, "parts": len(self._plan.bounds) if self.mode == "random" else 1}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. A random-mode state fits every rank: each keeps its own stream."""
        if "mode" not in state:
            raise DataError(f"loader state is not a memmap loader's (it is {state.get('loader')!r}'s); "
                            "resume with the data.loader the run was trained with")
        if state.get("mode") != self.mode:
            raise DataError(f"loader state is for mode={state.get('mode')}, this loader is mode={self.mode}")
        if self.mode == "sequential" and state.get("world_size") != self.world_size:
            raise DataError(f"sequential loader state is for world_size={state.get('world_size')}, "
                            f"this loader has world_size={self.world_size}")
        if state.get("num_tokens") != self.num_tokens:
            raise DataError(f"loader state was saved for a {self.split} split of {state.get('num_tokens')} "
                            f"tokens, but {self.dir} holds {self.num_tokens}; the shards changed")
        mine = self.state_dict()
        for key in ("align", "sampling", "parts"):  # absent from states saved before these options
            if key in state and state[key] != mine[key]:
                raise DataError(f"loader state is for {key}={state[key]}, this loader has {key}={mine[key]}; "
                                "resume with the same data.window_align / sampling / resident settings")
        self.seed = int(state.get("seed", self.seed))
        self._batches = int(state["batches"])
        if self.mode == "random":
            self._plan.reseed(self.seed)

    def close(self) -> None:
        """Free the device-resident tokens (nothing else to release: the shards are plain memory maps)."""
        if self._resident is not None:
            self._resident.free()

    def __enter__(self) -> MemmapLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_doc_starts(shards_dir: str | Path, split: str, offsets: np.ndarray) -> np.ndarray:
    """Where documents start in the split's token stream, from each shard's offset table."""
    m = load_manifest(shards_dir)
    itemsize = np.dtype(m["dtype"]).itemsize
    out = []
    for f, base in zip(m["splits"][split]["files"], offsets[:-1], strict=True):
        table = np.fromfile(Path(shards_dir) / f["name"], dtype="<u8", count=f["docs"],
                            offset=HEADER_BYTES + f["tokens"] * itemsize)
        out.append(table.astype(np.int64) + base)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
