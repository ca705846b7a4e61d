"""What a streaming loader reads: the split's byte ranges of the JSONL files, cut into chunks.

A plan lists, per file, the byte range that belongs to the split and cuts it into chunks of about
`chunk_bytes`, each moved to the next line start (one seek and read per cut, no index of the file):
a chunk's lines are those starting in it. Each epoch visits the chunks in an order
shuffled by (seed, epoch); chunk j of that order goes to rank j % world_size, and a rank's chunks are
dealt to its lanes the same way (see `lane_chunks`).

The split follows `sources.iter_split` exactly. `hash`: each document is kept or dropped by its hash
while reading. `tail`: one pass counts the characters once (cached per process) to find the document
the cut falls in; the train split ends inside it and the val split starts there. Sources that are not
plain JSONL (text, compressed, Parquet, `bundled:`, `hf:`, `data.limit`) are first written out as a
temporary JSONL of the split's documents.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from lmforge.config import DataConfig
from lmforge.errors import DataError
from lmforge.sources import doc_hash, file_format, get_text, iter_split, resolve_files, source_fingerprint

MAX_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 16 << 10
TEXT_FIELD = "text"  # the field of the temporary JSONL a non-JSONL source is written to


@dataclass
class StreamPlan:
    files: list[str]
    ranges: list[tuple[int, int]]
    """Per file, the byte range [lo, hi) whose lines belong to the split (empty: none)."""
    split: str
    text_field: str
    chunk_bytes: int
    fingerprint: str
    hash_val_fraction: float = 0.0
    """> 0: keep a document when `doc_hash` puts it in the split (the `hash` split)."""
    cut: tuple[int, int, int] | None = None
    """(file, line offset, chars): the document the `tail` cut falls in; train keeps text[:chars]."""
    chunks: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    """(n, 3): file index, start byte, end byte."""

    def __post_init__(self) -> None:
        rows = []
        for i, (lo, hi) in enumerate(self.ranges):
            if hi <= lo:
                continue
            with open(self.files[i], "rb") as f:
                cuts = [lo] + [min(_line_start(f, b), hi) for b in range(lo + self.chunk_bytes, hi, self.chunk_bytes)]
            # a chunk that no line starts in (a line longer than a chunk) would be one without tokens
            rows += [(i, a, b) for a, b in zip(cuts, cuts[1:] + [hi], strict=True) if a < b]
        self.chunks = np.array(rows, dtype=np.int64).reshape(-1, 3)

    def epoch_order(self, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        n = len(self.chunks)
        return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)

    def lane_chunks(self, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int, lane: int,
                    lanes: int) -> np.ndarray:
        """Chunk ids one lane of one rank reads in `epoch`, in order."""
        return self.epoch_order(seed, epoch, shuffle)[rank::world_size][lane::lanes]

    def keep(self, file: int, offset: int, text: str) -> str:
        """The part of a document that belongs to the split ("" = none)."""
        if self.hash_val_fraction:
            in_val = doc_hash(text) / 2**64 < self.hash_val_fraction
            return text if in_val == (self.split == "val") else ""
        if self.cut is not None and (file, offset) == self.cut[:2]:
            return text[:self.cut[2]] if self.split == "train" else text[self.cut[2]:]
        return text


def _line_start(f: Any, pos: int) -> int:
    """The first line start at or after `pos`."""
    f.seek(pos - 1)
    return pos - 1 + len(f.readline())


def _line_texts(path: str, text_field: str):
    """(offset, text) of each non-empty document line of a JSONL file."""
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            yield start, parse_line(line, text_field, path, start)


def parse_line(line: bytes, text_field: str, path: str, offset: int) -> str:
    """The text of one JSONL line, with `sources`' strict errors."""
    where = f"{path}@byte {offset}"
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err})") from None
    return get_text(obj, text_field, where)


@functools.lru_cache(maxsize=8)
def _tail_cut(files: tuple[tuple[str, int, int], ...], text_field: str, fraction: float) -> tuple[int, int, int]:
    """(file, line offset, chars) of the document holding character int(total * (1 - fraction))."""
    per_file = [sum(len(t) for _, t in _line_texts(p, text_field)) for p, _, _ in files]
    total = sum(per_file)
    cut = int(total * (1.0 - fraction))
    before = 0
    for i, chars in enumerate(per_file):
        if before + chars > cut:
            for offset, text in _line_texts(files[i][0], text_field):
                if before + len(text) > cut:
                    return i, offset, cut - before
                before += len(text)
        before += chars
    raise DataError(f"the val split is empty ({total:,} characters in all); raise data.val_fraction")


def _tail_ranges(paths: list[str], sizes: list[int], split: str, cut: tuple[int, int, int]) -> list[tuple[int, int]]:
    f, offset, chars = cut
    out = []
    for i, size in enumerate(sizes):
        if split == "train":
            hi = size if i < f else (offset + (chars > 0) if i == f else 0)
            out.append((0, hi))
        else:
            out.append((offset if i == f else 0, size if i >= f else 0))
    return out


def direct_files(cfg: DataConfig) -> list[Path] | None:
    """The source's files when they can be read in byte ranges (plain JSONL), else None."""
    if cfg.source.startswith(("bundled:", "hf:")) or cfg.limit:
        return None
    files = resolve_files(cfg)
    plain = all(file_format(p.name, cfg.format) == "jsonl" and not p.name.endswith((".gz", ".zst"))
                for p in files)
    return files if plain else None


def _chunk_bytes(total: int, world_size: int, lanes: int, chunk_bytes: int | None) -> int:
    if chunk_bytes:
        return chunk_bytes
    # enough chunks that every lane of every rank gets several, but not so small that seeks dominate
    return int(np.clip(total // (world_size * lanes * 8), MIN_CHUNK_BYTES, MAX_CHUNK_BYTES))


def build_plan(cfg: DataConfig, split: str, *, world_size: int = 1, lanes: int = 1,
               chunk_bytes: int | None = None, tmp_dir: str | None = None) -> StreamPlan:
    """The plan for one split. Non-JSONL sources need `tmp_dir`, where the split is written out."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    files = direct_files(cfg)
    ident = [source_fingerprint(cfg), split]
    if files is None:
        if tmp_dir is None:
            raise ValueError("a non-JSONL source needs tmp_dir to be written out as JSONL")
        path = Path(tmp_dir) / f"{split}.jsonl"
        write_split_jsonl(cfg, split, path)
        files, text_field, hash_fraction, cut = [path], TEXT_FIELD, 0.0, None
        ranges = [(0, path.stat().st_size)]
    else:
        text_field = cfg.text_field
        sizes = [p.stat().st_size for p in files]
        hash_fraction, cut = 0.0, None
        ranges = [(0, s) for s in sizes]
        if cfg.val_split == "hash":
            hash_fraction = cfg.val_fraction
        else:
            key = tuple((str(p), s, p.stat().st_mtime_ns) for p, s in zip(files, sizes, strict=True))
            cut = _tail_cut(key, text_field, cfg.val_fraction)
            ranges = _tail_ranges([str(p) for p in files], sizes, split, cut)
    total = sum(hi - lo for lo, hi in ranges)
    cb = _chunk_bytes(total, world_size, lanes, chunk_bytes)
    ident.append(cb)
    fp = hashlib.sha256(orjson.dumps(ident)).hexdigest()[:16]
    return StreamPlan([str(p) for p in files], ranges, split, text_field, cb, fp, hash_fraction, cut)


def write_split_jsonl(cfg: DataConfig, split: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for text in iter_split(cfg, split):
            f.write(orjson.dumps({TEXT_FIELD: text}) + b"\n")


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lmforge-stream-")
