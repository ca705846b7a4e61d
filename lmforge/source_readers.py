"""The reading half of `sources`: cut the input into raw blocks, in the main process, cheaply.

The input is first planned as units: a whole file, a Parquet row group, or (when several machines
share the work, `num_parts > 1`) a byte range of a large uncompressed line-based file. Part I of N
takes units I, I+N, I+2N, ... Within a unit, blocks of about `BLOCK_BYTES` are read; each block
carries `pos`, the place reading resumes after it: {"unit": index among this part's units, "offset":
bytes of the (decompressed) file consumed, "line": the next line number, "row": rows consumed}.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import DataConfig
from lmforge.errors import DataError
from lmforge.sources import BLOCK_BYTES, Block, _bundled, _compressed, file_format, open_binary, resolve_files

RANGE_BYTES = 64 << 20  # byte ranges of this size make the units of a large file shared by several parts


@dataclass
class Unit:
    path: Any  # a Path, or the bundled corpus' Traversable
    fmt: str  # "jsonl" | "text" | "parquet"
    start: int = 0  # byte range start, or the Parquet row group
    end: int = -1  # byte range end (-1: to the end of the file)


def _files(cfg: DataConfig) -> list[Any]:
    return [_bundled(cfg.source)] if cfg.source.startswith("bundled:") else resolve_files(cfg)


def plan_units(cfg: DataConfig, num_parts: int = 1) -> list[Unit]:
    units = []
    for path in _files(cfg):
        fmt = file_format(path.name, cfg.format)
        if fmt == "parquet":
            units += [Unit(path, fmt, rg) for rg in range(_parquet(path).metadata.num_row_groups)]
            continue
        line_based = fmt == "jsonl" or cfg.doc_split == "line"
        size = path.stat().st_size if isinstance(path, Path) else 0
        if num_parts > 1 and line_based and not _compressed(path.name) and size > RANGE_BYTES:
            units += [Unit(path, fmt, s, min(s + RANGE_BYTES, size)) for s in range(0, size, RANGE_BYTES)]
        else:
            units.append(Unit(path, fmt))
    return units


def total_bytes(cfg: DataConfig) -> int | None:
    """Input size in the units blocks report (for an ETA); None when it cannot be known cheaply."""
    if cfg.source.startswith(("hf:", "bundled:")) or cfg.limit:
        return None
    total = 0
    for path in _files(cfg):
        if _compressed(path.name):
            return None
        if file_format(path.name, cfg.format) == "parquet":
            meta = _parquet(path).metadata
            total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        else:
            total += path.stat().st_size
    return total


def read_units(cfg: DataConfig, part: int, num_parts: int, resume: dict) -> Iterator[Block]:
    if cfg.source.startswith("hf:"):
        yield from _read_hf(cfg, part, num_parts, resume)
        return
    planned = plan_units(cfg, num_parts)
    units = planned[part::num_parts]
    if not units:
        raise DataError(f"part {part} of {num_parts} has no input: the source splits into only {len(planned)} "
                        "units (files, Parquet row groups, 64 MB ranges); use fewer parts")
    first = resume.get("unit", 0)
    if units[0].fmt == "text" and cfg.doc_split == "file":
        yield from _read_files(units, first)
        return
    for k in range(first, len(units)):
        inner = resume if k == first else {}
        if units[k].fmt == "parquet":
            yield from _read_parquet(units[k], k, cfg, inner)
        else:
            yield from _read_lines(units[k], k, cfg, inner)


def _read_files(units: list[Unit], first: int) -> Iterator[Block]:
    group: list[tuple[str, bytes]] = []
    size = 0
    for k in range(first, len(units)):
        with open_binary(units[k].path) as f:
            raw = _read_all(f, str(units[k].path))
        group.append((str(units[k].path), raw))
        size += len(raw)
        if size >= BLOCK_BYTES or k == len(units) - 1:
            yield Block("files", group, group[0][0], pos={"unit": k + 1}, nbytes=size)
            group, size = [], 0


def _read_all(f: Any, label: str) -> bytes:
    try:
        return f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{label}: cannot read ({err})") from None


def _skip_to(f: Any, offset: int) -> None:
    try:
        f.seek(offset)
    except (OSError, io.UnsupportedOperation):  # a decompressing stream that only reads forward
        while offset > 0:
            offset -= len(f.read(min(offset, BLOCK_BYTES)) or b"x" * offset)


def _to_blank_line(f: Any, data: bytes) -> bytes:
    """Extend `data` (whole lines) so that it ends with a blank line or at the end of the file."""
    parts = [data]
    last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
    while last.strip():
        last = f.readline()
        if not last:
            break
        parts.append(last)
    return b"".join(parts)


def _read_lines(unit: Unit, k: int, cfg: DataConfig, inner: dict) -> Iterator[Block]:
    kind = "jsonl" if unit.fmt == "jsonl" else ("paragraphs" if cfg.doc_split == "paragraph" else "lines")
    label = str(unit.path)
    try:
        with open_binary(unit.path) as f:
            offset, line = inner.get("offset", 0), inner.get("line", 1)
            if offset:
                _skip_to(f, offset)
            elif unit.start:  # a range starts at the first line beginning at or after `start`
                _skip_to(f, unit.start - 1)
                offset, line = unit.start - 1 + len(f.readline()), 0
            while unit.end < 0 or offset < unit.end:
                data = f.read(BLOCK_BYTES)
                if not data:
                    break
                if not data.endswith(b"\n"):
                    data += f.readline()
                if kind == "paragraphs":
                    data = _to_blank_line(f, data)
                if unit.end >= 0 and offset + len(data) > unit.end:  # later lines belong to the next range
                    cut = data.find(b"\n", max(unit.end - offset - 1, 0))
                    data = data if cut == -1 else data[:cut + 1]
                n = data.count(b"\n")
                pos = {"unit": k, "offset": offset + len(data), "line": line + n if line else 0}
                yield Block(kind, data, label, line, offset, pos, len(data))
                offset, line = pos["offset"], pos["line"]
    except (OSError, EOFError) as err:
        raise DataError(f"{label}: cannot read ({err})") from None


def _parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("Parquet sources need pyarrow: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def _parquet_columns(pf: Any, path: Path, cfg: DataConfig) -> list[str]:
    import pyarrow as pa

    schema = pf.schema_arrow
    top = cfg.text_field.split(".")[0]
    if top not in schema.names:
        raise DataError(f"{path}: no column {top!r} (columns: {', '.join(schema.names)}); set data.text_field")
    kind = schema.field(top).type
    texty = pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"
    if "." not in cfg.text_field and not texty:
        raise DataError(f"{path}: column {top!r} holds {kind}, not text; set data.text_field to a string column")
    metas = [m.split(".")[0] for m in cfg.meta_fields]
    return list(dict.fromkeys([top] + [m for m in metas if m in schema.names]))


def _read_parquet(unit: Unit, k: int, cfg: DataConfig, inner: dict) -> Iterator[Block]:
    pf = _parquet(unit.path)
    columns = _parquet_columns(pf, unit.path, cfg)
    meta = pf.metadata
    first_row = sum(meta.row_group(i).num_rows for i in range(unit.start))
    rg = meta.row_group(unit.start)
    per_row = max(rg.total_byte_size // max(rg.num_rows, 1), 1)
    rows_per_block = min(max(BLOCK_BYTES // per_row, 16), 65536)
    done, row = inner.get("row", 0), 0
    for batch in pf.iter_batches(batch_size=rows_per_block, row_groups=[unit.start], columns=columns):
        if row + batch.num_rows <= done:
            row += batch.num_rows
            continue
        if row < done:
            batch, row = batch.slice(done - row), done
        row += batch.num_rows
        yield Block("arrow", batch, str(unit.path), line=first_row + row - batch.num_rows,
                    pos={"unit": k, "row": row}, nbytes=per_row * batch.num_rows)


def _load_hf(cfg: DataConfig) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("hf: sources need the datasets package: pip install datasets") from None
    name = cfg.source.split(":", 1)[1]
    kwargs: dict[str, Any] = {"split": cfg.hf_split, "streaming": True}
    if cfg.hf_data_files:
        kwargs["data_files"] = list(cfg.hf_data_files)
    try:
        return datasets.load_dataset(name, cfg.hf_config or None, **kwargs)
    except Exception as err:  # network, a wrong name/config/split: all surface as different types
        raise DataError(f"data.source: cannot stream Hugging Face dataset {name!r} "
                        f"(config {cfg.hf_config or 'default'}, split {cfg.hf_split}): {err}") from None


def _read_hf(cfg: DataConfig, part: int, num_parts: int, inner: dict) -> Iterator[Block]:
    ds = _load_hf(cfg)
    label = cfg.source
    if num_parts > 1:
        if ds.num_shards < num_parts:
            raise DataError(f"{label} has {ds.num_shards} data files, fewer than --num-parts {num_parts}")
        ds = ds.shard(num_shards=num_parts, index=part)
    done = inner.get("row", 0)
    if done:
        ds = ds.skip(done)
    top = cfg.text_field.split(".")[0]
    keep = list(dict.fromkeys([top] + [m.split(".")[0] for m in cfg.meta_fields]))
    rows: list[dict] = []
    size, row = 0, done
    for example in ds:
        if top not in example:
            raise DataError(f"{label}: row {row}: no field {cfg.text_field!r} "
                            f"(available: {', '.join(example)}); set data.text_field")
        rows.append({key: example.get(key) for key in keep})
        size += len(example[top]) if isinstance(example[top], str) else 64
        row += 1
        if size >= BLOCK_BYTES:
            yield Block("records", rows, label, line=row - len(rows), pos={"unit": 0, "row": row}, nbytes=size)
            rows, size = [], 0
    if rows:
        yield Block("records", rows, label, line=row - len(rows), pos={"unit": 0, "row": row}, nbytes=size)
