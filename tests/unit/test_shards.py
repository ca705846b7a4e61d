from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import Recipe, TokenizerConfig
from lmforge.errors import DataError
from lmforge.shards import (
    HEADER_BYTES,
    check_tokenizer,
    dtype_for,
    ensure_shards,
    inspect_shards,
    load_manifest,
    open_split,
    split_tokens,
    tokenize_to_shards,
    verify_shards,
)
from lmforge.sources import iter_split
from lmforge.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


def expected_tokens(recipe: Recipe, tok: Tokenizer, split: str) -> list[int]:
    out: list[int] = []
    for text in iter_split(recipe.data, split):
        out += ([tok.bos_id] if recipe.tokenizer.add_bos else []) + tok.encode(text) + [tok.eos_id]
    return out


def small_recipe(tmp_path: Path, tiny_recipe: Recipe, text: str, **data) -> Recipe:
    corpus = tmp_path / "corpus.txt"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        corpus.write_text(text, encoding="utf-8")
    r = tiny_recipe.model_copy(deep=True)
    r.data.source, r.data.shards_dir, r.data.shard_tokens = str(corpus), str(tmp_path / "shards"), 1024
    for k, v in data.items():
        setattr(r.data, k, v)
    return r


def test_read_back_equals_direct_encoding(tiny_recipe: Recipe, tiny_shards_dir: Path, tok: Tokenizer) -> None:
    for split in ("train", "val"):
        got = np.concatenate(open_split(tiny_shards_dir, split))
        assert got.tolist() == expected_tokens(tiny_recipe, tok, split)
        assert split_tokens(tiny_shards_dir, split) == len(got)
    assert len(open_split(tiny_shards_dir, "train")) >= 2  # the fixture's shard size splits train


def test_manifest_fields(tiny_shards_dir: Path, tok: Tokenizer, tiny_recipe: Recipe) -> None:
    m = load_manifest(tiny_shards_dir)
    assert m["format"] == "lmforge-shards" and m["version"] == 1
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert {"data_config_hash", "source_fingerprint", "created"} <= set(m)
    train = m["splits"]["train"]
    corpus = Path(tiny_recipe.data.source).read_text(encoding="utf-8")
    assert train["docs"] == 1 and train["source_chars"] == int(len(corpus) * 0.9)
    assert train["source_bytes"] == sum(len(t.encode()) for t in iter_split(tiny_recipe.data, "train"))
    for f in train["files"]:
        assert f["tokens"] <= 16384 and len(f["sha256"]) == 64
        size = (tiny_shards_dir / f["name"]).stat().st_size
        assert size == f["bytes"] == HEADER_BYTES + 2 * f["tokens"] + 8 * f["docs"]
    assert [f["name"] for f in train["files"]] == [f"train_{i:06d}.bin" for i in range(len(train["files"]))]
    info = inspect_shards(tiny_shards_dir, tok)
    assert info["splits"]["val"]["tokens"] == m["splits"]["val"]["tokens"]
    assert info["first_text"].startswith("<|bos|>First Citizen")


def test_header_and_doc_offsets(tmp_path: Path, tiny_recipe: Recipe, tok: Tokenizer) -> None:
    text = "\n".join(f"line {i} of the corpus, with some words" for i in range(300))
    r = small_recipe(tmp_path, tiny_recipe, text, doc_split="line")
    out = tokenize_to_shards(r, tok, log=lambda *_: None)
    m = load_manifest(out)
    docs_seen = 0
    for f in m["splits"]["train"]["files"]:
        raw = (out / f["name"]).read_bytes()
        magic, version, itemsize, n_tok, n_docs = struct.unpack("<8sIIQQ", raw[:32])
        assert (magic, version, itemsize, n_tok, n_docs) == (b"LMFSHARD", 1, 2, f["tokens"], f["docs"])
        body = np.frombuffer(raw[HEADER_BYTES:HEADER_BYTES + 2 * n_tok], dtype=np.uint16)
        starts = np.frombuffer(raw[HEADER_BYTES + 2 * n_tok:], dtype=np.uint64)
        assert len(starts) == n_docs and (body[starts.astype(np.int64)] == tok.bos_id).all()
        assert (body == tok.bos_id).sum() == n_docs  # every bos is listed
        docs_seen += n_docs
    assert docs_seen == m["splits"]["train"]["docs"] == len(list(iter_split(r.data, "train")))


def test_dtype_choice(tmp_path: Path, tiny_recipe: Recipe) -> None:
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    big = Tokenizer("bpe", {"<|bos|>": 70_000, "<|eos|>": 70_001}, ranks={bytes([b]): b for b in range(256)})
    big.vocab_size = 70_002  # pretend: the ids stay small, only the dtype choice matters here
    r = small_recipe(tmp_path, tiny_recipe, "hello world\n" * 50)
    out = tokenize_to_shards(r, big, log=lambda *_: None)
    m = load_manifest(out)
    assert m["dtype"] == "uint32"
    got = np.concatenate(open_split(out, "train"))
    assert got.dtype == np.uint32 and got.tolist() == expected_tokens(r, big, "train")
    assert got[0] == 70_000 and got[-1] == 70_001


def test_verify_detects_damage(tiny_shards_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(tiny_shards_dir, d)
    assert verify_shards(d, tok) == []
    name = load_manifest(d)["splits"]["train"]["files"][1]["name"]
    data = bytearray((d / name).read_bytes())
    data[HEADER_BYTES + 100] ^= 0x01
    (d / name).write_bytes(bytes(data))
    problems = verify_shards(d)
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and name in problems[0]
    (d / name).write_bytes(bytes(data[:-10]))
    assert any("truncated" in p and name in p for p in verify_shards(d))
    (d / name).write_bytes(b"NOTSHARD" + bytes(data[8:]))
    assert any("bad header" in p for p in verify_shards(d))
    other = train_tokenizer(TokenizerConfig(kind="byte"), [])
    assert any("re-run `lmforge tokenize`" in p for p in verify_shards(tiny_shards_dir, other))
    with pytest.raises(DataError, match="were made with tokenizer"):
        check_tokenizer(tiny_shards_dir, other)
    check_tokenizer(tiny_shards_dir, tok)
    (d / "manifest.json").write_text("{not json", encoding="utf-8")
    assert "corrupt manifest" in verify_shards(d)[0]
    with pytest.raises(DataError, match="corrupt manifest"):
        open_split(d, "train")


def test_ensure_shards_skips_and_rebuilds(tmp_path: Path, tiny_recipe: Recipe, tok: Tokenizer) -> None:
    logs: list[str] = []
    ensure_shards(tiny_recipe, tok, log=logs.append)
    assert "up to date" in logs[-1]
    r = small_recipe(tmp_path, tiny_recipe, "some text here\n" * 400)
    out = ensure_shards(r, tok, log=logs.append)
    assert logs[-1].startswith("shards: train")
    n_files = len(list(out.glob("train_*.bin")))
    assert n_files > 1
    ensure_shards(r, tok, log=logs.append)
    assert "up to date" in logs[-1]
    r.data.workers = 3  # does not change the output
    ensure_shards(r, tok, log=logs.append)
    assert "up to date" in logs[-1]
    Path(r.data.source).write_text("other text entirely\n" * 400, encoding="utf-8")  # the corpus changed
    ensure_shards(r, tok, log=logs.append)
    assert "up to date" not in logs[-1]
    assert np.concatenate(open_split(out, "train")).tolist() == expected_tokens(r, tok, "train")
    r.data.shard_tokens = 1_000_000
    ensure_shards(r, tok, log=logs.append)
    assert "up to date" not in logs[-1]
    assert len(list(out.glob("train_*.bin"))) == 1  # stale shards of the earlier build are gone
    r.tokenizer.add_bos = False
    ensure_shards(r, tok, log=logs.append)
    assert np.concatenate(open_split(out, "train")).tolist() == expected_tokens(r, tok, "train")
    (out / "train_000000.bin").write_bytes(b"")  # damaged file → rebuild
    ensure_shards(r, tok, log=logs.append)
    assert "up to date" not in logs[-1] and verify_shards(out, tok) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_parallel_equals_serial(tmp_path: Path, tiny_recipe: Recipe, tok: Tokenizer, shakespeare: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.shards as shards

    monkeypatch.setattr(shards, "CHUNK_CHARS", 4000)  # the long document gets cut into many pieces
    monkeypatch.setattr(shards, "BATCH_CHARS", 3000)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(shakespeare[:40_000], encoding="utf-8")
    for i in range(20):
        (corpus / f"b{i:02d}.txt").write_text(f"short document {i}\n", encoding="utf-8")
    assert len(tok.chunk_text(shakespeare[:36_000], 4000)) >= 8
    results = []
    for workers in (1, 2):
        r = small_recipe(tmp_path / f"w{workers}", tiny_recipe, "", workers=workers)
        r.data.source = str(corpus)
        out = tokenize_to_shards(r, tok, log=lambda *_: None)
        results.append([np.concatenate(open_split(out, s)).tolist() for s in ("train", "val")])
        assert results[-1][0] == expected_tokens(r, tok, "train")
        assert results[-1][1] == expected_tokens(r, tok, "val")
    assert results[0] == results[1]


def test_empty_and_missing(tmp_path: Path, tiny_recipe: Recipe, tok: Tokenizer) -> None:
    with pytest.raises(DataError, match="manifest.json missing"):
        load_manifest(tmp_path)
    r = small_recipe(tmp_path, tiny_recipe, "only a few words\n", doc_split="line", val_split="hash",
                     val_fraction=0.01)
    out = tokenize_to_shards(r, tok, log=lambda *_: None)
    with pytest.raises(DataError, match="val split .* is empty"):
        open_split(out, "val")
    with pytest.raises(DataError, match="no split 'test'"):
        open_split(out, "test")


def test_failure_leaves_no_partial_files(tmp_path: Path, tiny_recipe: Recipe, tok: Tokenizer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.shards as shards

    def broken(cfg, split):
        yield "plenty of words here\n" * 200
        raise DataError("source went away")

    r = small_recipe(tmp_path, tiny_recipe, "x")
    monkeypatch.setattr(shards, "iter_split", broken)
    with pytest.raises(DataError, match="went away"):
        tokenize_to_shards(r, tok, log=lambda *_: None)
    out = Path(r.data.shards_dir)
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_data_config_hash_counts_prepare_only_when_enabled(tiny_recipe: Recipe) -> None:
    from lmforge.shards import data_config_hash

    base = data_config_hash(tiny_recipe)
    r = tiny_recipe.model_copy(deep=True)
    r.prepare.min_chars = 10  # prepare is off: its settings do not change the shards
    assert data_config_hash(r) == base
    r.prepare.enabled = True
    with_prepare = data_config_hash(r)
    assert with_prepare != base
    r.prepare.out_dir, r.prepare.strict, r.prepare.num_parts = "elsewhere", True, 4  # where/how, not what
    assert data_config_hash(r) == with_prepare
    r.prepare.dedup = "none"
    assert data_config_hash(r) != with_prepare
