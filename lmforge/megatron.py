"""Megatron-LM indexed datasets (`PREFIX.bin` + `PREFIX.idx`): read them as training data, write them.

`.bin` holds the token ids of every sequence back to back. `.idx` (little-endian) holds:

    b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence count u64 | document count u64
    sequence lengths  int32[sequence count]   (tokens)
    sequence pointers int64[sequence count]   (byte offset of each sequence in .bin)
    document indices  int64[document count]   (0, then the sequence index where each document ends)

Dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16. lmforge writes
one sequence per document, uint16 below 65500 ids and int32 above, as Megatron's tools do.

As training data (`data.shards_dir` = a prefix or a directory): a directory holding `train*.idx` and
`val*.idx` gives those splits; a single prefix gives its last 1% of documents (at least one) as val.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from lmforge.errors import DataError
from lmforge.fsutil import atomic_path

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
         8: np.uint16}
VAL_FRACTION = 0.01


def megatron_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class MegatronIndex:
    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        path = self.prefix.with_name(self.prefix.name + ".idx")
        try:
            raw = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read a Megatron index ({err})") from None
        if len(raw) < HEADER.size or bytes(raw[:9]) != MAGIC:
            raise DataError(f"{path}: not a Megatron index (no MMIDIDX header)")
        _, version, code, n_seq, n_doc = HEADER.unpack(bytes(raw[:HEADER.size]))
        if version != 1 or code not in CODES:
            raise DataError(f"{path}: unsupported Megatron index (version {version}, dtype code {code})")
        self.dtype = np.dtype(CODES[code])
        off = HEADER.size
        if len(raw) < off + n_seq * 12 + n_doc * 8:
            raise DataError(f"{path}: truncated Megatron index")
        self.lengths = np.frombuffer(raw, np.int32, n_seq, off)
        self.pointers = np.frombuffer(raw, np.int64, n_seq, off + n_seq * 4)
        self.doc_index = np.frombuffer(raw, np.int64, n_doc, off + n_seq * 12)

    @property
    def bin_path(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".bin")

    def tokens(self) -> np.memmap:
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r")

    def document(self, i: int) -> np.ndarray:
        """All tokens of document i (its sequences joined)."""
        lo, hi = int(self.doc_index[i]), int(self.doc_index[i + 1])
        if hi <= lo:
            return np.empty(0, self.dtype)
        start = int(self.pointers[lo]) // self.dtype.itemsize
        return self.tokens()[start:start + int(self.lengths[lo:hi].sum())]

    def __len__(self) -> int:
        return len(self.doc_index) - 1


class MegatronWriter:
    """Write documents to PREFIX.bin/.idx; both appear (atomically) only when `close` succeeds."""

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self.lengths: list[int] = []
        self._bin = atomic_path(self.prefix.with_name(self.prefix.name + ".bin"))
        self._tmp = self._bin.__enter__()
        self._f = open(self._tmp, "wb")  # noqa: SIM115 (closed in close/abort)

    def add_document(self, tokens: np.ndarray) -> None:
        self._f.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes())
        self.lengths.append(len(tokens))

    def close(self) -> None:
        self._f.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * self.dtype.itemsize)[:-1]])
        code = next(c for c, t in CODES.items() if np.dtype(t) == self.dtype)
        n = len(lengths)
        with atomic_path(self.prefix.with_name(self.prefix.name + ".idx")) as idx:
            idx.write_bytes(HEADER.pack(MAGIC, 1, code, n, n + 1) + lengths.tobytes()
                            + pointers.astype(np.int64).tobytes() + np.arange(n + 1, dtype=np.int64).tobytes())
        self._bin.__exit__(None, None, None)

    def abort(self, err: BaseException) -> None:
        self._f.close()
        self._bin.__exit__(type(err), err, err.__traceback__)


def _documents(shards_dir: Path, split: str):
    """Each document of a split of lmforge shards, across shard boundaries."""
    from lmforge.shards import HEADER_BYTES, load_manifest

    m = load_manifest(shards_dir)
    carry: list[np.ndarray] = []
    for f in m["splits"][split]["files"]:
        path = shards_dir / f["name"]
        body = np.memmap(path, dtype=np.dtype(m["dtype"]), mode="r", offset=HEADER_BYTES, shape=(f["tokens"],))
        starts = np.fromfile(path, dtype="<u8", count=f["docs"],
                             offset=HEADER_BYTES + f["tokens"] * body.dtype.itemsize).astype(np.int64)
        cuts = list(starts) + [len(body)]
        if carry and (not len(starts) or starts[0] > 0):  # the previous shard's last document goes on here
            carry.append(body[:cuts[0]])
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            if carry:
                yield np.concatenate(carry)
            carry = [body[a:b]]
    if carry:
        yield np.concatenate(carry)


def export_megatron(shards_dir: str | Path, out: str | Path, splits: tuple[str, ...] = ("train", "val")) -> list[Path]:
    """Write each split of an lmforge shard dir as `OUT/{split}.bin` + `.idx`, one document per sequence."""
    from lmforge.shards import load_manifest

    shards_dir, out = Path(shards_dir), Path(out)
    m = load_manifest(shards_dir)
    dtype = megatron_dtype(m["vocab_size"])
    written = []
    for split in splits:
        if not m["splits"].get(split, {}).get("files"):
            continue
        writer = MegatronWriter(out / split, dtype)
        try:
            for doc in _documents(shards_dir, split):
                writer.add_document(doc)
            writer.close()
        except BaseException as err:
            writer.abort(err)
            raise
        written.append(out / split)
    return written


# ---- as training data ---------------------------------------------------------------------------
def is_megatron(path: str | Path) -> bool:
    path = Path(path)
    if path.with_name(path.name + ".idx").is_file():
        return True
    return path.is_dir() and not (path / "manifest.json").exists() and any(path.glob("*.idx"))


def _split_sources(path: Path, split: str) -> list[tuple[MegatronIndex, int, int]]:
    """(index, first document, end document) pieces that make up a split."""
    if path.is_dir():
        names = {"train": ("train",), "val": ("val", "valid", "validation")}.get(split, (split,))
        prefixes = sorted(p.with_suffix("") for p in path.glob("*.idx") if p.stem.split("_")[0] in names)
        out = []
        for prefix in prefixes:
            index = MegatronIndex(prefix)
            out.append((index, 0, len(index)))
        return out
    index = MegatronIndex(path)
    n_val = max(1, int(len(index) * VAL_FRACTION)) if len(index) > 1 else 0
    cut = len(index) - n_val
    return [(index, 0, cut)] if split == "train" else [(index, cut, len(index))] if split == "val" else []


def open_megatron(path: str | Path, split: str) -> list[np.ndarray]:
    """Token memmaps of a split, one per indexed dataset (a contiguous slice of its .bin)."""
    out = []
    for index, lo, hi in _split_sources(Path(path), split):
        if hi <= lo:
            continue
        first, last = int(index.doc_index[lo]), int(index.doc_index[hi])
        if last <= first:
            continue
        start = int(index.pointers[first]) // index.dtype.itemsize
        end = int(index.pointers[last - 1]) // index.dtype.itemsize + int(index.lengths[last - 1])
        tokens = index.tokens()
        if len(tokens) < end:
            raise DataError(f"{index.bin_path}: shorter than its index says ({len(tokens)} < {end} tokens)")
        out.append(tokens[start:end])
    if not out:
        raise DataError(f"{path}: no Megatron data for the {split} split (expected {split}*.idx files, or a "
                        "PREFIX with PREFIX.bin and PREFIX.idx)")
    return out


def megatron_manifest(path: str | Path) -> dict:
    """A stand-in for manifest.json, so loaders, verify and inspect read Megatron data like shards."""
    splits = {}
    for split in ("train", "val"):
        pieces = _split_sources(Path(path), split)
        files = [{"name": str(index.prefix), "docs": hi - lo,
                  "tokens": int(index.lengths[int(index.doc_index[lo]):int(index.doc_index[hi])].sum())}
                 for index, lo, hi in pieces if hi > lo]
        splits[split] = {"files": files, "tokens": sum(f["tokens"] for f in files),
                         "docs": sum(f["docs"] for f in files)}
    dtypes = {MegatronIndex(p[0].prefix).dtype.name for s in ("train", "val") for p in _split_sources(Path(path), s)}
    return {"format": "megatron", "version": 1, "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "vocab_size": None, "tokenizer": {"fingerprint": None}, "source": str(path), "splits": splits}


def verify_megatron(path: str | Path) -> list[str]:
    problems = []
    for split in ("train", "val"):
        try:
            open_megatron(path, split)
        except DataError as err:
            problems.append(str(err))
    return problems
