"""`lmforge bench tokenizer`: BPE training time and encode throughput against the reference libraries.

Training: lmforge's `train_tokenizer` vs raw rustbpe (the engine it wraps) vs Hugging Face
`tokenizers`' BpeTrainer, on the same documents, pattern and vocabulary size. Encoding: lmforge
vs tiktoken (`encode_ordinary[_batch]`, same ranks) vs `tokenizers` (`encode_batch_fast`), on the
same documents and as one long string. Every time is the median of `repeats` runs in this process.
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from importlib import metadata, resources
from typing import Any

from lmforge.config import TokenizerConfig
from lmforge.tokenizer import GPT4_PATTERN, train_tokenizer


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    fn()  # warm-up: thread pools, caches and allocators start up outside the timed runs
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _corpus(mbytes: float) -> tuple[str, list[str]]:
    """About `mbytes` MB of Shakespeare (repeated), and the same text cut into paragraphs (documents)."""
    base = gzip.decompress((resources.files("lmforge.data") / "tinyshakespeare.txt.gz").read_bytes())
    target = int(mbytes * 1e6)
    data = (base * (target // len(base) + 1))[:target].decode("utf-8", errors="ignore")
    # cut after a blank line, before a letter: the pieces encode to the same tokens as the whole text
    docs = re.split(r"(?<=\n\n)(?=[A-Za-z])", data)
    return data, docs


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "missing"


def machine_info() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            **{pkg: _version(pkg) for pkg in ("lmforge", "tiktoken", "tokenizers", "rustbpe")}}


def _hf_trainer(docs: list[str], n_ordinary: int) -> Any:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_ordinary, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def bench_tokenizer(vocab_size: int = 16384, mbytes: float = 5.0, repeats: int = 3) -> dict:
    """Measure; returns {"machine": {...}, "settings": {...}, "results": [{"name", "tokens_per_s", ...}]}."""
    import rustbpe
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    text, docs = _corpus(mbytes)
    mb = len(text.encode("utf-8")) / 1e6
    cfg = TokenizerConfig(vocab_size=vocab_size)
    n_ordinary = vocab_size - len(cfg.special_tokens)

    def raw_rustbpe() -> Any:
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(docs), n_ordinary, pattern=GPT4_PATTERN)
        return bpe

    t_ours, tok = _median_time(lambda: train_tokenizer(cfg, docs), repeats)
    t_rust, _ = _median_time(raw_rustbpe, repeats)
    t_hf, _ = _median_time(lambda: _hf_trainer(docs, n_ordinary), repeats)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    results = [
        {"name": f"train {name}", "seconds": round(t, 4), "mb_per_s": round(mb / t, 3),
         "tokens_per_s": round(n_tokens / t), "vs_rustbpe": round(t / t_rust, 3)}
        for name, t in (("lmforge", t_ours), ("rustbpe", t_rust), ("hf-tokenizers", t_hf))
    ]

    enc = tiktoken.Encoding("bench", pat_str=tok.pattern, special_tokens={},
                            mergeable_ranks={t: r for t, r in tok._ranks.items()})
    hf = HFTokenizer.from_str(tok.to_hf_json())
    cases = [
        ("encode_batch lmforge", lambda: tok.encode_batch(docs)),
        ("encode_batch tiktoken", lambda: enc.encode_ordinary_batch(docs)),
        ("encode_batch hf-tokenizers",
         lambda: [e.ids for e in hf.encode_batch_fast(docs, add_special_tokens=False)]),
        ("encode lmforge", lambda: tok.encode(text)),
        ("encode tiktoken", lambda: enc.encode_ordinary(text)),
        ("encode hf-tokenizers", lambda: hf.encode(text, add_special_tokens=False).ids),
    ]
    timed = {}
    for name, fn in cases:
        t, out = _median_time(fn, repeats)
        count = len(out) if name.startswith("encode ") else sum(len(ids) for ids in out)
        timed[name] = (t, count)
    for name, (t, count) in timed.items():
        ref = timed[name.rsplit(" ", 1)[0] + " tiktoken"][0]
        results.append({"name": name, "seconds": round(t, 4), "mb_per_s": round(mb / t, 3),
                        "tokens_per_s": round(count / t), "tokens": count, "vs_tiktoken": round(ref / t, 3)})
    return {"machine": machine_info(),
            "settings": {"vocab_size": vocab_size, "mbytes": round(mb, 3), "docs": len(docs),
                         "repeats": repeats, "tokens": n_tokens},
            "results": results}


def print_bench_table(result: dict) -> None:
    from lmforge.bench_table import show_table

    s = result.get("settings", {})
    show_table(f"tokenizer bench: {s.get('mbytes')} MB, vocab {s.get('vocab_size')}, median of {s.get('repeats')}",
               ("name", "seconds", "MB/s", "tokens/s", "ratio"),
               [(r["name"], f"{r['seconds']:.3f}", f"{r['mb_per_s']:.2f}", f"{r['tokens_per_s']:,}",
                 f"time {r['vs_rustbpe']:.2f}x rustbpe" if "vs_rustbpe" in r
                 else f"speed {r['vs_tiktoken']:.2f}x tiktoken") for r in result["results"]])
