from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson
import pytest

from lmforge.clean import dedup_key, normalize
from lmforge.config import Recipe
from lmforge.errors import DataError
from lmforge.prepare import iter_prepared, prepare_recipe, run_prepare
from lmforge.prepare_io import DocsWriter, merge_shards
from lmforge.shards import ensure_shards, load_manifest, open_split, verify_shards
from lmforge.tokenizer import Tokenizer, ensure_tokenizer

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def stories() -> list[str]:
    path = SAMPLES / "tinystories_sample.txt"
    if path.is_file():
        return [s.strip() for s in path.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    return [f"Once upon a time there was a story number {i}. " * (i % 9 + 3) for i in range(200)]


@pytest.fixture
def corpus(tmp_path: Path, stories: list[str]) -> Path:
    """Stories as JSONL with a score, plus duplicates, junk, a broken line and bad UTF-8."""
    rows = []
    for i, text in enumerate(stories):
        rows.append(orjson.dumps({"text": text, "meta": {"score": (i % 10) / 10}}))
        if i % 10 == 3:
            rows.append(orjson.dumps({"text": text.upper(), "meta": {"score": 0.9}}))  # a case-only duplicate
    rows += [b'{"text": "tiny", "meta": {"score": 1}}', b"{not json", b'{"text": "caf\xe9 ' + b"word " * 30 + b'"}',
             orjson.dumps({"text": "   \n\n  ", "meta": {"score": 1}})]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def recipe_for(tmp_path: Path, source: Path, workers: int = 1, **prepare) -> Recipe:
    return Recipe.model_validate({
        "data": {"source": str(source), "meta_fields": ["meta.score"], "shards_dir": str(tmp_path / "shards"),
                 "shard_tokens": 4096, "workers": workers, "val_fraction": 0.1},
        "tokenizer": {"kind": "byte", "dir": str(tmp_path / "tok")},
        "prepare": {"enabled": True, "out_dir": str(tmp_path / "prep"), "min_chars": 20,
                    "meta_filters": ["meta.score >= 0.2"], **prepare},
    })


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.source_readers as readers
    import lmforge.sources as sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", 8192)
    monkeypatch.setattr(readers, "BLOCK_BYTES", 8192)


def expected_docs(stories: list[str]) -> list[str]:
    """What the filters keep of `corpus`, in input order, before the split."""
    kept, seen = [], set()
    for i, text in enumerate(stories):
        for t, score in [(text, (i % 10) / 10)] + ([(text.upper(), 0.9)] if i % 10 == 3 else []):
            t = normalize(t)
            if score >= 0.2 and len(t) >= 20 and dedup_key(t) not in seen:
                seen.add(dedup_key(t))
                kept.append(t)
    return kept


def test_prepare_outputs(tmp_path: Path, corpus: Path, stories: list[str], small_blocks: None) -> None:
    r = recipe_for(tmp_path, corpus)
    tok = ensure_tokenizer(r, log=quiet)
    stats = run_prepare(r, tok, log=quiet)
    kept = expected_docs(stories)
    cut = int(0.1 * 2**64)
    for split, in_val in (("train", False), ("val", True)):
        docs = [t for t in kept if (dedup_key(t) < cut) == in_val]
        assert list(iter_prepared(r, split)) == docs
        tokens = np.concatenate(open_split(r.data.shards_dir, split)).tolist()
        assert tokens == [i for t in docs for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
        assert stats["docs_out"][split] == len(docs)
    assert verify_shards(r.data.shards_dir, tok) == []
    broken = corpus.read_bytes().splitlines().index(b"{not json") + 1
    assert stats["bad_input"] == {"malformed_lines": 1, "malformed_at": [f"{corpus}:{broken}"],
                                  "utf8_replaced": 1, "empty_docs": 0}
    funnel = {f["filter"]: f for f in stats["filters"]}
    assert funnel["empty_after_cleaning"]["dropped"] == 1 and funnel["min_chars"]["dropped"] == 1
    assert funnel["meta: meta.score >= 0.2"]["dropped"] >= len(stories) // 10
    assert stats["duplicates"]["exact"] == funnel["dedup_exact"]["dropped"] > 0
    assert funnel["dedup_exact"]["out"] == len(kept)
    assert stats["segments"] > 2 and stats["peak_rss_mb"]["main"] > 0
    assert stats["bytes_per_token"]["all"] == pytest.approx(1.0, abs=0.01)  # bytes: one token per byte
    m = load_manifest(r.data.shards_dir)
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint and m["tokenizer"]["name"] == "byte"
    assert orjson.loads((tmp_path / "prep" / "stats.json").read_bytes())["docs_in"] == stats["docs_in"]


def test_copies_within_a_block_are_dropped_before_encoding(tmp_path: Path, monkeypatch) -> None:
    import lmforge.prepare as prepare

    a, b = "The first document, long enough to keep.", "The second document, also long enough."
    path = tmp_path / "dups.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"text": t, "meta": {"score": 1}}) + b"\n" for t in (a, b, a, a.upper())))
    encoded = []
    real = prepare._encode
    monkeypatch.setattr(prepare, "_encode", lambda tok, text: encoded.append(text) or real(tok, text))
    r = recipe_for(tmp_path, path)
    stats = run_prepare(r, ensure_tokenizer(r, log=quiet), log=quiet)
    assert encoded == [a, b]  # the two copies (one differs only in case) cost no encoding
    assert stats["duplicates"]["exact"] == 2 and sum(stats["docs_out"].values()) == 2
    assert sorted(list(iter_prepared(r, "train")) + list(iter_prepared(r, "val"))) == sorted([a, b])


def test_parallel_equals_serial(tmp_path: Path, corpus: Path, small_blocks: None) -> None:
    outs = []
    for workers in (1, 2):
        r = recipe_for(tmp_path / f"w{workers}", corpus, workers=workers)
        run_prepare(r, ensure_tokenizer(r, log=quiet), log=quiet)
        shards = Path(r.data.shards_dir)
        outs.append({p.name: p.read_bytes() for p in sorted(shards.glob("*.bin"))})
    assert outs[0] == outs[1] and len(outs[0]) > 2


def test_resume_after_interrupt(tmp_path: Path, corpus: Path, small_blocks: None,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.prepare_io as pio

    whole = recipe_for(tmp_path / "whole", corpus)
    run_prepare(whole, ensure_tokenizer(whole, log=quiet), log=quiet)
    r = recipe_for(tmp_path / "cut", corpus)
    tok = ensure_tokenizer(r, log=quiet)
    real_close, calls = pio.Segment.close, []

    def close_then_stop(self):
        calls.append(self.index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_close(self)

    monkeypatch.setattr(pio.Segment, "close", close_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(r, tok, log=quiet)
    monkeypatch.setattr(pio.Segment, "close", real_close)
    shards = Path(r.data.shards_dir)
    assert not (shards / "manifest.json").exists() and not list(shards.glob(".*"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.glob("*.bin")}
    assert len(before) >= 2
    logs: list[str] = []
    stats = run_prepare(r, tok, log=logs.append)
    assert "resuming after 2 completed segment(s)" in logs[0] and stats["resumed_after"] == 2
    for name, ident in before.items():  # completed shards are never rewritten
        assert ((shards / name).stat().st_ino, (shards / name).stat().st_mtime_ns) == ident
    ref = Path(whole.data.shards_dir)
    assert {p.name: p.read_bytes() for p in shards.glob("*.bin")} == {p.name: p.read_bytes() for p in ref.glob("*.bin")}
    assert load_manifest(shards)["splits"]["train"]["tokens"] == load_manifest(ref)["splits"]["train"]["tokens"]
    assert stats["docs_in"] == orjson.loads((tmp_path / "whole" / "prep" / "stats.json").read_bytes())["docs_in"]


def test_strict_limit_and_empty(tmp_path: Path, corpus: Path) -> None:
    r = recipe_for(tmp_path, corpus, strict=True)
    tok = ensure_tokenizer(r, log=quiet)
    with pytest.raises(DataError, match="not valid JSON"):
        run_prepare(r, tok, log=quiet)
    assert not (Path(r.data.shards_dir) / "manifest.json").exists()
    r = recipe_for(tmp_path, corpus)
    r.data.limit = 25
    assert run_prepare(r, tok, log=quiet)["docs_in"] == 25
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="gave no training text"):
        run_prepare(recipe_for(tmp_path / "e", empty), tok, log=quiet)
    with pytest.raises(DataError, match="not found"):
        run_prepare(recipe_for(tmp_path / "m", tmp_path / "missing.jsonl"), tok, log=quiet)


def test_near_dedup_and_windows(tmp_path: Path) -> None:
    words = [f"word{i}" for i in range(400)]
    rows = [{"text": " ".join(words), "meta": {"score": 1}},
            {"text": " ".join(words[:390] + ["other"] * 10), "meta": {"score": 1}},
            {"text": " ".join(reversed(words)), "meta": {"score": 1}}]
    path = tmp_path / "near.jsonl"
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in rows))
    r = recipe_for(tmp_path, path, dedup="minhash", minhash_threshold=0.7, minhash_perms=64, window=64, stride=32)
    r.data.val_fraction = 0.01
    stats = run_prepare(r, ensure_tokenizer(r, log=quiet), log=quiet)
    assert stats["duplicates"] == {**stats["duplicates"], "exact": 0, "near": 1}
    m = load_manifest(r.data.shards_dir)
    tokens = np.concatenate(open_split(r.data.shards_dir, "train"))
    win = np.load(Path(r.data.shards_dir) / m["windows"]["train"]["file"])
    assert win.shape == ((len(tokens) - 64) // 32 + 1, 64) and win.dtype == tokens.dtype
    assert np.array_equal(win[3], tokens[96:160]) and np.array_equal(win[-1], tokens[(len(win) - 1) * 32:][:64])


def test_retokenize_prepared_docs(tmp_path: Path, corpus: Path, tiny_tokenizer_dir: Path) -> None:
    r = recipe_for(tmp_path, corpus)
    logs: list[str] = []
    prepare_recipe(r, log=logs.append)
    ensure_shards(r, ensure_tokenizer(r, log=quiet), log=logs.append)
    assert "up to date" in logs[-1]
    r.tokenizer.kind, r.tokenizer.pretrained = "pretrained", str(tiny_tokenizer_dir)
    tok = ensure_tokenizer(r, log=quiet)
    ensure_shards(r, tok, log=logs.append)
    assert any("tokenizing them" in line for line in logs)
    got = np.concatenate(open_split(r.data.shards_dir, "train")).tolist()
    assert got == [i for t in iter_prepared(r, "train") for i in [tok.bos_id, *tok.encode(t), tok.eos_id]]
    assert load_manifest(r.data.shards_dir)["tokenizer"]["fingerprint"] == tok.fingerprint


def test_bpe_trains_on_cleaned_text(tmp_path: Path, corpus: Path) -> None:
    r = recipe_for(tmp_path, corpus)
    r.tokenizer.kind, r.tokenizer.vocab_size = "bpe", 300
    tok = ensure_tokenizer(r, log=quiet)
    assert tok.meta["train_chars"] > 0 and "-" in tok.meta["source_fingerprint"]
    logs: list[str] = []
    ensure_tokenizer(r, log=logs.append)
    assert "up to date" in logs[-1]


def test_parts_and_merge(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, small_blocks: None) -> None:
    import lmforge.source_readers as readers

    monkeypatch.setattr(readers, "RANGE_BYTES", 20_000)
    dirs = []
    for part in range(2):
        r = recipe_for(tmp_path / f"part_{part}", corpus)
        r.prepare.num_parts, r.prepare.part = 2, part
        run_prepare(r, ensure_tokenizer(r, log=quiet), log=quiet)
        dirs.append(Path(r.data.shards_dir))
    whole = recipe_for(tmp_path / "whole", corpus)
    run_prepare(whole, ensure_tokenizer(whole, log=quiet), log=quiet)
    merged = merge_shards(dirs, tmp_path / "merged")
    parts_docs = sum(load_manifest(d)["splits"]["train"]["docs"] for d in dirs)
    whole_docs = load_manifest(whole.data.shards_dir)["splits"]["train"]["docs"]
    assert merged["splits"]["train"]["docs"] == parts_docs >= whole_docs
    assert verify_shards(tmp_path / "merged") == []
    assert all(f["name"].startswith("../part_") for f in merged["splits"]["train"]["files"])
    got = np.concatenate(open_split(tmp_path / "merged", "train"))
    assert len(got) == merged["splits"]["train"]["tokens"]
    assert not os.path.exists(tmp_path / "merged" / "train_000000.bin")  # nothing copied


def test_docs_writer_round_trip(tmp_path: Path) -> None:
    w = DocsWriter(tmp_path / "d.jsonl.zst")
    w.write(b'{"text": "a"}\n{"text": "b\\nc"}\n', 2)
    w.write(b'{"text": "\xc3\xa9"}\n', 1)
    assert w.close()["docs"] == 3
    assert list(DocsWriter.read(tmp_path / "d.jsonl.zst")) == ["a", "b\nc", "é"]


def test_tokenizer_loads_in_workers(tmp_path: Path, corpus: Path, tiny_tokenizer_dir: Path) -> None:
    r = recipe_for(tmp_path, corpus, workers=2)
    r.tokenizer.kind, r.tokenizer.pretrained = "pretrained", str(tiny_tokenizer_dir)
    tok = ensure_tokenizer(r, log=quiet)
    assert isinstance(tok, Tokenizer)
    stats = run_prepare(r, tok, log=quiet)
    assert stats["workers"] == 2 and 1.5 < stats["bytes_per_token"]["all"] < 6


def test_recipes_validate() -> None:
    from lmforge.config import load_recipe

    root = Path(__file__).resolve().parents[2] / "recipes"
    ts = load_recipe(root / "tinystories.toml")
    assert ts.data.source == "hf:roneneldan/TinyStories" and ts.prepare.enabled
    fw = load_recipe(root / "fineweb-gpt2-124m.toml")
    assert (fw.data.hf_config, fw.tokenizer.pretrained, fw.model.n_layer) == ("sample-10BT", "gpt2", 12)
    assert "language_score >= 0.65" in fw.prepare.meta_filters and fw.prepare.dedup == "minhash"


def test_huge_single_line_document(tmp_path: Path) -> None:
    line = ("word, another (word) and more " * 100_000).strip()  # 3 MB, no newline
    path = tmp_path / "big.jsonl"
    path.write_bytes(orjson.dumps({"text": line, "meta": {"score": 1}}) + b"\n")
    r = recipe_for(tmp_path, path)
    r.data.val_fraction = 0.01
    tok = ensure_tokenizer(r, log=quiet)
    run_prepare(r, tok, log=quiet)
    got = np.concatenate(open_split(r.data.shards_dir, "train"))
    assert got.tolist() == [tok.bos_id, *tok.encode(line), tok.eos_id]


def test_bench_prepare_shape(tmp_path: Path) -> None:
    from lmforge.bench_prepare import bench_prepare, print_prepare_table

    res = bench_prepare(mbytes=0.3, vocab_size=300, workers=[1, 2], dir=tmp_path, log=quiet, repeats=2)
    names = [r["name"] for r in res["results"]]
    assert names == ["raw encode, 1 process", "raw encode, 2 processes", "prepare, 1 worker", "prepare, 2 workers",
                     "prepare, 2 workers + docs"]
    assert all(r["mb_per_s"] > 0 and r["tokens_per_s"] > 0 for r in res["results"])
    assert all(len(r["round_seconds"]) == 2 and r["seconds"] == min(r["round_seconds"]) for r in res["results"])
    assert {"speedup_1_to_2_workers", "prepare_2_vs_raw_2"} <= set(res["summary"])
    assert res["results"][2]["docs_out"] < res["results"][2]["docs_in"]  # duplicates and junk were dropped
    orjson.dumps(res)
    print_prepare_table(res)
