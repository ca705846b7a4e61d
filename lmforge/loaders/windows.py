"""Where the memmap loader's training windows start.

The split is one stream of tokens, stored in shards; a window (T + 1 tokens) never crosses a shard
boundary. The valid starts form a *space* that can be indexed 0..count-1:

  align "any", sampling "random"   every start s with s + T + 1 <= end of its shard
  align "any", sampling "epoch"    starts at multiples of T within each shard (the non-overlapping windows)
  align "bos"                      document starts (from the shards' offset tables) with room for a window

`random` draws each window uniformly from the space, with replacement, from a generator seeded by
(seed, rank, block) for blocks of BLOCK batches (one generator per block, not per batch, keeps the cost
off the hot path). `epoch` takes the space in an order shuffled by (seed, round, part), dealt to ranks
round-robin, so each window is visited once per epoch and no two ranks share one.

Device-resident training may hold the tokens in `parts` equal slices; each part then has its own
space (windows inside the part) and the parts take turns: a round is `batches_in[0]` batches from part
0, then part 1, and so on.
"""

from __future__ import annotations

import numpy as np

from lmforge.errors import DataError

BLOCK = 64  # batches whose random draws are made together


class Space:
    """Window starts: pieces [lo, lo + n * stride) at `stride`, or an explicit sorted list."""

    def __init__(self, lo: np.ndarray, n: np.ndarray, stride: int, explicit: np.ndarray | None = None) -> None:
        self.lo, self.n, self.stride, self.explicit = lo, n, stride, explicit
        self.cum = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        self.count = int(len(explicit)) if explicit is not None else int(self.cum[-1])

    def at(self, idx: np.ndarray) -> np.ndarray:
        if self.explicit is not None:
            return self.explicit[idx]
        piece = np.searchsorted(self.cum, idx, side="right") - 1
        return self.lo[piece] + (idx - self.cum[piece]) * self.stride


def _pieces(offsets: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Each shard's overlap with [lo, hi): starts and lengths."""
    a = np.clip(offsets[:-1], lo, hi)
    b = np.clip(offsets[1:], lo, hi)
    return a, b - a


class WindowPlan:
    def __init__(self, offsets: np.ndarray, seq_len: int, batch_size: int, *, align: str = "any",
                 sampling: str = "random", seed: int = 0, rank: int = 0, world_size: int = 1, parts: int = 1,
                 doc_starts: np.ndarray | None = None) -> None:
        if align not in ("any", "bos") or sampling not in ("random", "epoch"):
            raise DataError(f"window_align must be any|bos and sampling random|epoch, not {align}|{sampling}")
        if align == "bos" and doc_starts is None:
            raise DataError("window_align = \"bos\" needs document starts, which these tokens lack")
        self.t, self.b = seq_len, batch_size
        self.align, self.sampling = align, sampling
        self.seed, self.rank, self.world_size = seed, rank, world_size
        n = int(offsets[-1])
        self.bounds = [(p * n // parts, (p + 1) * n // parts) for p in range(parts)]
        self.spaces = [self._space(offsets, lo, hi, doc_starts) for lo, hi in self.bounds]
        if sampling == "random":
            per = [hi - lo for lo, hi in self.bounds] if parts > 1 else [1]
            self.batches_in = [max(1, p // (batch_size * seq_len * world_size)) for p in per]
            self.batches_in = [c if s.count else 0 for c, s in zip(self.batches_in, self.spaces, strict=True)]
        else:
            self.batches_in = [s.count // world_size // batch_size for s in self.spaces]
        if sum(self.batches_in) == 0:
            what = "document starts with room for" if align == "bos" else "room for"
            raise DataError(f"the split has no {what} one batch of {batch_size} windows of {seq_len + 1} tokens "
                            "inside a shard (or a part); lower seq_len or batch_size, or add text")
        self.round = sum(self.batches_in)
        self._cum_batches = np.cumsum([0] + self.batches_in)
        self._block: tuple[int, np.ndarray] | None = None
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None
        self._block_starts: tuple[int, np.ndarray] | None = None

    def _space(self, offsets: np.ndarray, lo: int, hi: int, doc_starts: np.ndarray | None) -> Space:
        t = self.t
        a, size = _pieces(offsets, lo, hi)
        if self.align == "bos":
            ends = np.minimum(offsets[np.searchsorted(offsets, doc_starts, side="right")], hi)
            ok = (doc_starts >= lo) & (doc_starts + t + 1 <= ends)
            return Space(a, size, 1, explicit=doc_starts[ok])
        if self.sampling == "random":
            return Space(a, np.maximum(size - t, 0), 1)
        return Space(a, np.maximum(size - 1, 0) // t, t)

    def reseed(self, seed: int) -> None:
        self.seed, self._block, self._perm, self._block_starts = seed, None, None, None

    def locate(self, k: int) -> tuple[int, int, int]:
        """Batch k → (round, part, index of the batch within the part's turn)."""
        r, rem = divmod(k, self.round)
        p = int(np.searchsorted(self._cum_batches, rem, side="right")) - 1
        return r, p, rem - int(self._cum_batches[p])

    def part_of(self, k: int) -> int:
        return self.locate(k)[1]

    def starts(self, k: int) -> np.ndarray:
        """Global start positions (B,) of batch k's windows."""
        if self.sampling == "random" and len(self.spaces) == 1:  # the common case: a block at once
            block = k // BLOCK
            if self._block_starts is None or self._block_starts[0] != block:
                self._block_starts = (block, self._draw(self.spaces[0], self._uniform(k, whole=True)))
            return self._block_starts[1][k % BLOCK]
        r, p, j = self.locate(k)
        space = self.spaces[p]
        if self.sampling == "random":
            return self._draw(space, self._uniform(k))
        if self._perm is None or self._perm[0] != (r, p):
            order = np.random.default_rng([self.seed, r, p]).permutation(space.count)
            self._perm = ((r, p), order[self.rank::self.world_size])
        return space.at(self._perm[1][j * self.b:(j + 1) * self.b])

    @staticmethod
    def _draw(space: Space, u: np.ndarray) -> np.ndarray:
        return space.at(np.minimum((u * space.count).astype(np.int64), space.count - 1))

    def _uniform(self, k: int, whole: bool = False) -> np.ndarray:
        """Batch k's uniform draws (B,), or with `whole` those of its entire block (BLOCK, B)."""
        block = k // BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, self.rank, block])
            self._block = (block, rng.random((BLOCK, self.b)))
        return self._block[1] if whole else self._block[1][k % BLOCK]
