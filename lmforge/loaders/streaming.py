"""Streaming loaders: batches tokenized on the fly from raw JSONL, no tokenize step first.

Three loaders, one batch stream. A rank's data is dealt to `lanes` lanes (`data.loader_workers`): a lane
reads its chunks of the files (see `plan.py`), tokenizes each document as `[<|bos|>] + ids + <|eos|>`
(as the shards hold them) and packs the tokens into batches of B * T + 1 consecutive tokens, so
x = tokens[:-1].view(B, T), y = tokens[1:].view(B, T); the last token of one batch is the first of the
lane's next. Batches are taken from the lanes in turn. The loaders differ only in where lanes run:

  naive    every lane in this process, one after another (one core, no prefetch)
  workers  one process per lane; each batch travels as a tensor in shared memory allocated for it,
           through a bounded queue (the way torch's DataLoader moves batches)
  ring     one process per lane filling a fixed pool of pre-allocated (pinned, with CUDA) slots;
           free/full slot pipes carry only slot numbers and lane positions

so for the same input, seed and options they yield the same batches, and a state saved by one resumes
in another. A lane's position is (epoch, chunk, byte offset of a line, tokens of that line already
used, the carried-over token): enough to rebuild its token buffer by re-reading one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.loaders.plan import StreamPlan, parse_line
from lmforge.loaders.procs import WorkerDied

GROUP_BYTES = 1 << 16  # text read and tokenized at a time by a lane
STATE_FORMAT = "lmforge-stream"


def make_encoder(tokenizer: Any) -> Callable[[str], np.ndarray]:
    """text → token ids as an array; tiktoken's numpy path skips building a Python list per document."""
    enc = getattr(tokenizer, "_enc", None)
    if tokenizer.kind != "byte" and enc is not None and hasattr(enc, "encode_to_numpy"):
        def encode(text: str) -> np.ndarray:
            try:  # with no special tokens allowed or checked this is encode_ordinary
                return enc.encode_to_numpy(text, disallowed_special=())
            except UnicodeEncodeError:  # lone surrogates: the tokenizer's own fallback
                return np.asarray(tokenizer.encode(text), dtype=np.int64)
        return encode
    return lambda text: np.asarray(tokenizer.encode(text), dtype=np.int64)


class Lane:
    """One lane's reader: its chunks of the plan, epoch after epoch, as a flat token stream."""

    def __init__(self, plan: StreamPlan, encode: Callable[[str], np.ndarray], bos: int | None, eos: int, *,
                 lane: int, lanes: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 epochs: int) -> None:
        self.plan, self.encode = plan, encode
        self._bos = np.array([bos] if bos is not None else [], dtype=np.int64)
        self._eos = np.array([eos], dtype=np.int64)
        self.lane, self.lanes, self.rank, self.world_size = lane, lanes, rank, world_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self._files: dict[int, Any] = {}
        self._empty_epochs = 0
        self._set_position(0, 0, -1, 0, -1)

    # ---- position -------------------------------------------------------------------------------
    def _set_position(self, epoch: int, chunk: int, offset: int, skip: int, carry: int) -> None:
        self.epoch, self.k, self.carry = epoch, chunk, carry
        self._mine = self.plan.lane_chunks(self.seed, epoch, self.shuffle, self.rank, self.world_size,
                                           self.lane, self.lanes)
        self._next_off = offset  # where the next unread line starts; -1 = at the chunk's start
        self._tokens = np.zeros(0, dtype=np.int64)
        self._line_off = np.zeros(1, dtype=np.int64)  # per tokenized line its offset, then the group end
        self._line_tok = np.zeros(1, dtype=np.int64)  # per tokenized line its first token, then the total
        self._tp = 0
        self._epoch_had_tokens = offset >= 0 or chunk > 0
        self.done = self.epochs > 0 and epoch >= self.epochs
        if skip:
            if not self._read_group() or self._line_off[0] != offset or skip >= self._line_tok[1]:
                raise DataError(f"lane {self.lane}: saved position (offset {offset}, token {skip}) does not "
                                "match the data; the files changed since the state was saved")
            self._tp = skip

    def state(self) -> dict:
        """Where the lane continues: the line holding its next token (and how far into it)."""
        if self._tp < len(self._tokens):
            i = int(np.searchsorted(self._line_tok, self._tp, side="right")) - 1
            offset, skip = int(self._line_off[i]), self._tp - int(self._line_tok[i])
        else:
            offset, skip = self._next_off, 0
        chunk = self._mine[self.k] if self.k < len(self._mine) else -1
        return {"epoch": self.epoch, "chunk": self.k, "offset": offset, "skip": skip, "carry": self.carry,
                "file": self.plan.files[self.plan.chunks[chunk, 0]] if chunk >= 0 else None}

    def restore(self, state: dict) -> None:
        self._set_position(int(state["epoch"]), int(state["chunk"]), int(state["offset"]),
                           int(state["skip"]), int(state["carry"]))

    # ---- reading --------------------------------------------------------------------------------
    def _file(self, i: int) -> Any:
        if i not in self._files:
            self._files[i] = open(self.plan.files[i], "rb")  # noqa: SIM115 (closed in close())
        return self._files[i]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _next_chunk(self) -> bool:
        """Move to the next chunk, into the next epoch if need be; False when the lane has ended."""
        self.k += 1
        self._next_off = -1
        if self.k < len(self._mine):
            return True
        self._empty_epochs = 0 if self._epoch_had_tokens else self._empty_epochs + 1
        # chunks whose every line is filtered out (blank, empty text, the other split's hash): the lane
        # ends once it has seen nothing for so long that its chunks surely hold nothing, rather than loop
        if (self.epochs and self.epoch + 1 >= self.epochs) or self._empty_epochs >= (8 if self.shuffle else 1):
            self.done = True
            return False
        self._set_position(self.epoch + 1, 0, -1, 0, self.carry)
        return len(self._mine) > 0

    def _read_group(self) -> bool:
        """Tokenize the next lines of the current chunk(s) into the buffer; False at the lane's end."""
        while not self.done and self.k < len(self._mine):
            file, start, end = (int(v) for v in self.plan.chunks[self._mine[self.k]])
            f = self._file(file)
            if self._next_off < 0:
                self._next_off = start  # chunks start at line starts
            size = min(GROUP_BYTES, end - self._next_off)
            if size <= 0:
                self._next_chunk()
                continue
            f.seek(self._next_off)
            data = f.read(size)
            if not data:
                raise DataError(f"{self.plan.files[file]}: shorter than when the loader started (the file changed)")
            if len(data) == size and not data.endswith(b"\n"):
                data += f.readline()  # finish the last line: it starts inside the chunk
            if self._tokenize(file, self._next_off, data):
                self._next_off += len(data)
                return True
            self._next_off += len(data)
        self.done = True
        return False

    def _tokenize(self, file: int, base: int, data: bytes) -> bool:
        parts, offsets, starts, n = [], [], [], 0
        pos = base
        for line in data.split(b"\n"):
            offset, pos = pos, pos + len(line) + 1
            if not line.strip():
                continue
            text = self.plan.keep(file, offset, parse_line(line, self.plan.text_field,
                                                           self.plan.files[file], offset))
            if not text:
                continue
            ids = self.encode(text)
            offsets.append(offset)
            starts.append(n)
            parts += (self._bos, ids, self._eos)
            n += len(self._bos) + len(ids) + 1
        if not parts:
            return False
        self._tokens = np.concatenate(parts).astype(np.int64, copy=False)
        self._line_off = np.array(offsets + [base + len(data)], dtype=np.int64)
        self._line_tok = np.array(starts + [n], dtype=np.int64)
        self._tp = 0
        self._epoch_had_tokens = True
        return True

    def groups(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(tokens, where each document starts in them) group by group, to the lane's end."""
        while self._read_group():
            yield self._tokens, self._line_tok[:-1]

    def fill(self, out: np.ndarray) -> bool:
        """Write the lane's next batch (len(out) tokens) into `out`; False when the lane has ended."""
        need, pos = len(out), 0
        if self.carry >= 0:
            out[0] = self.carry
            pos = 1
        while pos < need:
            avail = len(self._tokens) - self._tp
            if avail == 0:
                if not self._read_group():
                    return False
                continue
            take = min(avail, need - pos)
            out[pos:pos + take] = self._tokens[self._tp:self._tp + take]
            pos += take
            self._tp += take
        self.carry = int(out[-1])
        return True


@dataclass
class LaneSpec:
    plan: StreamPlan
    tokenizer: Any
    bos: int | None
    lanes: int
    rank: int
    world_size: int
    seed: int
    shuffle: bool
    epochs: int
    states: list[dict | None]

    def make(self, lane: int) -> Lane:
        """Lane `lane` at its saved position (the start when none is saved)."""
        obj = Lane(self.plan, make_encoder(self.tokenizer), self.bos, self.tokenizer.eos_id, lane=lane,
                   lanes=self.lanes, rank=self.rank, world_size=self.world_size, seed=self.seed,
                   shuffle=self.shuffle, epochs=self.epochs)
        if self.states[lane] is not None:
            obj.restore(self.states[lane])
        return obj


class StreamingLoader:
    """The lanes taken in turn; subclasses say where the lanes run (`_take`)."""

    kind = "naive"

    def __init__(self, plan: StreamPlan, tokenizer: Any, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", lanes: int = 2,
                 slots: int = 4, epochs: int = 0, shuffle: bool = True, add_bos: bool = True) -> None:
        if batch_size < 1 or seq_len < 1 or lanes < 1 or slots < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"bad loader settings: batch_size={batch_size}, seq_len={seq_len}, lanes={lanes}, "
                              f"slots={slots}, rank={rank}, world_size={world_size}")
        if tokenizer.eos_id is None:
            raise DataError("the tokenizer has no end-of-document token; streaming needs one")
        mine = plan.epoch_order(seed, 0, shuffle)[rank::world_size]
        if len(mine) == 0:
            raise DataError(f"the {plan.split} split has {len(plan.chunks)} chunks, too few for rank {rank} of "
                            f"{world_size}; add data or use fewer ranks")
        self.plan, self.tokenizer = plan, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lanes, self.slots, self.epochs, self.shuffle = lanes, slots, epochs, shuffle
        self.bos = tokenizer.bos_id if add_bos else None
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._batches = 0
        self._next_lane = 0
        self._done = [False] * lanes
        self._lane_states: list[dict | None] = [None] * lanes

    @property
    def batch_tokens(self) -> int:
        return self.batch_size * self.seq_len + 1

    def lane_spec(self) -> LaneSpec:
        """What a worker needs to build the lanes (no reference to the loader, so it can be collected)."""
        return LaneSpec(self.plan, self.tokenizer, self.bos, self.lanes, self.rank, self.world_size, self.seed,
                        self.shuffle, self.epochs, [dict(s) if s else None for s in self._lane_states])

    # ---- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> StreamingLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        restarted = False
        while not all(self._done):
            lane = self._next_lane
            try:
                got = self._take(lane)
            except WorkerDied as err:
                if not err.terminated or restarted:
                    raise
                restarted = True  # workers start again from the saved positions: the stream is unchanged
                continue
            self._done[lane] = got is None
            self._next_lane = self._after(lane)
            if got is None:
                continue
            flat, state, owned = got
            self._lane_states[lane] = state
            self._batches += 1
            return self._emit(flat, owned)
        self.close()  # every lane has ended: let worker processes go now, not at collection
        if self._batches == 0:
            raise DataError(f"the {self.plan.split} split holds fewer than batch_size * seq_len + 1 = "
                            f"{self.batch_tokens} tokens per lane; lower them or data.loader_workers")
        raise StopIteration

    def _after(self, lane: int) -> int:
        for step in range(1, self.lanes + 1):
            nxt = (lane + step) % self.lanes
            if not self._done[nxt]:
                return nxt
        return lane

    def _take(self, lane: int) -> tuple[np.ndarray, dict, bool] | None:
        """(B*T+1 tokens, lane state after them, whether the array is ours to keep), None = lane ended."""
        if not hasattr(self, "_lane_objs"):
            spec = self.lane_spec()
            self._lane_objs = [spec.make(i) for i in range(self.lanes)]
        lane_obj = self._lane_objs[lane]
        out = np.empty(self.batch_tokens, dtype=np.int64)
        if not lane_obj.fill(out):
            return None
        return out, lane_obj.state(), True

    def _emit(self, flat: np.ndarray, owned: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = self.batch_size, self.seq_len
        if self.device.type == "cpu":
            # x and y must not share memory (a caller may edit y in place), nor live in a reused slot
            y = torch.from_numpy(flat[1:] if owned else flat[1:].copy()).view(b, t)
            return torch.from_numpy(flat[:-1].copy()).view(b, t), y
        d = torch.from_numpy(flat)
        d = d.pin_memory().to(self.device, non_blocking=True) if self._pin else d.to(self.device)
        return d[:-1].view(b, t), d[1:].view(b, t).clone()

    # ---- resume / shutdown -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Each lane's position after the batches yielded so far, and whose turn is next."""
        return {"format": STATE_FORMAT, "loader": self.kind, "split": self.plan.split, "plan": self.plan.fingerprint,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "lanes": self.lanes,
                "batches": self._batches, "next_lane": self._next_lane, "done": list(self._done),
                "lane_states": [dict(s) if s else None for s in self._lane_states]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (this rank's: positions differ between ranks)."""
        if state.get("format") != STATE_FORMAT:
            raise DataError("loader state is not a streaming loader's (was the run trained with data.loader = "
                            "\"memmap\"?)")
        mine = {"plan": self.plan.fingerprint, "split": self.plan.split, "rank": self.rank,
                "world_size": self.world_size, "lanes": self.lanes}
        for key, have in mine.items():
            if state.get(key) != have:
                raise DataError(f"loader state is for {key}={state.get(key)}, this loader has {key}={have}; "
                                "resume with the same data, data.loader_workers and world size")
        self.close()
        self.seed = int(state["seed"])
        self._batches, self._next_lane = int(state["batches"]), int(state["next_lane"])
        self._done = [bool(d) for d in state["done"]]
        self._lane_states = [dict(s) if s else None for s in state["lane_states"]]

    def close(self) -> None:
        """Release files (and, in subclasses, processes and shared memory); iteration may start again."""
        for lane in getattr(self, "_lane_objs", []):
            lane.close()
        self.__dict__.pop("_lane_objs", None)

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NaiveLoader(StreamingLoader):
    """v0: every lane read and tokenized in this process, in turn."""

    kind = "naive"
