"""Chat examples for supervised fine-tuning: read, render with the chat template, pack, batch.

Sources are JSON arrays or JSONL files (or `hf:NAME` datasets) in one of three shapes, told apart per
record: `{"conversations": [user, assistant, ...]}` (LIMA; ShareGPT's `{"from", "value"}` turns too),
`{"messages": [{"role", "content"}, ...]}` (OpenAI) and `{"instruction", "input", "output"}` (Alpaca,
with LLaMA-Factory's optional `history` of earlier [user, assistant] pairs and `system`).

Training batches are `(x, y, doc_ids)` when examples are packed several to a row (`sft_loss` confines
attention to each example and restarts its positions) or `(x, y)` when each row holds one example
padded at the end; targets that are not supervised (see lmforge.chat_template) are -1 either way.
Validation always uses one example per row, so plain causal attention scores it exactly.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import torch.nn.functional as F

from lmforge.chat_template import ChatFormatError, render, to_messages
from lmforge.errors import DataError

PACK_WINDOW = 16  # open rows first-fit packing looks at: nearly optimal fill at a bounded cost


# ---- reading -----------------------------------------------------------------------------------------
def read_records(source: str, *, hf_config: str = "", hf_split: str = "train",
                 limit: int = 0) -> Iterator[tuple[str, Any]]:
    """(where, record) from a .json array or .jsonl file (a glob takes several), or `hf:NAME`."""
    for n, item in enumerate(_records(source, hf_config, hf_split)):
        if limit and n >= limit:
            return
        yield item


def _records(source: str, hf_config: str, hf_split: str) -> Iterator[tuple[str, Any]]:
    if source.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(source[3:], hf_config or None, split=hf_split)
        except Exception as err:  # datasets raises many types: network, missing config, bad split
            raise DataError(f"sft.source {source}: cannot load it ({type(err).__name__}: {err})") from None
        for i, rec in enumerate(ds):
            yield f"{source}[{i}]", rec
        return
    paths = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if not paths or not all(Path(p).is_file() for p in paths):
        raise DataError(f"sft.source {source}: no such file (expected a .json/.jsonl file, a glob or hf:NAME)")
    for path in paths:
        raw = Path(path).read_bytes()
        if raw.lstrip()[:1] == b"[":  # a JSON array, as LIMA and Alpaca ship
            try:
                items = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err})") from None
            yield from ((f"{path}[{i}]", rec) for i, rec in enumerate(items))
            continue
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    yield f"{path}:{i}", orjson.loads(line)
                except orjson.JSONDecodeError:
                    yield f"{path}:{i}", None  # counted as malformed by to_messages


# ---- tokenized examples ------------------------------------------------------------------------------
@dataclass
class SFTSplit:
    """Tokenized examples back to back: example i is ids[offsets[i]:offsets[i+1]] (and its mask)."""

    ids: np.ndarray
    supervised: np.ndarray
    offsets: np.ndarray

    @classmethod
    def build(cls, examples: list[tuple[list[int], list[bool]]]) -> SFTSplit:
        lengths = np.array([len(e[0]) for e in examples], dtype=np.int64)
        ids = np.fromiter((i for e in examples for i in e[0]), dtype=np.uint32, count=int(lengths.sum()))
        sup = np.fromiter((s for e in examples for s in e[1]), dtype=bool, count=int(lengths.sum()))
        return cls(ids, sup, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.supervised[a:b]

    def supervised_fraction(self) -> float:
        """Supervised targets over all targets (each example's first token is never a target)."""
        targets = int(self.lengths.sum()) - len(self)
        return float(self.supervised.sum()) / targets if targets else 0.0

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.offsets.tobytes())
        h.update(self.ids.tobytes())
        h.update(self.supervised.tobytes())
        return h.hexdigest()[:16]

    def save(self, folder: Path, split: str) -> None:
        for name in ("ids", "supervised", "offsets"):
            np.save(folder / f"{split}_{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path, split: str) -> SFTSplit:
        try:
            return cls(*(np.load(folder / f"{split}_{name}.npy") for name in ("ids", "supervised", "offsets")))
        except (OSError, ValueError) as err:
            raise DataError(f"{folder}: the prepared {split} split cannot be read ({err}); run "
                            "`lmforge sft prepare` again") from None


@dataclass
class Counts:
    """What happened to the records on the way to examples, for the log and meta.json."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    too_long: int = 0
    truncated: int = 0
    kept: int = 0

    def summary(self, max_tokens: int) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return (f"{self.kept}/{self.records} kept at {max_tokens} tokens"
                + (f"; skipped: {skipped}" if skipped else "")
                + (f"; {self.too_long} too long, dropped" if self.too_long else "")
                + (f"; {self.truncated} truncated" if self.truncated else ""))


def tokenize_example(tokenizer: Any, messages: list[dict], max_tokens: int, too_long: str,
                     counts: Counts) -> tuple[list[int], list[bool]] | None:
    """Render one conversation; drop or truncate it when it has more than `max_tokens` tokens."""
    ids, sup = render(tokenizer, messages, validate=False)
    if len(ids) > max_tokens:
        if too_long == "drop" or not any(sup[1:max_tokens]):  # truncating would leave nothing to learn
            counts.too_long += 1
            return None
        ids, sup = ids[:max_tokens], sup[:max_tokens]
        counts.truncated += 1
    counts.kept += 1
    return ids, sup


def check_record(where: str, rec: Any, fmt: str, system_prompt: str, strict: bool,
                 counts: Counts) -> list[dict] | None:
    """The record's messages, or None (counted) when it is malformed; strict mode raises instead."""
    counts.records += 1
    msgs = to_messages(rec, fmt, system_prompt)
    if isinstance(msgs, str):
        if strict:
            raise ChatFormatError(f"{where}: {msgs} (sft.strict = true; set it to false to skip and count "
                                  "such examples)")
        counts.skipped[msgs] += 1
        return None
    return msgs


# ---- prepared data on disk -----------------------------------------------------------------------------
@dataclass
class Prepared:
    """The tokenized splits, the held-out sample prompts and what happened on the way (meta.json)."""

    train: SFTSplit
    val: SFTSplit
    prompts: list[list[dict]]
    meta: dict


def data_key(cfg: Any, tokenizer: Any, max_tokens: int) -> str:
    """What the prepared data depends on: the [sft] reading keys, the files, the tokenizer, the length."""
    keys = ("source", "format", "hf_config", "hf_split", "limit", "system_prompt", "val_fraction", "too_long",
            "strict", "sample_prompts")
    files = [] if cfg.source.startswith("hf:") else [
        (p, os.stat(p).st_size, os.stat(p).st_mtime_ns)
        for p in (sorted(glob.glob(cfg.source)) if any(c in cfg.source for c in "*?[") else [cfg.source])
        if os.path.isfile(p)]
    blob = orjson.dumps({"sft": cfg.model_dump(include=set(keys)), "files": files, "max_tokens": max_tokens,
                         "tokenizer": tokenizer.fingerprint}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:16]


def build_splits(cfg: Any, tokenizer: Any, max_tokens: int, log: Callable[[str], Any] = print) -> Prepared:
    """Read, check, split (by content hash) and tokenize the conversations `cfg` ([sft]) names."""
    counts = Counts()
    convs = [m for where, rec in read_records(cfg.source, hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                                              limit=cfg.limit)
             if (m := check_record(where, rec, cfg.format, cfg.system_prompt, cfg.strict, counts)) is not None]
    if not convs:
        raise DataError(f"{cfg.source}: none of its {counts.records} records is a usable conversation "
                        f"({dict(counts.skipped)}); check sft.format")
    order = sorted(range(len(convs)), key=lambda i: hashlib.sha256(orjson.dumps(convs[i])).digest())
    n_val = min(len(convs) - 1, max(1, round(len(convs) * cfg.val_fraction))) if cfg.val_fraction else 0
    parts = {"train": sorted(order[n_val:]), "val": order[:n_val]}
    splits, meta = {}, {"records": counts.records, "skipped": dict(counts.skipped), "max_tokens": max_tokens}
    for name, idx in parts.items():
        c = Counts(records=len(idx))
        kept = [e for i in idx if (e := tokenize_example(tokenizer, convs[i], max_tokens, cfg.too_long, c))]
        splits[name] = SFTSplit.build(kept)
        meta[name] = {"conversations": len(idx), "kept": c.kept, "too_long": c.too_long, "truncated": c.truncated,
                      "tokens": int(splits[name].lengths.sum()),
                      "supervised_fraction": splits[name].supervised_fraction()}
        if idx:
            log(f"sft data: {name}: {c.summary(max_tokens)}")
    if not len(splits["train"]):
        raise DataError(f"no training conversation fits the model's context ({max_tokens} tokens with the chat "
                        f"markers): set sft.too_long = \"truncate\" or fine-tune a model with a longer seq_len")
    prompts = [convs[i][: next(k for k, m in enumerate(convs[i]) if m["role"] == "assistant")] for i in parts["val"]]
    fits = [p for p in prompts if len(render(tokenizer, p, add_generation_prompt=True)[0]) <= max_tokens // 2]
    meta["sample_prompts"] = fits[: cfg.sample_prompts]
    if counts.skipped:
        log(f"sft data: {counts.records} records, skipped {sum(counts.skipped.values())}: "
            + ", ".join(f"{n} {why}" for why, n in counts.skipped.most_common()))
    return Prepared(splits["train"], splits.get("val", SFTSplit.build([])), meta["sample_prompts"], meta)


def ensure_prepared(cfg: Any, tokenizer: Any, seq_len: int, run_dir: Path, *, force: bool = False,
                    log: Callable[[str], Any] = print) -> Prepared:
    """The prepared data in `sft.prepared_dir` (default <run_dir>/sft_data), rebuilt when out of date."""
    from lmforge.chat_template import show
    from lmforge.fsutil import atomic_dir, atomic_write_json, atomic_write_text, read_json

    folder = Path(cfg.prepared_dir) if cfg.prepared_dir else Path(run_dir) / "sft_data"
    max_tokens, key = seq_len + 1, data_key(cfg, tokenizer, seq_len + 1)
    if not force and (folder / "meta.json").is_file() and read_json(folder / "meta.json").get("key") == key:
        meta = read_json(folder / "meta.json")
        log(f"sft data: up to date ({folder}, {meta['train']['kept']} train / {meta['val']['kept']} val)")
        return Prepared(SFTSplit.load(folder, "train"), SFTSplit.load(folder, "val"), meta["sample_prompts"], meta)
    data = build_splits(cfg, tokenizer, max_tokens, log)
    data.meta.update(format="lmforge-sft-data", version=1, key=key, source=cfg.source,
                     tokenizer_fingerprint=tokenizer.fingerprint, chat_template=tokenizer.chat_template)
    with atomic_dir(folder) as tmp:
        data.train.save(tmp, "train")
        data.val.save(tmp, "val")
        shown = [show(tokenizer, *data.train.example(i)) for i in range(min(3, len(data.train)))]
        atomic_write_text(tmp / "examples.txt", "Supervised tokens (trained on) are shown [[like this]].\n\n"
                          + "\n\n".join(f"=== example {i}\n{t}" for i, t in enumerate(shown)) + "\n")
        atomic_write_json(tmp / "meta.json", data.meta)
    log(f"sft data: {folder} (examples.txt shows rendered conversations)")
    return data


# ---- batches -----------------------------------------------------------------------------------------
def pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Examples (in `order`) into rows of at most `capacity` tokens: first fit over the newest open rows."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        first = max(0, len(rows) - PACK_WINDOW)
        j = next((j for j in range(first, len(rows)) if room[j] >= n), -1)
        if j == -1:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[j].append(i)
            room[j] -= n
    return rows


class SFTLoader:
    """Batches of chat examples, epoch after epoch (one pass when `loop` is False), resumable exactly.

    Epoch e's rows depend only on (seed, e), so a position is (epoch, batch). Rank r takes rows
    (b * world_size + r) * batch_size onward; the last batch of an epoch wraps to its first rows."""

    def __init__(self, split: SFTSplit, batch_size: int, seq_len: int, *, pad_id: int, packing: bool = True,
                 shuffle: bool = True, seed: int = 0, loop: bool = True, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu") -> None:
        if len(split) == 0:
            raise DataError("no SFT examples to load")
        if int(split.lengths.max()) > seq_len + 1:
            raise DataError(f"an example has {int(split.lengths.max())} tokens; rows hold {seq_len + 1}")
        self.split, self.batch_size, self.seq_len, self.pad_id = split, batch_size, seq_len, pad_id
        self.packing, self.shuffle, self.seed, self.loop = packing, shuffle, seed, loop
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.epoch, self.batch = 0, 0
        self._rows: dict[int, list[list[int]]] = {}

    def rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows:
            n = len(self.split)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._rows = {epoch: pack_rows(self.split.lengths, order, self.seq_len + 1) if self.packing
                          else [[i] for i in order.tolist()]}
        return self._rows[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return -(-len(self.rows(epoch)) // (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            if self.batch >= self.steps_in_epoch(self.epoch):
                if not self.loop:
                    return
                self.epoch, self.batch = self.epoch + 1, 0
            rows = self.rows(self.epoch)
            first = (self.batch * self.world_size + self.rank) * self.batch_size
            if self.loop:
                picked = [rows[(first + j) % len(rows)] for j in range(self.batch_size)]
            else:  # one pass (validation): a short last batch, so no example counts twice
                picked = rows[first:first + self.batch_size]
                if not picked:
                    return
            self.batch += 1  # before the yield: a state saved after this batch is used resumes after it
            yield self.collate(picked)

    def collate(self, rows: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """Rows of example indices → (x, y, doc_ids) when packing, else (x, y); unsupervised targets -1."""
        T = self.seq_len
        tokens = np.full((len(rows), T + 1), self.pad_id, dtype=np.int64)
        sup = np.zeros((len(rows), T + 1), dtype=bool)
        doc = np.full((len(rows), T + 1), -1, dtype=np.int32)  # padding is its own "example"
        for r, row in enumerate(rows):
            at = 0
            for k, i in enumerate(row):
                ids, mask = self.split.example(i)
                tokens[r, at:at + len(ids)], sup[r, at:at + len(ids)], doc[r, at:at + len(ids)] = ids, mask, k
                at += len(ids)
        y = np.where(sup[:, 1:], tokens[:, 1:], -1)
        out = [torch.from_numpy(tokens[:, :T]), torch.from_numpy(y)]
        if self.packing:
            out.append(torch.from_numpy(doc[:, :T]))
        return tuple(t.to(self.device, non_blocking=True) for t in out)

    def supervised_fraction(self) -> float:
        """Supervised targets over real (non-padding) targets in this epoch's batches, counted on the
        very tensors training gets: a loader that lost the mask shows 1.0 here."""
        rows, n = self.rows(self.epoch), self.batch_size
        supervised = targets = 0
        for b in range(0, len(rows), n):
            batch = self.collate(rows[b:b + n])
            supervised += int((batch[1] >= 0).sum())
            targets += sum(int(self.split.lengths[i]) - 1 for row in rows[b:b + n] for i in row)
        return supervised / targets if targets else 0.0

    def state_dict(self) -> dict:
        return {"loader": "sft", "epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "world_size": self.world_size, "packing": self.packing, "examples": len(self.split),
                "data_fingerprint": self.split.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("loader") != "sft":
            raise DataError(f"loader state is not an SFT loader's ({state.get('loader')!r})")
        mine = self.state_dict()
        for key in ("data_fingerprint", "seed", "world_size", "packing"):
            if state.get(key) != mine[key]:
                raise DataError(f"cannot resume: the SFT loader's {key} changed ({state.get(key)!r} in the "
                                f"checkpoint, {mine[key]!r} now); resume with the same data and settings")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def close(self) -> None:
        pass


def doc_attention(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (B, T) → attention mask (B, 1, T, T), True where a query may see a key (same example,
    not later), and positions (B, T) counted from each example's start."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    mask = same & (idx[None, :, None] >= idx[None, None, :])
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return mask[:, None], idx - first


def sft_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the supervised targets; with doc_ids, each packed example sees only itself."""
    if extras:
        attn_mask, positions = doc_attention(extras[0])
        logits = model(x, attn_mask=attn_mask, positions=positions)
    else:
        logits = model(x)  # one example per row, padding after it: causal attention is already exact
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)
