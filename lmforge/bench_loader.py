"""`lmforge bench loader`: the streaming loaders and the memmap loader on one generated JSONL corpus.

The corpus is the bundled text cut into documents of a few paragraphs, repeated in shuffled orders up to
`mbytes`. All loaders use one lmforge BPE tokenizer trained on the corpus; the memmap loader reads shards
tokenized from the same corpus. Each streaming loader's first batch (process start, first chunk) is timed
apart as `startup_s`; the table times the batches after it. nanoGPT's `get_batch` (a memmap reopened per
batch, rows stacked one by one) is timed on the same shard as a reference. Last, the consumer-side wait
per batch is measured while the consumer sleeps `step_ms` per batch, as a training step would.
"""

from __future__ import annotations

import gzip
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from lmforge.config import Recipe

STREAMING = ("naive", "workers", "ring")


def make_corpus(path: Path, mbytes: float, seed: int = 0) -> int:
    """Write about `mbytes` MB of JSONL documents ({"id", "text"}) made of the bundled text."""
    text = gzip.decompress((resources.files("lmforge.data") / "tinyshakespeare.txt.gz").read_bytes()).decode()
    paras = [p for p in text.split("\n\n") if p.strip()]
    docs, cur = [], []
    for p in paras:  # documents of about 3 KB
        cur.append(p)
        if sum(map(len, cur)) > 3000:
            docs.append("\n\n".join(cur))
            cur = []
    rng = np.random.default_rng(seed)
    target, size, i = int(mbytes * 1e6), 0, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        while size < target:
            for j in rng.permutation(len(docs)):
                line = orjson.dumps({"id": i, "text": docs[j]}) + b"\n"
                f.write(line)
                size, i = size + len(line), i + 1
    return size


def _timed(it: Any, n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(n):
        x, _y = next(it)
        tokens += x.numel()
    return time.perf_counter() - t0, tokens


def _row(name: str, n: int, tokens: int, seconds: float, **extra: Any) -> dict:
    return {"name": name, "batches": n, "tokens": tokens, "seconds": round(seconds, 4),
            "batches_per_s": round(n / seconds, 2), "tokens_per_s": round(tokens / seconds), **extra}


def nanogpt_get_batch(path: Path, dtype: str, offset: int, batch_size: int, block_size: int) -> Callable:
    """nanoGPT's `get_batch` (train.py) as it is, reading one shard body."""
    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(path, dtype=dtype, mode="r", offset=offset)  # recreated every batch, as there
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
        return x, y
    return get_batch


def _recipe(work: Path, corpus: Path, vocab_size: int, workers: int, slots: int) -> Recipe:
    return Recipe.model_validate({
        "data": {"source": str(corpus), "val_fraction": 0.005, "workers": workers,
                 "shards_dir": str(work / "shards"), "loader_workers": workers, "loader_slots": slots},
        "tokenizer": {"dir": str(work / "tokenizer"), "vocab_size": vocab_size, "max_train_chars": 3_000_000}})


def _consumer_wait(recipe: Recipe, tok: Any, kind: str, b: int, t: int, n: int, step_ms: float) -> dict:
    from lmforge.loaders import streaming_loader

    with streaming_loader(recipe, "train", tok, batch_size=b, seq_len=t, seed=1, kind=kind) as loader:
        next(loader)
        waits = []
        for _ in range(n):
            time.sleep(step_ms / 1000)  # the training step the loader should hide behind
            t0 = time.perf_counter()
            next(loader)
            waits.append((time.perf_counter() - t0) * 1000)
    waits.sort()
    return {"name": kind, "step_ms": step_ms, "batches": n, "median_ms": round(statistics.median(waits), 3),
            "p90_ms": round(waits[int(0.9 * (n - 1))], 3), "max_ms": round(waits[-1], 3)}


def _cpu() -> float:
    """CPU seconds of this process and of its children reaped so far (the loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _bench_streaming(recipe: Recipe, tok: Any, kind: str, b: int, t: int, batches: int) -> dict:
    from lmforge.loaders import streaming_loader

    load, cpu0 = os.getloadavg()[0], _cpu()
    with streaming_loader(recipe, "train", tok, batch_size=b, seq_len=t, seed=0, kind=kind) as loader:
        t0 = time.perf_counter()
        next(loader)
        startup = time.perf_counter() - t0
        seconds, tokens = _timed(loader, batches)
    # CPU over the loader's life (start-up and batches made ahead included): tokens per CPU second show
    # the cost per token whatever else the machine was busy with
    return _row(kind, batches, tokens, seconds, startup_s=round(startup, 3), cpu_s=round(_cpu() - cpu0, 3),
                load_avg_1m=round(load, 2))


def _bench_memmap(shards: Path, b: int, t: int, batches: int) -> list[dict]:
    from lmforge.loaders.memmap import MemmapLoader
    from lmforge.shards import HEADER_BYTES, load_manifest

    with MemmapLoader(shards, "train", b, t, seed=0) as loader:
        it = iter(loader)
        _timed(it, 20)
        cpu0 = _cpu()
        seconds, tokens = _timed(it, batches)
        rows = [_row("memmap", batches, tokens, seconds, cpu_s=round(_cpu() - cpu0, 3))]
    m = load_manifest(shards)
    first = m["splits"]["train"]["files"][0]
    get_batch = nanogpt_get_batch(shards / first["name"], m["dtype"], HEADER_BYTES, b, t)
    n_ref = max(1, batches // 5)
    torch.manual_seed(0)
    cpu0 = _cpu()
    seconds, tokens = _timed(iter(get_batch, None), n_ref)
    return rows + [_row("nanogpt get_batch (reference)", n_ref, tokens, seconds, cpu_s=round(_cpu() - cpu0, 3))]


def bench_loader(*, mbytes: float = 64.0, batch_size: int = 32, seq_len: int = 1024, batches: int = 500,
                 vocab_size: int = 16384, workers: int = 2, slots: int = 4, step_ms: float = 50.0,
                 wait_batches: int = 40, memmap_batches: int = 5000, loaders: tuple[str, ...] = (*STREAMING, "memmap"),
                 work_dir: str | Path | None = None, log: Callable[[str], object] = print) -> dict:
    """Measure; returns {"machine", "settings", "results": [{"name", "tokens_per_s", ...}], "consumer_wait"}."""
    from lmforge.bench_tokenizer import machine_info
    from lmforge.shards import ensure_shards
    from lmforge.tokenizer import ensure_tokenizer

    tmp = tempfile.TemporaryDirectory(prefix="lmforge-bench-") if work_dir is None else None
    work = Path(work_dir or tmp.name)
    corpus = work / "corpus.jsonl"
    if not corpus.is_file() or corpus.stat().st_size < mbytes * 1e6:
        make_corpus(corpus, mbytes)
    mb = corpus.stat().st_size / 1e6
    recipe = _recipe(work, corpus, vocab_size, workers, slots)
    tok = ensure_tokenizer(recipe, log=log)
    results, waits = [], []
    for kind in (k for k in STREAMING if k in loaders):
        results.append(_bench_streaming(recipe, tok, kind, batch_size, seq_len, batches))
        log(f"{kind}: {results[-1]['tokens_per_s'] / 1e6:.3f}M tokens/s")
    if "memmap" in loaders:
        results += _bench_memmap(ensure_shards(recipe, tok, log=log), batch_size, seq_len, memmap_batches)
    for kind in (k for k in ("naive", "ring") if k in loaders and wait_batches > 0):
        waits.append(_consumer_wait(recipe, tok, kind, batch_size, seq_len, wait_batches, step_ms))
    if tmp is not None:
        tmp.cleanup()
    settings = {"mbytes": round(mb, 1), "batch_size": batch_size, "seq_len": seq_len, "vocab_size": tok.vocab_size,
                "workers": workers, "slots": slots, "tokenizer": f"lmforge {tok.kind}"}
    machine = {**machine_info(), "torch": torch.__version__, "numpy": np.__version__,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
    return {"machine": machine, "settings": settings, "results": results, "consumer_wait": waits,
            "ratios": _ratios(results)}


def _ratios(results: list[dict]) -> dict:
    speed = {r["name"]: r["tokens_per_s"] for r in results}
    out = {}
    for name in ("workers", "ring"):
        if name in speed and "naive" in speed:
            out[f"{name}/naive"] = round(speed[name] / speed["naive"], 2)
    if "memmap" in speed:
        out["memmap/nanogpt"] = round(speed["memmap"] / speed["nanogpt get_batch (reference)"], 2)
    return out


def print_loader_table(result: dict) -> None:
    from lmforge.bench_table import show_table

    s = result["settings"]
    console = show_table(
        f"loader bench: {s['mbytes']} MB JSONL, batch {s['batch_size']} x {s['seq_len']}, vocab {s['vocab_size']}, "
        f"{s['workers']} workers",
        ("loader", "batches", "tokens", "seconds", "batches/s", "tokens/s"),
        [(r["name"], str(r["batches"]), f"{r['tokens']:,}", f"{r['seconds']:.3f}", f"{r['batches_per_s']:,.1f}",
          f"{r['tokens_per_s'] / 1e6:,.3f}M") for r in result["results"]])
    for w in result["consumer_wait"]:
        console.print(f"consumer wait per batch, {w['name']}, {w['step_ms']:g} ms step: "
                      f"median {w['median_ms']:.3f} ms, p90 {w['p90_ms']:.3f} ms, max {w['max_ms']:.3f} ms")
    if result["ratios"]:
        console.print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items()))
