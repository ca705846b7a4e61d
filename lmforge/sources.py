"""Where documents come from: the bundled corpus, text files, JSONL, Parquet, Hugging Face datasets.

`cfg.source` may be `bundled:NAME`, a file, a glob, a folder (read recursively, sorted) or `hf:NAME`. A
file is Parquet when it ends in .parquet, JSONL when it ends in .jsonl/.ndjson (optionally .gz/.zst),
text otherwise; `cfg.format` overrides the guess. .gz and .zst files are decompressed on the fly.

Reading has two steps, so that the costly one can run in worker processes: `iter_blocks` cuts the
input into raw `Block`s of about a megabyte (see source_readers) and `parse_block` makes `Document`s of
one. With a `ReadStats`, parsing is lenient (bad lines skipped, bad UTF-8 replaced, both counted);
without, it fails on the first problem, as the direct `tokenize` path wants.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from lmforge import __version__
from lmforge.config import DataConfig
from lmforge.errors import DataError

BUNDLED = {"tinyshakespeare": "tinyshakespeare.txt.gz"}
BLOCK_BYTES = 1 << 20
MAX_REPORTED = 10  # positions of bad lines kept for stats.json


@dataclass
class Document:
    text: str
    meta: dict = field(default_factory=dict)


@dataclass
class ReadStats:
    """Bad input met while parsing leniently."""
    malformed: int = 0
    malformed_at: list[str] = field(default_factory=list)
    utf8_replaced: int = 0
    """Invalid UTF-8 byte sequences replaced by U+FFFD."""
    empty: int = 0

    def bad(self, where: str) -> None:
        self.malformed += 1
        if len(self.malformed_at) < MAX_REPORTED:
            self.malformed_at.append(where)


@dataclass
class Block:
    kind: Literal["jsonl", "lines", "paragraphs", "files", "arrow", "records", "docs"]
    data: Any
    path: str = ""
    line: int = 1
    """Line number of the block's first line in its file (0 = unknown: positions are given in bytes)."""
    offset: int = 0
    pos: dict = field(default_factory=dict)
    """Where reading resumes after this block (see `iter_blocks`)."""
    nbytes: int = 0


_REPLACED = [0]  # invalid UTF-8 sequences replaced in this process, counted by the error handler


def _count_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _REPLACED[0] += 1
    return "\ufffd", err.end


codecs.register_error("lmforge-replace", _count_replace)


def _decode(raw: bytes, where: str, offset: int, stats: ReadStats | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if stats is None:
            raise DataError(f"{where}: not UTF-8 text ({err.reason} near byte {offset + err.start})") from None
    before = _REPLACED[0]
    text = raw.decode("utf-8", "lmforge-replace")
    stats.utf8_replaced += _REPLACED[0] - before
    return text


# ---- files --------------------------------------------------------------------------------------
def _bundled(source: str) -> Any:
    name = source.split(":", 1)[1]
    if name not in BUNDLED:
        raise DataError(f"data.source: no bundled corpus {name!r}; available: "
                        + ", ".join(f"bundled:{n}" for n in BUNDLED))
    return resources.files("lmforge.data") / BUNDLED[name]


def resolve_files(cfg: DataConfig) -> list[Path]:
    """The files a (non-bundled, non-hf) source names, in reading order."""
    source = cfg.source
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                       if Path(p).is_file())
        if not files:
            raise DataError(f"data.source: the pattern {source} matches no files")
        return files
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"data.source: the folder {path} holds no files")
        return files
    if not path.is_file():
        raise DataError(f"data.source: {path} not found")
    return [path]


def file_format(name: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    base = name.removesuffix(".gz").removesuffix(".zst")
    if base.endswith(".parquet"):
        return "parquet"
    return "jsonl" if base.endswith((".jsonl", ".ndjson")) else "text"


@contextlib.contextmanager
def open_binary(path: Path | Any) -> Iterator[IO[bytes]]:
    with path.open("rb") as f:
        if path.name.endswith(".gz"):
            yield gzip.GzipFile(fileobj=f)
        elif path.name.endswith(".zst"):
            import zstandard

            yield zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        else:
            yield f


def _compressed(name: str) -> bool:
    return name.endswith((".gz", ".zst"))


# ---- fields -------------------------------------------------------------------------------------
def _walk(node: Any, parts: list[str], dotted: str, where: str) -> Any:
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
            # a list of sections: the rest of the path is taken in each one, in order
            return [_walk(x, parts[i:], dotted, where) for x in node]
        else:
            keys = ", ".join(map(str, node)) if isinstance(node, dict) else type(node).__name__
            raise DataError(f"{where}: no field {dotted!r} (at {part!r}; available: {keys or 'none'});"
                            " set data.text_field")
    return node


def _flatten(node: Any) -> list | None:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        out = []
        for x in node:
            sub = _flatten(x)
            if sub is None:
                return None
            out += sub
        return out
    return None


def get_text(obj: Any, dotted: str, where: str) -> str:
    """The text at `dotted` in `obj`; lists of strings (or of sections) are joined with blank lines."""
    if type(obj) is dict and type(node := obj.get(dotted)) is str:  # the common case, kept cheap
        return node
    node = _walk(obj, dotted.split("."), dotted, where)
    if node is None:
        return ""
    parts = _flatten(node)
    if parts is None:
        raise DataError(f"{where}: field {dotted!r} is a {type(node).__name__}, expected text")
    return "\n\n".join(p for p in parts if p) if len(parts) != 1 else parts[0]


def get_meta(obj: Any, fields: list[str]) -> dict:
    out = {}
    for name in fields:
        node = obj
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[name] = node
    return out


# ---- parsing (worker side) ----------------------------------------------------------------------
def _where(block: Block, i: int, byte: int) -> str:
    return f"{block.path}:{block.line + i}" if block.line else f"{block.path}@byte {block.offset + byte}"


def _jsonl(block: Block, cfg: DataConfig, stats: ReadStats | None) -> Iterator[Document]:
    byte, field, metas = 0, cfg.text_field, cfg.meta_fields
    for i, line in enumerate(block.data.split(b"\n")):
        start, byte = byte, byte + len(line) + 1
        if not line or line.isspace():  # not strip(): that copies every line to test it
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            try:  # orjson refuses invalid UTF-8 outright; give it the repaired text before calling it bad
                obj = orjson.loads(_decode(line, block.path, block.offset + start, stats))
            except orjson.JSONDecodeError:
                if stats is None:
                    raise DataError(f"{_where(block, i, start)}: not valid JSON ({err})") from None
                stats.bad(_where(block, i, start))
                continue
        text = obj.get(field) if type(obj) is dict else None
        if type(text) is not str:  # not the common case: a dotted path, a list, null, a missing field
            try:
                text = get_text(obj, field, _where(block, i, start))
            except DataError as err:
                if stats is None or "no field" in str(err):
                    raise
                stats.bad(_where(block, i, start))
                continue
        meta = {"path": block.path, "line": block.line + i} if block.line else {"path": block.path}
        if metas:
            meta.update(get_meta(obj, metas))
        yield Document(text, meta)


def _lines(block: Block, cfg: DataConfig, stats: ReadStats | None) -> Iterator[Document]:
    byte = 0
    for i, raw in enumerate(block.data.split(b"\n")):
        start, byte = byte, byte + len(raw) + 1
        line = _decode(raw, block.path, block.offset + start, stats).rstrip("\r\n")
        if line.strip():
            yield Document(line, {"path": block.path, "line": block.line + i})


def _paragraphs(block: Block, cfg: DataConfig, stats: ReadStats | None) -> Iterator[Document]:
    """Blank-line separated blocks (main cuts blocks at blank lines, so none spans two)."""
    lines = _decode(block.data, block.path, block.offset, stats).split("\n")
    para: list[str] = []
    start = 0
    for i, line in enumerate(lines):
        if line.strip():
            if not para:
                start = i
            para.append(line)
        elif para:
            yield Document("\n".join(para).rstrip("\r\n"), {"path": block.path, "line": block.line + start})
            para = []
    if para:
        yield Document("\n".join(para).rstrip("\r\n"), {"path": block.path, "line": block.line + start})


def _arrow(block: Block, cfg: DataConfig, stats: ReadStats | None) -> Iterator[Document]:
    batch = block.data
    top = cfg.text_field.split(".")[0]
    texts = batch.column(top).to_pylist()
    meta_cols = {n: batch.column(n).to_pylist() for n in batch.schema.names if n != top}
    rest = cfg.text_field.split(".", 1)[1] if "." in cfg.text_field else ""
    for i, value in enumerate(texts):
        where = f"{block.path}: row {block.line + i}"
        row = {n: col[i] for n, col in meta_cols.items()}
        if rest:
            value = get_text(value, rest, where) if value is not None else ""
        yield Document(value or "", {"path": block.path, "row": block.line + i,
                                     **get_meta({top: texts[i], **row}, cfg.meta_fields)})


def _records(block: Block, cfg: DataConfig, stats: ReadStats | None) -> Iterator[Document]:
    for i, row in enumerate(block.data):
        where = f"{block.path}: row {block.line + i}"
        try:
            text = get_text(row, cfg.text_field, where)
        except DataError as err:
            if stats is None or "no field" in str(err):
                raise
            stats.bad(where)
            continue
        yield Document(text, {"path": block.path, "row": block.line + i, **get_meta(row, cfg.meta_fields)})


def _files(block: Block, cfg: DataConfig, stats: ReadStats | None) -> Iterator[Document]:
    for label, raw in block.data:
        yield Document(_decode(raw, label, 0, stats), {"path": label})


_PARSERS = {"jsonl": _jsonl, "lines": _lines, "paragraphs": _paragraphs, "arrow": _arrow,
            "records": _records, "files": _files}


def parse_block(block: Block, cfg: DataConfig, stats: ReadStats | None = None) -> Iterator[Document]:
    """The non-empty documents of a block; strict without `stats`, lenient (and counting) with it."""
    if block.kind == "docs":
        yield from block.data
        return
    for doc in _PARSERS[block.kind](block, cfg, stats):
        if doc.text:
            yield doc
        elif stats is not None:
            stats.empty += 1


# ---- reading (main side) ------------------------------------------------------------------------
def iter_blocks(cfg: DataConfig, *, part: int = 0, num_parts: int = 1, resume: dict | None = None,
                stats: ReadStats | None = None) -> Iterator[Block]:
    """Raw blocks of this part of the input, in a stable order; each carries the position after it.

    With `cfg.limit` the blocks are parsed here and cut after that many documents (test mode).
    """
    from lmforge.source_readers import read_units

    blocks = read_units(cfg, part, num_parts, resume or {})
    if not cfg.limit:
        yield from blocks
        return
    left = cfg.limit - (resume or {}).get("docs", 0)
    for block in blocks:
        docs = list(parse_block(block, cfg, stats))[:left]
        left -= len(docs)
        yield Block("docs", docs, block.path, pos={**block.pos, "docs": cfg.limit - left}, nbytes=block.nbytes)
        if left <= 0:
            return


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every non-empty document of the source, in a stable order. An empty corpus is an error."""
    empty = True
    for block in iter_blocks(cfg):
        for doc in parse_block(block, cfg):
            empty = False
            yield doc
    if empty:
        raise DataError(f"data.source: {cfg.source} holds no text")


def doc_hash(text: str) -> int:
    # A stable hash, not Python's salted hash(), so the split is the same on every run and machine.
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def iter_split(cfg: DataConfig, split: Literal["train", "val"]) -> Iterator[str]:
    """Document texts of one split.

    `tail`: the whole corpus as one character stream, cut at int(total * (1 - val_fraction)) as
    nanoGPT does; the document straddling the cut is cut too. `hash`: by a hash of each text.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if cfg.val_split == "hash":
        for doc in iter_documents(cfg):
            if (doc_hash(doc.text) / 2**64 < cfg.val_fraction) == (split == "val"):
                yield doc.text
        return
    total = sum(len(doc.text) for doc in iter_documents(cfg))
    cut = int(total * (1.0 - cfg.val_fraction))
    pos = 0
    for doc in iter_documents(cfg):
        start, end = pos, pos + len(doc.text)
        pos = end
        if split == "train":
            if start >= cut:
                return
            yield doc.text[: cut - start]
        elif end > cut:
            yield doc.text[max(0, cut - start):]


def source_fingerprint(cfg: DataConfig) -> str:
    """Cheap identity of the corpus and its split: file names, sizes and mtimes, not contents."""
    if cfg.source.startswith("bundled:"):
        _bundled(cfg.source)  # an unknown name is an error here too
        files: list = [[cfg.source, __version__]]
    elif cfg.source.startswith("hf:"):
        files = [[cfg.source, cfg.hf_config, cfg.hf_split]]
        for pattern in cfg.hf_data_files:
            for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
                st = Path(p).stat()
                files.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    else:
        files = []
        for p in resolve_files(cfg):
            st = p.stat()
            files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    ident = {"files": files, **cfg.model_dump(mode="json", include={
        "source", "format", "text_field", "doc_split", "val_split", "val_fraction", "limit"})}
    return hashlib.sha256(orjson.dumps(ident, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
