"""What `prepare` writes: segments (token shards + cleaned docs + a resume record), and stats.json."""

from __future__ import annotations

import contextlib
import io
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from lmforge.config import Recipe
from lmforge.fsutil import atomic_path, atomic_write_json, read_json
from lmforge.shards import _ShardWriter, dtype_for
from lmforge.sources import MAX_REPORTED, ReadStats

SPLITS = ("train", "val")
_SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.(bin|jsonl\.zst)$")


class DocsWriter:
    """Cleaned documents as zstd-compressed JSONL, written to a temporary file until closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._stack: contextlib.ExitStack | None = None

    def write(self, data: bytes, n: int) -> None:
        if self._stack is None:
            import zstandard

            self._stack = contextlib.ExitStack()
            tmp = self._stack.enter_context(atomic_path(self.path))
            f = self._stack.enter_context(open(tmp, "wb"))  # noqa: SIM115 (closed by the stack)
            self._z = zstandard.ZstdCompressor(level=1).stream_writer(f, closefd=False)
        self._z.write(data)
        self.count += n

    def close(self) -> dict | None:
        if self._stack is None:
            return None
        self._z.close()
        self._stack.close()  # fsync + rename into place
        return {"name": self.path.name, "docs": self.count, "bytes": self.path.stat().st_size}

    def abort(self, err: BaseException) -> None:
        if self._stack is not None:
            self._stack.__exit__(type(err), err, err.__traceback__)

    @staticmethod
    def read(path: Path) -> Iterator[str]:
        import zstandard

        with open(path, "rb") as f:
            for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f)):
                yield orjson.loads(line)["text"]


def _select_lines(buf: bytes, ends: np.ndarray, keep: np.ndarray) -> bytes:
    """The lines of `buf` (ending at `ends`) where `keep`, joined; runs of kept lines are sliced whole."""
    idx = np.flatnonzero(keep)
    if len(idx) == len(ends):
        return buf
    breaks = np.flatnonzero(np.diff(idx) > 1)
    firsts = np.concatenate([idx[:1], idx[breaks + 1]])
    lasts = np.concatenate([idx[breaks], idx[-1:]])
    begins = np.concatenate([[0], ends[:-1]])
    view = memoryview(buf)
    return b"".join(view[begins[a]:ends[b]] for a, b in zip(firsts, lasts, strict=True))


class Segment:
    """One segment of output: a train and a val shard, their documents, and the dedup keys added."""

    def __init__(self, index: int, recipe: Recipe, tok: Any, ident: str, tables: dict) -> None:
        cfg, p = recipe.data, recipe.prepare
        self.index, self.ident, self.tables = index, ident, tables
        self.out = Path(p.out_dir)
        dtype = dtype_for(tok.vocab_size)
        self.writers = {s: _ShardWriter(Path(cfg.shards_dir), s, dtype, 1 << 62, first=index) for s in SPLITS}
        self.doc_writers = ({s: DocsWriter(self.out / "docs" / f"{s}_{index:06d}.jsonl.zst") for s in SPLITS}
                            if p.write_docs else {})
        self.specials = 1 + (recipe.tokenizer.add_bos and tok.bos_id is not None)
        self.val_cut = np.uint64(int(cfg.val_fraction * 2**64))
        self.inserted: dict[str, list[np.ndarray]] = {name: [] for name in tables}
        self.counts: Counter = Counter()
        self.malformed_at: list[str] = []
        self.pos: dict = {}
        self.docs = 0
        self.train_tokens = 0

    def _dedup(self, res: dict) -> np.ndarray:
        keys = res["keys"]
        keep = np.ones(len(keys), dtype=bool)
        if "exact" in self.tables:
            new, added = self.tables["exact"].add(keys)
            self.inserted["exact"].append(added)
            self.counts["dup_exact"] += int(len(keys) - new.sum())
            keep &= new
        if "near" in self.tables:
            bands = res["bands"]
            new, added = self.tables["near"].add(bands.ravel())
            self.inserted["near"].append(added)
            near = ~new.reshape(bands.shape).all(axis=1)  # a band seen before: a likely near-duplicate
            self.counts["dup_near"] += int((near & keep).sum())
            keep &= ~near
        return keep

    def add(self, res: dict) -> int:
        """Take one worker result: deduplicate, split, write. Returns how many documents were kept."""
        self.counts.update(res["counts"])
        self.malformed_at += res["malformed_at"][:MAX_REPORTED - len(self.malformed_at)]
        keep = self._dedup(res)
        is_val = res["keys"] < self.val_cut
        lengths = res["lengths"]
        for split, m in (("train", keep & ~is_val), ("val", keep & is_val)):
            n = int(m.sum())
            if not n:
                continue
            tokens = res["tokens"][np.repeat(m, lengths)]
            kept = lengths[m]
            self.writers[split].add(tokens, np.concatenate([[0], np.cumsum(kept)[:-1]]))
            if self.doc_writers:
                self.doc_writers[split].write(_select_lines(res["lines"], res["line_ends"], m), n)
            self.counts[f"docs_out:{split}"] += n
            self.counts[f"tokens:{split}"] += len(tokens)
            self.counts[f"text_tokens:{split}"] += len(tokens) - self.specials * n
            self.counts[f"bytes_out:{split}"] += int(res["nbytes"][m].sum())
        self.docs += int(keep.sum())
        self.train_tokens = self.counts["tokens:train"]
        self.pos = res["pos"]
        return int(keep.sum())

    def close(self) -> dict:
        files = {s: got[0] for s, w in self.writers.items() if (got := w.close())}
        docs = {s: got for s, w in self.doc_writers.items() if (got := w.close())}
        state = self.out / "state"
        keys_name = f"segment_{self.index:06d}.npz"
        with atomic_path(state / keys_name) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{name: np.concatenate(parts) if parts else np.empty(0, np.uint64)
                           for name, parts in self.inserted.items()})
        record = {"index": self.index, "identity": self.ident, "pos": self.pos, "keys": keys_name,
                  "counts": {k: int(v) for k, v in self.counts.items()}, "malformed_at": self.malformed_at,
                  "files": files, "docs": docs}
        atomic_write_json(state / f"segment_{self.index:06d}.json", record)  # last: the segment is done
        return record

    def abort(self, err: BaseException) -> None:
        for w in self.writers.values():
            w.close(err)
        for d in self.doc_writers.values():
            d.abort(err)


def _complete(rec: dict, out: Path, shards: Path) -> bool:
    entries = [(shards, f) for f in rec["files"].values()] + [(out / "docs", f) for f in rec["docs"].values()]
    return (out / "state" / rec["keys"]).is_file() and all(
        (d / f["name"]).is_file() and (d / f["name"]).stat().st_size == f["bytes"] for d, f in entries)


def load_segments(out: Path, shards: Path, ident: str) -> list[dict]:
    """The completed segments of an earlier run with the same identity; anything else is removed."""
    state = out / "state"
    records: list[dict] = []
    for i in itertools.count():
        path = state / f"segment_{i:06d}.json"
        try:
            rec = read_json(path)
        except (OSError, ValueError):
            break
        if rec.get("identity") != ident or not _complete(rec, out, shards):
            break
        records.append(rec)
    for path in state.glob("segment_*"):
        if int(path.name[8:14]) >= len(records):
            path.unlink()
    for d in (shards, out / "docs", state):  # temp files of a run that was killed
        for tmp in d.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    return records


def remove_stale(shards: Path, out: Path, splits: dict, done: list[dict]) -> None:
    keep = {f["name"] for s in splits.values() for f in s["files"]}
    keep |= {f["name"] for r in done for f in r["docs"].values()}
    for d in (shards, out / "docs"):
        for path in d.glob("*_*"):
            if _SHARD_NAME.match(path.name) and path.name not in keep:
                path.unlink()


def summarize(recipe: Recipe, tok: Any, done: list[dict], tables: dict, main: ReadStats, seconds: float,
              first_new: int, workers: int) -> dict:
    from lmforge.clean import build_filters
    from lmforge.prepare import peak_rss_mb

    p = recipe.prepare
    c: Counter = Counter()
    malformed_at: list[str] = list(main.malformed_at)
    for r in done:
        c.update(r["counts"])
        malformed_at += r["malformed_at"]
    funnel, n = [], c["docs_in"]
    steps = ["empty_after_cleaning", *(name for name, _ in build_filters(p)), "min_tokens"]
    for name, key in [(s, f"drop:{s}") for s in steps] + [("dedup_exact", "dup_exact"), ("dedup_near", "dup_near")]:
        funnel.append({"filter": name, "in": n, "out": n - c[key], "dropped": c[key]})
        n -= c[key]
    new_bytes = sum(r["counts"].get("bytes_in", 0) for r in done[first_new:])
    text_tokens = {s: c[f"text_tokens:{s}"] for s in SPLITS}
    bytes_out = {s: c[f"bytes_out:{s}"] for s in SPLITS}
    bpt = {s: round(bytes_out[s] / max(text_tokens[s], 1), 4) for s in SPLITS}
    bpt["all"] = round(sum(bytes_out.values()) / max(sum(text_tokens.values()), 1), 4)
    return {
        "source": recipe.data.source, "part": p.part, "num_parts": p.num_parts,
        "docs_in": c["docs_in"], "chars_in": c["chars_in"], "mb_in": round(c["bytes_in"] / 1e6, 3),
        "bad_input": {"malformed_lines": c["malformed"] + main.malformed, "malformed_at": malformed_at[:MAX_REPORTED],
                      "utf8_replaced": c["utf8_replaced"] + main.utf8_replaced, "empty_docs": c["empty"] + main.empty},
        "filters": funnel, "dropped_by_filters": sum(c[f"drop:{s}"] for s in steps),
        "duplicates": {"exact": c["dup_exact"], "near": c["dup_near"],
                       "table_full": any(t.full for t in tables.values()),
                       "table_mb": round(sum(t.nbytes for t in tables.values()) / 2**20, 1)},
        "docs_out": {s: c[f"docs_out:{s}"] for s in SPLITS}, "bytes_out": bytes_out,
        "tokens": {s: c[f"tokens:{s}"] for s in SPLITS}, "text_tokens": text_tokens, "bytes_per_token": bpt,
        "tokenizer": {"kind": tok.kind, "name": recipe.tokenizer.pretrained or tok.kind,
                      "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
        "segments": len(done), "resumed_after": first_new, "seconds": round(seconds, 3),
        "mb_per_s": round(new_bytes / 1e6 / max(seconds, 1e-9), 3),
        "docs_per_s": round(sum(r["counts"].get("docs_in", 0) for r in done[first_new:]) / max(seconds, 1e-9), 1),
        "workers": workers, "peak_rss_mb": {k: round(v, 1) for k, v in peak_rss_mb().items()},
    }


# ---- windows and merging ------------------------------------------------------------------------
def _read_range(parts: list[np.ndarray], offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    pieces = []
    for part, start in zip(parts, offsets[:-1], strict=False):
        a, b = max(lo - start, 0), min(hi - start, len(part))
        if a < b:
            pieces.append(np.asarray(part[a:b]))
    return np.concatenate(pieces)


def export_windows(shards: Path, split: str, window: int, stride: int) -> dict:
    """Every `window` tokens at `stride` steps over a split, as a 2-D array in `windows_{split}.npy`."""
    from lmforge.shards import open_split

    parts = open_split(shards, split)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    rows = (int(offsets[-1]) - window) // stride + 1
    path = shards / f"windows_{split}.npy"
    chunk = max(1, (1 << 22) // window)  # rows per step: a few million tokens in memory at a time
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype, shape=(rows, window))
        for a in range(0, rows, chunk):
            b = min(rows, a + chunk)
            tokens = _read_range(parts, offsets, a * stride, (b - 1) * stride + window)
            out[a:b] = np.lib.stride_tricks.sliding_window_view(tokens, window)[::stride][:b - a]
        out.flush()
        del out
    return {"file": path.name, "rows": rows, "window": window, "stride": stride}


def merge_shards(dirs: list[Path], out: Path) -> dict:
    """One manifest in `out` over the shards of several dirs (e.g. the parts of `prepare --num-parts`).

    Nothing is copied: the merged manifest names each file by its path relative to `out`."""
    import os

    from lmforge.errors import DataError
    from lmforge.shards import load_manifest

    if not dirs:
        raise DataError("shards merge: give at least one shard dir")
    manifests = [load_manifest(d) for d in dirs]
    first = manifests[0]
    for d, m in zip(dirs, manifests, strict=True):
        for key in ("dtype", "vocab_size", "add_bos"):
            if m.get(key) != first.get(key):
                raise DataError(f"shards merge: {d} has {key} = {m.get(key)}, {dirs[0]} has {first.get(key)}")
        if m["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"]:
            raise DataError(f"shards merge: {d} was made with another tokenizer than {dirs[0]}")
    splits: dict[str, dict] = {}
    for d, m in zip(dirs, manifests, strict=True):
        rel = os.path.relpath(d, out)
        for split, info in m["splits"].items():
            agg = splits.setdefault(split, {"files": [], "tokens": 0, "docs": 0, "source_bytes": 0})
            agg["files"] += [{**f, "name": f"{rel}/{f['name']}"} for f in info["files"]]
            for key in ("tokens", "docs", "source_bytes"):
                agg[key] += info.get(key, 0)
    for agg in splits.values():
        agg["bytes_per_token"] = round(agg["source_bytes"] / max(agg["tokens"], 1), 4)
    manifest = {**{k: v for k, v in first.items() if k not in ("prepare", "windows")}, "splits": splits,
                "merged_from": [os.path.relpath(d, out) for d in dirs]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
