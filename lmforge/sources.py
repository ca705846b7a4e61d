"""Where documents come from: the bundled corpus, text files, JSONL; and the train/val split.

`cfg.source` may be `bundled:NAME`, a file, a glob, or a folder (read recursively, sorted). A file is
JSONL when it ends in .jsonl/.jsonl.gz/.jsonl.zst (or `cfg.format = "jsonl"`), text otherwise;
.gz and .zst files are decompressed on the fly.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
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


@dataclass
class Document:
    text: str
    meta: dict = field(default_factory=dict)


def _bundled(source: str) -> Any:
    name = source.split(":", 1)[1]
    if name not in BUNDLED:
        raise DataError(f"data.source: no bundled corpus {name!r}; available: "
                        + ", ".join(f"bundled:{n}" for n in BUNDLED))
    return resources.files("lmforge.data") / BUNDLED[name]


def resolve_files(cfg: DataConfig) -> list[Path]:
    """The files a (non-bundled) source names, in reading order."""
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


@contextlib.contextmanager
def _open_text(path: Path | Any) -> Iterator[IO[str]]:
    with path.open("rb") as f:
        raw: IO[bytes] = f
        if path.name.endswith(".gz"):
            raw = gzip.GzipFile(fileobj=f)
        elif path.name.endswith(".zst"):
            import zstandard

            raw = zstandard.ZstdDecompressor().stream_reader(f)
        # newline="" keeps "\r\n" as written, so documents hold exactly the file's characters.
        with io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
            yield text


def _is_jsonl(path_name: str, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "jsonl"
    base = path_name.removesuffix(".gz").removesuffix(".zst")
    return base.endswith(".jsonl")


def _text_docs(path: Path | Any, cfg: DataConfig) -> Iterator[Document]:
    label = str(path)
    try:
        with _open_text(path) as f:
            if cfg.doc_split == "file":
                text = f.read()
                if text:
                    yield Document(text, {"path": label})
            elif cfg.doc_split == "line":
                for n, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield Document(line, {"path": label, "line": n})
            else:
                yield from _paragraphs(f, label)
    except UnicodeDecodeError as err:
        raise DataError(f"{label}: not UTF-8 text ({err.reason} near byte {err.start})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{label}: cannot read ({err})") from None


def _paragraphs(f: IO[str], label: str) -> Iterator[Document]:
    """Blank-line separated blocks, streamed so a large file never sits in memory whole."""
    block: list[str] = []
    start = 1
    for n, line in enumerate(f, 1):
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield Document("".join(block).rstrip("\r\n"), {"path": label, "line": start})
            block = []
    if block:
        yield Document("".join(block).rstrip("\r\n"), {"path": label, "line": start})


def _field(obj: Any, dotted: str, where: str) -> str:
    node = obj
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            keys = ", ".join(map(str, node)) if isinstance(node, dict) else type(node).__name__
            raise DataError(f"{where}: no field {dotted!r} (at {part!r}; available: {keys or 'none'});"
                            " set data.text_field")
    if isinstance(node, list) and all(isinstance(x, str) for x in node):
        return "\n\n".join(node)
    if not isinstance(node, str):
        raise DataError(f"{where}: field {dotted!r} is a {type(node).__name__}, expected text")
    return node


def _jsonl_docs(path: Path, cfg: DataConfig) -> Iterator[Document]:
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not valid JSON ({err})") from None
                text = _field(obj, cfg.text_field, f"{path}:{n}")
                if text:
                    yield Document(text, {"path": str(path), "line": n})
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} near byte {err.start})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every non-empty document of the source, in a stable order. An empty corpus is an error."""
    if cfg.source.startswith("bundled:"):
        files: list[Any] = [_bundled(cfg.source)]
    else:
        files = resolve_files(cfg)
    empty = True
    for path in files:
        docs = _jsonl_docs(path, cfg) if _is_jsonl(path.name, cfg.format) else _text_docs(path, cfg)
        for doc in docs:
            empty = False
            yield doc
    if empty:
        raise DataError(f"data.source: {cfg.source} holds no text")


def _in_val(text: str, fraction: float) -> bool:
    # A stable hash, not Python's salted hash(), so the split is the same on every run and machine.
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def iter_split(cfg: DataConfig, split: Literal["train", "val"]) -> Iterator[str]:
    """Document texts of one split.

    `tail`: the whole corpus as one character stream, cut at int(total * (1 - val_fraction)) as
    nanoGPT does; the document straddling the cut is cut too. `hash`: by a hash of each text.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if cfg.val_split == "hash":
        for doc in iter_documents(cfg):
            if _in_val(doc.text, cfg.val_fraction) == (split == "val"):
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
    else:
        files = []
        for p in resolve_files(cfg):
            st = p.stat()
            files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    ident = {"files": files, **cfg.model_dump(mode="json", include={
        "source", "format", "text_field", "doc_split", "val_split", "val_fraction"})}
    return hashlib.sha256(orjson.dumps(ident, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
