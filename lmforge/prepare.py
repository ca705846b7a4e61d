"""`lmforge prepare`: raw documents → cleaned, filtered, deduplicated, tokenized shards in one pass.

The main process reads raw blocks (`sources.iter_blocks`), hands them to worker processes that parse,
clean, filter and tokenize (`process_block`), takes the results back in input order, deduplicates
(`dedup.KeySet`, bounded memory), splits train/val by a hash of each document, and writes.

Output comes in segments. Segment k writes `{shards_dir}/{split}_{k:06d}.bin`, the cleaned documents
`{out_dir}/docs/{split}_{k:06d}.jsonl.zst` and, last, `{out_dir}/state/segment_{k:06d}.json` with the
reading position, its counts and (beside it, `.npz`) the dedup keys it added. A segment ends after the
block that brings its train tokens to `data.shard_tokens`. A rerun with the same inputs and settings
keeps recorded segments untouched, replays their dedup keys and reads on from the recorded position,
so an interrupted run ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from lmforge import __version__
from lmforge.clean import build_filters, dedup_key, lsh_params, minhash_bands, normalize, strip_wiki
from lmforge.config import PrepareConfig, Recipe
from lmforge.dedup import KeySet
from lmforge.errors import DataError
from lmforge.fsutil import atomic_write_json, read_json
from lmforge.prepare_io import DocsWriter, Segment, export_windows, load_segments, remove_stale, summarize
from lmforge.shards import CHUNK_CHARS, _run, data_config_hash, dtype_for
from lmforge.sources import Block, ReadStats, iter_blocks, parse_block, source_fingerprint
from lmforge.tokenizer import Tokenizer

SPLITS = ("train", "val")


# ---- worker side ----------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def init_worker(recipe: Recipe, tok: Tokenizer) -> None:
    if os.getpid() != _W.get("main_pid"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process' to handle
    p = recipe.prepare
    bands = lsh_params(p.minhash_threshold, p.minhash_perms) if p.dedup == "minhash" else None
    _W.update(recipe=recipe, tok=tok, filters=build_filters(p), bands=bands)


def clean_text(text: str, p: PrepareConfig) -> str:
    if p.strip_wiki:
        text = strip_wiki(text)
    return normalize(text) if p.normalize else text


def _rejected(text: str, meta: dict, filters: list) -> str | None:
    if not text:
        return "empty_after_cleaning"
    for name, keep in filters:
        if not keep(text, meta):
            return name
    return None


def _encode(tok: Tokenizer, text: str) -> np.ndarray:
    if len(text) <= CHUNK_CHARS:
        return tok.encode_array(text)
    # bounded memory for a 100 MB single line: pieces whose encodings concatenate to the whole's
    return np.concatenate([tok.encode_array(piece) for piece in tok.chunk_text(text, CHUNK_CHARS)])


def process_block(block: Block) -> dict:
    """Parse, clean, filter and tokenize one block; return arrays for the kept documents + counts."""
    recipe, tok = _W["recipe"], _W["tok"]
    cfg, p = recipe.data, recipe.prepare
    stats, dropped = ReadStats(), Counter()
    bos = np.array([tok.bos_id] if recipe.tokenizer.add_bos and tok.bos_id is not None else [], np.uint32)
    eos = np.array([tok.eos_id], np.uint32)
    parts: list[np.ndarray] = []
    lengths, keys, nbytes, lines, bands = [], [], [], [], []
    docs_in = chars_in = copies = 0
    # an exact copy of a document kept earlier in this block is dropped here, before it is encoded:
    # the main process would drop it anyway (it dedups in input order), and encoding is the cost
    seen: set[int] | None = set() if p.dedup != "none" else None
    for doc in parse_block(block, cfg, None if p.strict else stats):
        docs_in += 1
        chars_in += len(doc.text)
        text = clean_text(doc.text, p)
        reason = _rejected(text, doc.meta, _W["filters"])
        if reason is None:
            key = dedup_key(text)
            if seen is not None and key in seen:
                copies += 1
                continue
            ids = _encode(tok, text)
            reason = "min_tokens" if len(ids) < p.min_tokens else None
        if reason is not None:
            dropped[reason] += 1
            continue
        if seen is not None:
            seen.add(key)
        parts += (bos, ids, eos)
        lengths.append(len(bos) + len(ids) + 1)
        keys.append(key)
        nbytes.append(len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass")))
        if p.write_docs:
            lines.append(orjson.dumps({"text": text, **{k: doc.meta.get(k) for k in cfg.meta_fields}}) + b"\n")
        if _W["bands"]:
            b, r = _W["bands"]
            bands.append(minhash_bands(text, p.minhash_perms, b, r, p.minhash_ngram))
    counts = {"docs_in": docs_in, "chars_in": chars_in, "bytes_in": block.nbytes, "malformed": stats.malformed,
              "utf8_replaced": stats.utf8_replaced, "empty": stats.empty,
              "dup_exact": copies, **{f"drop:{k}": v for k, v in dropped.items()}}
    tokens = np.concatenate(parts) if parts else np.empty(0, np.uint32)
    # one buffer and its line ends, not a list: a list of small bytes objects costs more to pass around
    line_ends = np.cumsum(np.fromiter(map(len, lines), np.int64, len(lines)))
    return {"tokens": tokens.astype(dtype_for(tok.vocab_size)), "lengths": np.array(lengths, np.int64),
            "keys": np.array(keys, np.uint64), "nbytes": np.array(nbytes, np.int64), "lines": b"".join(lines),
            "line_ends": line_ends,
            "bands": np.array(bands, np.uint64).reshape(len(keys), _W["bands"][0] if _W["bands"] else 0),
            "counts": counts, "malformed_at": stats.malformed_at, "pos": block.pos}


# ---- main side ------------------------------------------------------------------------------------
def identity(recipe: Recipe, tok: Tokenizer) -> str:
    """What the output depends on: the source files, the settings and the tokenizer."""
    import hashlib

    ident = [source_fingerprint(recipe.data), data_config_hash(recipe), tok.fingerprint,
             recipe.prepare.part, recipe.prepare.num_parts]
    return hashlib.sha256(orjson.dumps(ident)).hexdigest()[:16]


def docs_identity(recipe: Recipe) -> str:
    """What the cleaned documents depend on (the tokenizer only through `min_tokens`)."""
    import hashlib

    ident = [source_fingerprint(recipe.data), data_config_hash(recipe)]
    return hashlib.sha256(orjson.dumps(ident)).hexdigest()[:16]


def _tables(p: PrepareConfig) -> dict[str, KeySet]:
    budget = p.dedup_max_mb << 20
    if p.dedup == "none":
        return {}
    if p.dedup == "exact":
        return {"exact": KeySet(budget)}
    return {"exact": KeySet(budget // 4), "near": KeySet(budget - budget // 4)}


def _pool(recipe: Recipe, tok: Tokenizer, workers: int) -> Any:
    import multiprocessing as mp
    import sys

    _W["main_pid"] = os.getpid()
    if workers <= 1:
        init_worker(recipe, tok)
        return None
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ctx.Pool(workers, initializer=init_worker, initargs=(recipe, tok))


def _progress(total: int | None) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("prepare"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.fields[total_mb]} MB"),
                    TextColumn("{task.fields[docs_s]:,.0f} docs/s {task.fields[mb_s]:.1f} MB/s"),
                    TextColumn("kept {task.fields[kept]:,} dropped {task.fields[dropped]:,}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    disable=not console.is_terminal, transient=True)


def _results(recipe: Recipe, tok: Tokenizer, resume: dict | None, main_stats: ReadStats) -> Iterator[dict]:
    cfg, p = recipe.data, recipe.prepare
    workers = cfg.workers or os.cpu_count() or 1
    pool = _pool(recipe, tok, workers)
    blocks = iter_blocks(cfg, part=p.part, num_parts=p.num_parts, resume=resume, stats=main_stats)
    try:
        yield from _run(blocks, pool, 2 * workers, process_block)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def run_prepare(recipe: Recipe, tok: Tokenizer, log: Callable[[str], object] = print) -> dict:
    """The whole pass (resuming a matching interrupted one); returns the stats also in stats.json."""
    cfg, p = recipe.data, recipe.prepare
    out, shards = Path(p.out_dir), Path(cfg.shards_dir)
    if tok.eos_id is None:
        raise DataError("the tokenizer has no end-of-document token (expected one of <|eos|>, </s>, <|endoftext|>)")
    ident = identity(recipe, tok)
    for path in (shards / "manifest.json", out / "manifest.json"):
        path.unlink(missing_ok=True)  # from here on neither directory counts as finished
    done = load_segments(out, shards, ident)
    if done:
        log(f"prepare: resuming after {len(done)} completed segment(s) in {out}")
    tables = _tables(p)
    for rec in done:
        with np.load(out / "state" / rec["keys"]) as saved:
            for name, table in tables.items():
                table.replay(saved[name])
    main_stats = ReadStats()
    t0 = time.perf_counter()
    first_new = len(done)
    _drive(recipe, tok, ident, done, tables, main_stats, log)
    stats = summarize(recipe, tok, done, tables, main_stats, time.perf_counter() - t0, first_new,
                      workers=cfg.workers or os.cpu_count() or 1)
    _finish(recipe, tok, done, stats, log)
    return stats


def _drive(recipe: Recipe, tok: Tokenizer, ident: str, done: list[dict], tables: dict, main_stats: ReadStats,
           log: Callable) -> None:
    from lmforge.source_readers import total_bytes

    cfg = recipe.data
    total = None if recipe.prepare.num_parts > 1 else total_bytes(cfg)
    seen_mb = sum(r["counts"].get("bytes_in", 0) for r in done) / 1e6
    seg = Segment(len(done), recipe, tok, ident, tables)
    t0, c = time.perf_counter(), Counter()  # this run's totals, for the progress line
    with _progress(total) as progress:
        task = progress.add_task("prepare", total=total / 1e6 if total else None, completed=seen_mb,
                                 total_mb=f"{total / 1e6:,.0f}" if total else "?", docs_s=0.0, mb_s=0.0,
                                 kept=0, dropped=0)
        try:
            for res in _results(recipe, tok, done[-1]["pos"] if done else None, main_stats):
                c.update(kept=seg.add(res), docs_in=res["counts"]["docs_in"], bytes_in=res["counts"]["bytes_in"])
                if seg.train_tokens >= cfg.shard_tokens:
                    done.append(seg.close())
                    seg = Segment(len(done), recipe, tok, ident, tables)
                dt = max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=seen_mb + c["bytes_in"] / 1e6, docs_s=c["docs_in"] / dt,
                                mb_s=c["bytes_in"] / 1e6 / dt, kept=c["kept"], dropped=c["docs_in"] - c["kept"])
            if seg.pos or not done:  # the tail, even with nothing kept: its counts and position count
                done.append(seg.close())
        except BaseException as err:
            seg.abort(err)
            raise


def _finish(recipe: Recipe, tok: Tokenizer, done: list[dict], stats: dict, log: Callable) -> None:
    from lmforge.shards import VERSION, tokenizer_config_hash

    cfg, p = recipe.data, recipe.prepare
    out, shards = Path(p.out_dir), Path(cfg.shards_dir)
    splits = {s: {"files": [r["files"][s] for r in done if s in r["files"]], "docs": stats["docs_out"][s],
                  "tokens": stats["tokens"][s], "source_bytes": stats["bytes_out"][s],
                  "bytes_per_token": stats["bytes_per_token"][s]} for s in SPLITS}
    if splits["train"]["tokens"] == 0:
        raise DataError(f"data.source: {cfg.source} gave no training text after cleaning and filtering "
                        f"(see {out / 'stats.json'})")
    atomic_write_json(out / "stats.json", stats)
    atomic_write_json(out / "manifest.json", {
        "format": "lmforge-docs", "version": 1, "docs_identity": docs_identity(recipe),
        "splits": {s: [r["docs"][s] for r in done if s in r["docs"]] for s in SPLITS}})
    remove_stale(shards, out, splits, done)
    manifest = {
        "format": "lmforge-shards", "version": VERSION, "dtype": dtype_for(tok.vocab_size).name,
        "vocab_size": tok.vocab_size, "add_bos": recipe.tokenizer.add_bos and tok.bos_id is not None,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "tokenizer": {"fingerprint": tok.fingerprint, "kind": tok.kind, "dir": recipe.tokenizer.dir,
                      "name": recipe.tokenizer.pretrained or tok.kind,
                      "config_hash": tokenizer_config_hash(recipe.tokenizer)},
        "data_config_hash": data_config_hash(recipe), "source": cfg.source,
        "source_fingerprint": source_fingerprint(cfg), "splits": splits,
        "prepare": {"stats": str(out / "stats.json"), "part": p.part, "num_parts": p.num_parts},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lmforge_version": __version__}
    atomic_write_json(shards / "manifest.json", manifest)
    if p.window:
        manifest["windows"] = {s: export_windows(shards, s, p.window, p.stride or p.window)
                               for s in SPLITS if splits[s]["tokens"] >= p.window}
        atomic_write_json(shards / "manifest.json", manifest)
    log(f"prepare: {stats['docs_in']:,} docs in -> train {stats['docs_out']['train']:,} / val "
        f"{stats['docs_out']['val']:,} kept; {stats['dropped_by_filters']:,} filtered, "
        f"{stats['duplicates']['exact'] + stats['duplicates']['near']:,} duplicates; "
        f"{stats['tokens']['train'] + stats['tokens']['val']:,} tokens "
        f"({stats['bytes_per_token']['all']:.2f} bytes/token); {stats['mb_in']:.1f} MB in {stats['seconds']:.1f}s "
        f"({stats['mb_per_s']:.1f} MB/s, {stats['workers']} workers, peak RSS {stats['peak_rss_mb']['main']:.0f} MB "
        f"main / {stats['peak_rss_mb']['workers']:.0f} MB worker) -> {shards}")


def peak_rss_mb() -> dict:
    return {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# ---- other stages reading what prepare made ---------------------------------------------------------
def prepared_docs_ok(recipe: Recipe) -> bool:
    path = Path(recipe.prepare.out_dir) / "manifest.json"
    if not recipe.prepare.write_docs:
        return False
    try:
        m = read_json(path)
        return m.get("docs_identity") == docs_identity(recipe) and bool(m["splits"]["train"]) and all(
            (Path(recipe.prepare.out_dir) / "docs" / f["name"]).is_file() for fs in m["splits"].values() for f in fs)
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return False


def iter_prepared(recipe: Recipe, split: str) -> Iterator[str]:
    """The cleaned texts of one split, as `prepare` kept them."""
    out = Path(recipe.prepare.out_dir)
    for entry in read_json(out / "manifest.json")["splits"][split]:
        yield from DocsWriter.read(out / "docs" / entry["name"])


def training_fingerprint(recipe: Recipe) -> str:
    """What a BPE trained for this recipe depends on: the source, and the cleaning when prepare is on."""
    import hashlib

    if not recipe.prepare.enabled:
        return source_fingerprint(recipe.data)
    cleaning = recipe.prepare.model_dump(mode="json", exclude={
        "enabled", "out_dir", "strict", "part", "num_parts", "window", "stride", "write_docs", "min_tokens"})
    digest = hashlib.sha256(orjson.dumps(cleaning, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return f"{source_fingerprint(recipe.data)}-{digest}"


def training_texts(recipe: Recipe) -> Iterator[str]:
    """The train split a BPE learns from: the kept documents when prepare has run, else a cleaned read."""
    from lmforge.sources import iter_split

    if not recipe.prepare.enabled:
        return iter_split(recipe.data, "train")
    return iter_prepared(recipe, "train") if prepared_docs_ok(recipe) else sample_texts(recipe)


def sample_texts(recipe: Recipe) -> Iterator[str]:
    """Cleaned, filtered, deduplicated train-split texts read serially: what a BPE is trained on
    before the parallel pass (set tokenizer.max_train_chars to bound it on a large corpus)."""
    p = recipe.prepare
    filters = build_filters(p)
    seen: set[int] = set()
    cut = int(recipe.data.val_fraction * 2**64)
    stats = ReadStats()
    for block in iter_blocks(recipe.data, stats=stats):
        for doc in parse_block(block, recipe.data, None if p.strict else stats):
            text = clean_text(doc.text, p)
            if _rejected(text, doc.meta, filters) is None:
                key = dedup_key(text)
                if key not in seen and key >= cut:
                    seen.add(key)
                    yield text


def ensure_prepared(recipe: Recipe, tok: Tokenizer, log: Callable[[str], object] = print) -> Path:
    """Shards for a recipe with `[prepare] enabled`: re-tokenize kept documents when only the tokenizer
    changed, else run (or resume) the whole pass."""
    from lmforge.shards import tokenize_to_shards

    if prepared_docs_ok(recipe) and recipe.prepare.min_tokens == 0:
        log(f"prepare: documents in {recipe.prepare.out_dir} are up to date; tokenizing them")
        return tokenize_to_shards(recipe, tok, log=log, texts=lambda split: iter_prepared(recipe, split))
    run_prepare(recipe, tok, log)
    return Path(recipe.data.shards_dir)


def prepare_recipe(recipe: Recipe, log: Callable[[str], object] = print) -> Path:
    """`lmforge prepare`: the tokenizer (trained on cleaned text for a BPE), then the pass itself,
    unless the shards are already up to date."""
    from lmforge.shards import ensure_shards
    from lmforge.tokenizer import ensure_tokenizer

    recipe.prepare.enabled = True
    return ensure_shards(recipe, ensure_tokenizer(recipe, log=log), log=log)
