"""A set of 64-bit keys in one numpy array, for deduplication in bounded memory.

Open addressing with linear probing; 0 marks an empty slot (keys are never 0, see clean.dedup_key).
Batches are inserted with vectorized probing, so the per-document cost in the main process is a few
numpy operations per batch rather than Python work per key. The table doubles while it stays under
`max_bytes`; once it would be more than half full beyond that, it stops taking new keys (membership
is still checked against what it holds) and says so through `full`.
"""

from __future__ import annotations

import numpy as np

MIN_SLOTS = 1 << 16


class KeySet:
    def __init__(self, max_bytes: int) -> None:
        self.max_slots = max(MIN_SLOTS, 1 << int(np.log2(max(max_bytes // 8, 1))))
        self.table = np.zeros(min(MIN_SLOTS, self.max_slots), dtype=np.uint64)
        self.count = 0
        self.full = False

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def _grow(self) -> None:
        old = self.table[self.table != 0]
        self.table = np.zeros(len(self.table) * 2, dtype=np.uint64)
        self.count = 0
        self._probe(old, insert=True)

    def _probe(self, keys: np.ndarray, insert: bool) -> np.ndarray:
        """For distinct `keys`: True where absent (and, with `insert`, now added)."""
        mask = np.uint64(len(self.table) - 1)
        slots = keys & mask
        absent = np.zeros(len(keys), dtype=bool)
        pending = np.arange(len(keys))
        while pending.size:
            s = slots[pending]
            held = self.table[s]
            empty = held == 0
            moving = pending[~empty & (held != keys[pending])]  # a different key sits there: probe on
            cand, cand_slots = pending[empty], s[empty]
            retry = np.empty(0, dtype=np.int64)
            if cand.size and not insert:
                absent[cand] = True
            elif cand.size:
                # several keys of this batch may want the same empty slot: the first takes it
                _, first = np.unique(cand_slots, return_index=True)
                winners = cand[first]
                absent[winners] = True
                self.table[slots[winners]] = keys[winners]
                self.count += len(winners)
                retry = np.setdiff1d(cand, winners, assume_unique=True)
            slots[moving] = (slots[moving] + np.uint64(1)) & mask
            pending = np.concatenate([moving, retry])
        return absent

    def add(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(new, inserted): `new[i]` when keys[i] was neither in the set nor earlier in `keys`;
        `inserted` are the keys actually added (replaying them rebuilds this exact set)."""
        keys = np.asarray(keys, dtype=np.uint64)
        new = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return new, keys
        uniq, first = np.unique(keys, return_index=True)
        while not self.full and (self.count + len(uniq)) * 2 > len(self.table):
            if len(self.table) * 2 > self.max_slots:
                self.full = True
            else:
                self._grow()
        absent = self._probe(uniq, insert=not self.full)
        new[first[absent]] = True
        return new, (np.empty(0, np.uint64) if self.full else uniq[absent])

    def replay(self, inserted: np.ndarray) -> None:
        self.add(inserted)
