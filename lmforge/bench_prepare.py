"""`lmforge bench prepare`: throughput of the prepare pass against raw encoding of the same text.

A FineWeb-like JSONL corpus (text, url, language_score) is generated from the bundled Shakespeare:
documents of random runs of lines, with some exact duplicates and some junk for the filters to drop.
Then: raw `Tokenizer.encode` of every text in 1 and 2 processes (texts already in memory, only the
encoding timed), and `prepare` with 1 and 2 workers (read, parse, clean, filter, dedup, tokenize,
write shards and compressed docs). Throughputs are in MB of document text (UTF-8) per second.
"""

from __future__ import annotations

import gzip
import math
import multiprocessing as mp
import random
import resource
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from lmforge.bench_table import fastest_rounds
from lmforge.bench_tokenizer import machine_info
from lmforge.config import Recipe
from lmforge.fsutil import atomic_path, atomic_write_json, read_json

PREPARE = {"min_chars": 200, "max_chars": 200_000, "min_alpha_frac": 0.5, "max_line_chars": 20_000,
           "max_dup_line_frac": 0.5, "meta_filters": ["language_score >= 0.65"], "dedup": "exact", "write_docs": False}


CORPUS_VERSION = 2
"""Bumped when the generated corpus changes, so a cached one is made again."""


def make_corpus(path: Path, mbytes: float, seed: int = 0) -> dict:
    """Write about `mbytes` MB of JSONL; returns {"docs", "text_bytes", "file_bytes"} (cached beside it).

    Document lengths follow a log-normal law like web text's: median about 1.8 KB, mean about 2.7 KB
    (FineWeb's documents average roughly 3 KB). Length matters here: the per-document work of the
    pipeline is a fixed cost, encoding is paid per byte."""
    info_path = path.with_suffix(".info.json")
    if path.is_file() and info_path.is_file():
        cached = read_json(info_path)
        if cached.get("mbytes") == mbytes and cached.get("version") == CORPUS_VERSION:
            return cached
    base = gzip.decompress((resources.files("lmforge.data") / "tinyshakespeare.txt.gz").read_bytes())
    lines = [x for x in base.decode("utf-8").split("\n") if x.strip()]
    rng = random.Random(seed)
    target, docs, text_bytes, recent = int(mbytes * 1e6), 0, 0, []
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        written = 0
        while written < target:
            if recent and rng.random() < 0.02:
                text = rng.choice(recent)  # an exact duplicate of a recent document
            elif rng.random() < 0.02:
                text = "@@ " * rng.randint(5, 80)  # junk: too short, or no letters
            else:
                n = min(len(lines) // 2, max(4, int(rng.lognormvariate(math.log(50), 0.9))))
                start = rng.randrange(len(lines) - n)
                text = "\n".join(lines[start:start + n]) + "\n\n" + " ".join(rng.sample(lines, 4))
                recent = (recent + [text])[-100:]
            score = round(rng.random() * 0.4 + 0.6, 3)
            row = {"text": text, "url": f"https://example.org/{docs}", "language_score": score}
            line = orjson.dumps(row) + b"\n"
            f.write(line)
            written += len(line)
            docs += 1
            text_bytes += len(text.encode("utf-8"))
    info = {"mbytes": mbytes, "version": CORPUS_VERSION, "docs": docs, "text_bytes": text_bytes,
            "file_bytes": path.stat().st_size}
    atomic_write_json(info_path, info)
    return info


def _encode_part(args: tuple) -> dict:
    path, k, n, tok, barrier = args
    with open(path, "rb") as f:
        texts = [orjson.loads(line)["text"] for i, line in enumerate(f) if i % n == k]
    if barrier is not None:
        barrier.wait()  # every process starts encoding together
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = sum(len(tok.encode(t)) for t in texts)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "tokens": tokens,
            "bytes": sum(len(t.encode()) for t in texts)}


def raw_encode(path: Path, tok: Any, procs: int) -> dict:
    ctx = mp.get_context("fork")  # in child processes, so the benchmark process itself stays small
    barrier = ctx.Manager().Barrier(procs) if procs > 1 else None
    with ctx.Pool(procs) as pool:
        parts = pool.map(_encode_part, [(path, k, procs, tok, barrier) for k in range(procs)])
    seconds, cpu = max(p["seconds"] for p in parts), sum(p["cpu"] for p in parts)
    nbytes, tokens = sum(p["bytes"] for p in parts), sum(p["tokens"] for p in parts)
    return {"name": f"raw encode, {procs} process{'es' if procs > 1 else ''}", "seconds": round(seconds, 3),
            "mb_per_s": round(nbytes / 1e6 / seconds, 2), "tokens_per_s": round(tokens / seconds), "tokens": tokens,
            "cpu_seconds": round(cpu, 3), "mb_per_cpu_s": round(nbytes / 1e6 / cpu, 2)}


MINIMAL = {"dedup": "exact", "write_docs": False}  # normalization and exact dedup only: the pipeline's floor


def _recipe(dir: Path, corpus: Path, vocab_size: int, workers: int, docs: bool = False,
            filters: bool = True) -> Recipe:
    return Recipe.model_validate({
        "name": "bench-prepare",
        "data": {"source": str(corpus), "meta_fields": ["url", "language_score"], "val_fraction": 0.01,
                 "shards_dir": str(dir / f"shards_w{workers}"), "workers": workers, "shard_tokens": 20_000_000},
        "tokenizer": {"dir": str(dir / "tokenizer"), "vocab_size": vocab_size, "max_train_chars": 10_000_000},
        "prepare": {"enabled": True, "out_dir": str(dir / f"prepared_w{workers}"), **(PREPARE if filters else MINIMAL),
                    "write_docs": docs},
    })


def bench_prepare(mbytes: float = 200.0, vocab_size: int = 32768, workers: list[int] | None = None,
                  dir: Path = Path("runs/bench_prepare"), log: Callable[[str], object] = print,
                  filters: bool = True, repeats: int = 3) -> dict:
    """Every configuration in `repeats` interleaved rounds, each keeping its fastest (`fastest_rounds`)."""
    from lmforge.prepare import run_prepare
    from lmforge.tokenizer import ensure_tokenizer

    dir.mkdir(parents=True, exist_ok=True)
    corpus = dir / "corpus.jsonl"
    info = make_corpus(corpus, mbytes)
    log(f"corpus: {corpus} ({info['file_bytes'] / 1e6:.0f} MB JSONL, {info['text_bytes'] / 1e6:.0f} MB text, "
        f"{info['docs']:,} docs)")
    tok = ensure_tokenizer(_recipe(dir, corpus, vocab_size, 1), log=log)
    runs = [(w, False) for w in workers or [1, 2]] + [(max(workers or [2]), True)]

    def prepare(w: int, docs: bool) -> dict:
        recipe = _recipe(dir, corpus, vocab_size, w, docs, filters)
        for d in (recipe.data.shards_dir, recipe.prepare.out_dir):
            shutil.rmtree(d, ignore_errors=True)
        return _prepare_row(_isolated(run_prepare, recipe, tok), info, w, docs)

    jobs = [lambda procs=procs: raw_encode(corpus, tok, procs) for procs in sorted({1, *(workers or [1, 2])})]
    jobs += [lambda w=w, docs=docs: prepare(w, docs) for w, docs in runs]
    results = fastest_rounds(jobs, repeats, lambda k, row: log(
        f"round {k}/{repeats} {row['name']}: {row['mb_per_s']:.1f} MB/s"))
    by = {r["name"]: r["mb_per_s"] for r in results}
    summary = {}
    if "prepare, 1 worker" in by and "prepare, 2 workers" in by:
        summary["speedup_1_to_2_workers"] = round(by["prepare, 2 workers"] / by["prepare, 1 worker"], 3)
    if "raw encode, 2 processes" in by and "prepare, 2 workers" in by:
        summary["prepare_2_vs_raw_2"] = round(by["prepare, 2 workers"] / by["raw encode, 2 processes"], 3)
    cpu = {r["name"]: r["mb_per_cpu_s"] for r in results}
    if "raw encode, 1 process" in cpu and "prepare, 2 workers" in cpu:
        # on a machine shared with other work, CPU time says what wall time cannot: the cost per MB
        summary["cpu_efficiency_prepare_2_vs_raw"] = round(cpu["prepare, 2 workers"] / cpu["raw encode, 1 process"], 3)
    return {"machine": machine_info(), "settings": {"mbytes": mbytes, "vocab_size": vocab_size, "repeats": repeats,
                                                    **info, "prepare": PREPARE if filters else MINIMAL},
            "results": results, "summary": summary}


def _prepare_row(stats: dict, info: dict, w: int, docs: bool) -> dict:
    tokens = stats["tokens"]["train"] + stats["tokens"]["val"]
    cpu = stats["cpu_seconds"]
    return {"name": f"prepare, {w} worker{'s' if w > 1 else ''}{' + docs' if docs else ''}",
            "seconds": stats["seconds"], "mb_per_s": round(info["text_bytes"] / 1e6 / stats["seconds"], 2),
            "input_mb_per_s": stats["mb_per_s"], "tokens_per_s": round(tokens / stats["seconds"]),
            "docs_in": stats["docs_in"], "docs_out": sum(stats["docs_out"].values()),
            "duplicates": stats["duplicates"]["exact"], "peak_rss_mb": stats["peak_rss_mb"],
            "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
            "mb_per_cpu_s": round(info["text_bytes"] / 1e6 / sum(cpu.values()), 2)}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _run_in_child(conn: Any, fn: Callable, *args: Any) -> None:
    before = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    out = fn(*args, log=lambda *_: None)
    out["cpu_seconds"] = {"main": _cpu(resource.RUSAGE_SELF) - before[0],
                          "workers": _cpu(resource.RUSAGE_CHILDREN) - before[1]}
    conn.send(out)


def _isolated(fn: Callable, *args: Any) -> dict:
    """Run in a fresh (spawned) process, so that its peak memory is its own and not the benchmark's."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_run_in_child, args=(child, fn, *args))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


def print_prepare_table(result: dict) -> None:
    from lmforge.bench_table import show_table

    def rss(r: dict) -> str:
        m = r.get("peak_rss_mb")
        return f"{m['main']:.0f} main / {m['workers']:.0f} worker" if m else ""

    s = result["settings"]
    console = show_table(
        f"prepare bench: {s['text_bytes'] / 1e6:.0f} MB of text, {s['docs']:,} docs, vocab {s['vocab_size']}",
        ("name", "seconds", "text MB/s", "MB/CPU-s", "tokens/s", "peak RSS MB"),
        [(r["name"], f"{r['seconds']:.2f}", f"{r['mb_per_s']:.2f}", f"{r['mb_per_cpu_s']:.2f}",
          f"{r['tokens_per_s']:,}", rss(r)) for r in result["results"]])
    for k, v in result["summary"].items():
        console.print(f"{k}: {v}")
