"""Token shards: the tokenized corpus as flat binary files plus a manifest.

Shard file layout (version 1, little-endian):

    bytes 0..63   header: magic b"LMFSHARD" | version u32 | itemsize u32 (2 = uint16, 4 = uint32)
                  | token count u64 | doc count u64 | 32 zero bytes
    then          token ids, `token count` items of `itemsize` bytes
    then          `doc count` uint64 offsets (within this shard) where a document starts

Each document is written as `[<|bos|>] + tokens + <|eos|>` (bos when `tokenizer.add_bos`). A document
may run on into the next shard; it then continues at offset 0 there without an offset entry. The body
starts at byte 64, so `np.memmap(path, dtype, "r", offset=64, shape=(tokens,))` reads it directly.

`manifest.json` is written last and lists every shard with its counts and sha256; a directory
without it is not a (finished) shard directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from lmforge import __version__
from lmforge.config import Recipe
from lmforge.errors import ConfigError, DataError
from lmforge.fsutil import atomic_path, atomic_write_json, read_json, sha256_file
from lmforge.sources import iter_split, source_fingerprint
from lmforge.tokenizer import Tokenizer, tokenizer_config_hash

MAGIC = b"LMFSHARD"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32x")
HEADER_BYTES = HEADER.size  # 64
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 18  # long documents are cut (where it is safe) into pieces this long for the workers
BATCH_CHARS = 1 << 20  # text per work item sent to a worker


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def data_config_hash(recipe: Recipe) -> str:
    """Digest of the settings that change the shards' contents (not where they go, nor worker count)."""
    loader_keys = getattr(type(recipe.data), "loader_keys", frozenset)()  # how batches are read, not what
    fields = recipe.data.model_dump(mode="json", exclude={"shards_dir", "workers", *loader_keys})
    fields["add_bos"] = recipe.tokenizer.add_bos
    if recipe.prepare.enabled:  # only then, so that the hash of a direct-path recipe stays as it was
        fields["prepare"] = recipe.prepare.model_dump(mode="json", exclude={"out_dir", "strict", "part", "num_parts"})
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# ---- writing ------------------------------------------------------------------------------------
class _ShardWriter:
    """Streams token arrays into `{split}_{i:06d}.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, first: int = 0) -> None:
        self.out, self.split, self.dtype, self.cap, self.first = out, split, dtype, shard_tokens, first
        self.files: list[dict] = []
        self._stack: contextlib.ExitStack | None = None
        self._f: BinaryIO | None = None

    def _open(self) -> None:
        self._stack = contextlib.ExitStack()
        self._name = f"{self.split}_{self.first + len(self.files):06d}.bin"
        self._tmp = self._stack.enter_context(atomic_path(self.out / self._name))
        self._f = self._stack.enter_context(open(self._tmp, "wb"))  # noqa: SIM115 (closed by the stack)
        self._f.write(b"\0" * HEADER_BYTES)
        self._count, self._starts = 0, []

    def add(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Append `tokens`; `starts` are the offsets in `tokens` where documents begin."""
        pos = 0
        while pos < len(tokens):
            if self._f is None:
                self._open()
            take = min(self.cap - self._count, len(tokens) - pos)
            inside = starts[(starts >= pos) & (starts < pos + take)]
            self._starts.extend((inside - pos + self._count).tolist())
            self._f.write(tokens[pos:pos + take].astype(self.dtype, copy=False).tobytes())
            self._count += take
            pos += take
            if self._count == self.cap:
                self._finish()

    def _finish(self) -> None:
        f = self._f
        f.write(np.asarray(self._starts, dtype="<u8").tobytes())
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._count, len(self._starts)))
        f.close()
        entry = {"name": self._name, "tokens": self._count, "docs": len(self._starts),
                 "bytes": self._tmp.stat().st_size, "sha256": sha256_file(self._tmp)}
        self._stack.close()  # fsync + rename into place
        self.files.append(entry)
        self._f = self._stack = None

    def close(self, error: BaseException | None = None) -> list[dict]:
        """Finish the last shard; or, given the error that stopped the writing, drop its temp file."""
        if error is not None and self._stack is not None:
            self._stack.__exit__(type(error), error, error.__traceback__)
        elif self._f is not None:
            self._finish()
        return self.files


# ---- tokenizing (runs in worker processes) ---------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, add_bos: bool) -> None:
    _WORKER.update(tok=tokenizer, add_bos=add_bos)


def _encode_items(items: list[tuple[str, bool, bool]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Encode (text, starts a doc, ends a doc) pieces → tokens, doc start offsets, docs ended, bytes."""
    tok: Tokenizer = _WORKER["tok"]
    bos = tok.bos_id if _WORKER["add_bos"] else None
    parts, starts, pos, docs, nbytes = [], [], 0, 0, 0
    for text, first, last in items:
        ids = tok.encode(text)  # one thread per process: encode_batch would start its own threads
        if first:
            starts.append(pos)
            if bos is not None:
                parts.append([bos])
                pos += 1
        parts.append(ids)
        pos += len(ids)
        if last:
            parts.append([tok.eos_id])
            pos += 1
            docs += 1
        nbytes += len(text.encode("utf-8", "surrogatepass"))
    flat = np.fromiter((i for p in parts for i in p), dtype=np.uint32, count=pos)
    return flat, np.asarray(starts, dtype=np.int64), docs, nbytes


def _work_items(texts: Iterable[str], tok: Tokenizer) -> Iterator[list[tuple[str, bool, bool]]]:
    batch: list[tuple[str, bool, bool]] = []
    size = 0
    for text in texts:
        chunks = tok.chunk_text(text, CHUNK_CHARS)
        for k, chunk in enumerate(chunks):
            batch.append((chunk, k == 0, k == len(chunks) - 1))
            size += len(chunk)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _run(items: Iterator, pool: Any, depth: int, fn: Callable = None) -> Iterator:
    """Results in input order, with at most `depth` items in flight (Pool.imap would read ahead all)."""
    fn = fn or _encode_items
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _progress() -> Any:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"),
                    TextColumn("{task.fields[docs]:,} docs  {task.completed:,.1f} MB"),
                    TextColumn("{task.fields[docs_s]:,.0f} docs/s  {task.fields[mb_s]:.1f} MB/s"),
                    TimeElapsedColumn(), console=console, disable=not console.is_terminal, transient=True)


def _write_split(recipe: Recipe, tok: Tokenizer, split: str, out: Path, pool: Any, depth: int,
                 progress: Any, texts: Callable[[str], Iterable[str]]) -> dict:
    writer = _ShardWriter(out, split, dtype_for(tok.vocab_size), recipe.data.shard_tokens)
    task = progress.add_task(f"tokenize {split}", total=None, docs=0, docs_s=0.0, mb_s=0.0)
    docs = nbytes = chars = 0
    t0 = time.perf_counter()

    def counted(texts: Iterable[str]) -> Iterator[str]:
        nonlocal chars
        for t in texts:
            chars += len(t)
            yield t

    try:
        for flat, starts, n_docs, n_bytes in _run(_work_items(counted(texts(split)), tok),
                                                  pool, depth):
            writer.add(flat, starts)
            docs, nbytes = docs + n_docs, nbytes + n_bytes
            dt = max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=nbytes / 1e6, docs=docs, docs_s=docs / dt, mb_s=nbytes / 1e6 / dt)
        files = writer.close()
    except BaseException as err:
        writer.close(err)
        raise
    return {"files": files, "tokens": sum(f["tokens"] for f in files), "docs": docs,
            "source_bytes": nbytes, "source_chars": chars, "seconds": round(time.perf_counter() - t0, 3)}


def _pool(workers: int, tok: Tokenizer, add_bos: bool) -> Any:
    if workers <= 1:
        _init_worker(tok, add_bos)
        return None
    # fork shares the tokenizer without pickling; elsewhere (macOS, Windows) spawn is the safe choice.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ctx.Pool(workers, initializer=_init_worker, initargs=(tok, add_bos))


def tokenize_to_shards(recipe: Recipe, tokenizer: Tokenizer, log: Callable[[str], object] = print,
                       texts: Callable[[str], Iterable[str]] | None = None) -> Path:
    """Tokenize the train and val splits into `data.shards_dir`; the manifest is written last.

    `texts(split)` gives a split's documents; by default `iter_split` of the recipe's source."""
    texts = texts or (lambda split: iter_split(recipe.data, split))
    out = Path(recipe.data.shards_dir)
    if tokenizer.eos_id is None:
        raise ConfigError("tokenizer.special_tokens: the tokenizer has no end-of-document token "
                          "(expected one of <|eos|>, </s>, <|endoftext|>)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # from here on the directory is "not built"
    workers = recipe.data.workers or os.cpu_count() or 1
    pool = _pool(workers, tokenizer, recipe.tokenizer.add_bos)
    t0 = time.perf_counter()
    try:
        with _progress() as progress:
            splits = {s: _write_split(recipe, tokenizer, s, out, pool, 2 * workers, progress, texts)
                      for s in SPLITS}
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if splits["train"]["tokens"] == 0:
        raise DataError(f"data.source: {recipe.data.source} gave no training text")
    keep = {f["name"] for s in splits.values() for f in s["files"]}
    for stale in out.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"):  # shards of an earlier, larger build
        if stale.name.split("_")[0] in SPLITS and stale.name not in keep:
            stale.unlink()
    manifest = {
        "format": "lmforge-shards", "version": VERSION, "dtype": dtype_for(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size, "add_bos": recipe.tokenizer.add_bos,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind,
                      "dir": recipe.tokenizer.dir, "config_hash": tokenizer_config_hash(recipe.tokenizer)},
        "data_config_hash": data_config_hash(recipe), "source": recipe.data.source,
        "source_fingerprint": source_fingerprint(recipe.data), "splits": splits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lmforge_version": __version__,
    }
    atomic_write_json(out / "manifest.json", manifest)
    dt = time.perf_counter() - t0
    mb = sum(s["source_bytes"] for s in splits.values()) / 1e6
    log(f"shards: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens "
        f"({mb:.1f} MB in {dt:.1f}s, {mb / max(dt, 1e-9):.1f} MB/s, {workers} workers) -> {out}")
    if splits["val"]["tokens"] == 0:
        log("shards: warning: the val split is empty; raise data.val_fraction")
    return out


def ensure_shards(recipe: Recipe, tokenizer: Tokenizer, log: Callable[[str], object] = print) -> Path:
    """Build the shards unless `data.shards_dir` already holds ones made from the same inputs."""
    out = Path(recipe.data.shards_dir)
    try:
        m = load_manifest(out)
        ok = (m["tokenizer"]["fingerprint"] == tokenizer.fingerprint
              and m["data_config_hash"] == data_config_hash(recipe)
              and m["source_fingerprint"] == source_fingerprint(recipe.data)
              and all((out / f["name"]).is_file() and (out / f["name"]).stat().st_size == f["bytes"]
                      for s in m["splits"].values() for f in s["files"]))
    except (DataError, KeyError, TypeError):
        ok = False
    if ok:
        log(f"shards: up to date ({out}, train {m['splits']['train']['tokens']:,} tokens, "
            f"val {m['splits']['val']['tokens']:,} tokens)")
        return out
    if recipe.prepare.enabled:
        from lmforge.prepare import ensure_prepared

        return ensure_prepared(recipe, tokenizer, log=log)
    return tokenize_to_shards(recipe, tokenizer, log=log)


# ---- reading ------------------------------------------------------------------------------------
def load_manifest(dir: str | Path) -> dict:
    from lmforge.megatron import is_megatron, megatron_manifest

    if is_megatron(dir):  # Megatron-LM .bin/.idx data read as it is
        return megatron_manifest(dir)
    path = Path(dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"no shards in {dir} (manifest.json missing); run `lmforge tokenize RECIPE`")
    try:
        m = read_json(path)
    except (OSError, orjson.JSONDecodeError) as err:
        raise DataError(f"{path}: corrupt manifest ({err}); re-run `lmforge tokenize`") from None
    if not isinstance(m, dict) or m.get("format") != "lmforge-shards" or "splits" not in m:
        raise DataError(f"{path}: not an lmforge shard manifest")
    if m.get("version", 0) > VERSION:
        raise DataError(f"{path}: shard format version {m['version']} is newer than this lmforge reads")
    return m


def _split_files(dir: str | Path, split: str) -> tuple[dict, list[dict]]:
    m = load_manifest(dir)
    if split not in m["splits"]:
        raise DataError(f"shards in {dir} have no split {split!r} (have: {', '.join(m['splits'])})")
    return m, m["splits"][split]["files"]


def open_split(dir: str | Path, split: str) -> list[np.memmap]:
    """The token bodies of a split's shards, memory-mapped read-only, one per shard."""
    from lmforge.megatron import is_megatron, open_megatron

    if is_megatron(dir):
        return open_megatron(dir, split)
    m, files = _split_files(dir, split)
    if not files:
        raise DataError(f"the {split} split of the shards in {dir} is empty; raise data.val_fraction "
                        "or add text, then re-run `lmforge tokenize`")
    out = []
    for f in files:
        path = Path(dir) / f["name"]
        if not path.is_file() or path.stat().st_size != f["bytes"]:
            raise DataError(f"{path}: missing or truncated; run `lmforge shards verify {dir}`")
        out.append(np.memmap(path, dtype=np.dtype(m["dtype"]), mode="r", offset=HEADER_BYTES,
                             shape=(f["tokens"],)))
    return out


def split_tokens(dir: str | Path, split: str) -> int:
    return sum(f["tokens"] for f in _split_files(dir, split)[1])


def check_tokenizer(dir: str | Path, tokenizer: Tokenizer) -> None:
    made_with = load_manifest(dir)["tokenizer"]["fingerprint"]
    if made_with is None:  # Megatron data does not say which tokenizer made it
        return
    if made_with != tokenizer.fingerprint:
        raise DataError(f"shards in {dir} were made with tokenizer {made_with[:12]}, but the model/tokenizer "
                        f"is {tokenizer.fingerprint[:12]}; re-run `lmforge tokenize`")


def _check_file(path: Path, entry: dict, dtype: np.dtype, vocab_size: int) -> list[str]:
    if not path.is_file():
        return [f"{path.name}: missing"]
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        return [f"{path.name}: truncated ({size} bytes, shorter than the header)"]
    magic, version, itemsize, tokens, docs = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION or itemsize != dtype.itemsize:
        return [f"{path.name}: bad header (magic {magic!r}, version {version}, itemsize {itemsize})"]
    problems = []
    if (tokens, docs) != (entry["tokens"], entry["docs"]):
        problems.append(f"{path.name}: header says {tokens} tokens/{docs} docs, manifest says "
                        f"{entry['tokens']}/{entry['docs']}")
    expected = HEADER_BYTES + tokens * itemsize + docs * 8
    if size != expected or size != entry["bytes"]:
        return problems + [f"{path.name}: truncated or padded ({size} bytes, expected {expected})"]
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{path.name}: checksum mismatch (the file changed after it was written)")
    body = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(tokens,))
    if tokens and int(body.max()) >= vocab_size:
        problems.append(f"{path.name}: token id {int(body.max())} >= vocab size {vocab_size}")
    return problems


def verify_shards(dir: str | Path, tokenizer: Tokenizer | None = None) -> list[str]:
    """Every problem found (empty when the shards are sound)."""
    try:
        m = load_manifest(dir)
    except DataError as err:
        return [str(err)]
    if m["format"] == "megatron":
        from lmforge.megatron import verify_megatron

        return verify_megatron(dir)
    problems = []
    for split, info in m["splits"].items():
        for entry in info["files"]:
            problems += [f"{split}: {p}" for p in
                         _check_file(Path(dir) / entry["name"], entry, np.dtype(m["dtype"]), m["vocab_size"])]
        if sum(f["tokens"] for f in info["files"]) != info["tokens"]:
            problems.append(f"{split}: manifest token total does not match its files")
    if tokenizer is not None:
        try:
            check_tokenizer(dir, tokenizer)
        except DataError as err:
            problems.append(str(err))
    return problems


def inspect_shards(dir: str | Path, tokenizer: Tokenizer | None = None, n_tokens: int = 64) -> dict:
    """A summary of a shard directory (and the first tokens decoded, given the tokenizer)."""
    m = load_manifest(dir)
    out: dict[str, Any] = {
        "dir": str(dir), "dtype": m["dtype"], "vocab_size": m["vocab_size"],
        "tokenizer": m["tokenizer"]["fingerprint"], "source": m.get("source"), "created": m.get("created"),
        "splits": {s: {"files": len(i["files"]), "tokens": i["tokens"], "docs": i["docs"],
                       "source_bytes": i.get("source_bytes", 0),
                       "bytes_per_token": round(i.get("source_bytes", 0) / max(i["tokens"], 1), 3)}
                   for s, i in m["splits"].items()},
    }
    if tokenizer is not None and m["splits"]["train"]["files"]:
        out["first_tokens"] = np.asarray(open_split(dir, "train")[0][:n_tokens]).tolist()
        out["first_text"] = tokenizer.decode(out["first_tokens"])
    return out
