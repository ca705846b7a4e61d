"""Batches of (x, y) token windows read straight from memory-mapped shards.

`random` mode (training): each row is a window at a random offset in a shard picked in proportion
to its size; infinite. Batch k is drawn from a generator seeded by (seed, rank, k), so the stream
depends on nothing else and resuming needs only k (the same state serves every rank).
`sequential` mode (evaluation): windows at `stride` steps over the whole split as one stream, each
window once, shared round-robin between ranks; finite. `iter_eval` also yields a mask of the target
positions not already scored by an earlier overlapping window, so every token is scored once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.shards import open_split


class MemmapLoader:
    def __init__(self, shards_dir: str | Path, split: str, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 mode: Literal["random", "sequential"] = "random", stride: int | None = None) -> None:
        if mode not in ("random", "sequential"):
            raise ConfigError(f"loader mode must be 'random' or 'sequential', not {mode!r}")
        if batch_size < 1 or seq_len < 1 or (stride or 1) < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"bad loader shape: batch_size={batch_size}, seq_len={seq_len}, "
                              f"stride={stride}, rank={rank}, world_size={world_size}")
        self.dir, self.split, self.mode = Path(shards_dir), split, mode
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._shards = open_split(shards_dir, split)  # opened once; batches only index into them
        self._sizes = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)])
        self.stride = stride or seq_len
        if mode == "random":
            # valid window starts per shard; a window needs seq_len + 1 tokens inside one shard
            self._starts = np.maximum(self._sizes - seq_len, 0)
            if self._starts.sum() == 0:
                raise DataError(f"the {split} split in {shards_dir} has no shard longer than seq_len + 1 = "
                                f"{seq_len + 1} tokens; lower seq_len or add text")
            self._probs = self._starts / self._starts.sum()
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

    def _random_batch(self) -> np.ndarray:
        b, t = self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, self.rank, self._batches])
        self._batches += 1
        which = rng.choice(len(self._shards), size=b, p=self._probs)
        starts = rng.integers(0, self._starts[which])  # upper bound exclusive, so start + t < size
        buf = np.empty((b, t + 1), dtype=np.int64)
        cols = np.arange(t + 1)
        for i in np.unique(which):
            rows = np.nonzero(which == i)[0]
            buf[rows] = self._shards[i][starts[rows, None] + cols]  # one fancy-index read per shard
        return buf

    def _to_device(self, buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(buf)
        if self._pin:
            t = t.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            t = t.to(self.device)
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
                yield self._to_device(self._random_batch())
        for buf, _ in self._sequential():
            yield self._to_device(buf)

    def iter_eval(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x, y, mask): mask (B, T) bool marks targets to score (all True in random mode)."""
        if self.mode == "random":
            while True:
                x, y = self._to_device(self._random_batch())
                yield x, y, torch.ones(x.shape, dtype=torch.bool, device=x.device)
        for buf, mask in self._sequential():
            x, y = self._to_device(buf)
            yield x, y, torch.from_numpy(mask).to(x.device)

    # ---- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Enough to continue exactly after the batches yielded so far."""
        return {"mode": self.mode, "split": self.split, "seed": self.seed, "world_size": self.world_size,
                "batches": self._batches, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. A random-mode state fits every rank: each keeps its own stream."""
        if state.get("mode") != self.mode:
            raise DataError(f"loader state is for mode={state.get('mode')}, this loader is mode={self.mode}")
        if self.mode == "sequential" and state.get("world_size") != self.world_size:
            raise DataError(f"sequential loader state is for world_size={state.get('world_size')}, "
                            f"this loader has world_size={self.world_size}")
        if state.get("num_tokens") != self.num_tokens:
            raise DataError(f"loader state was saved for a {self.split} split of {state.get('num_tokens')} "
                            f"tokens, but {self.dir} holds {self.num_tokens}; the shards changed")
        self.seed = int(state.get("seed", self.seed))
        self._batches = int(state["batches"])
