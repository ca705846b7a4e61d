from __future__ import annotations

import gzip
import os
from pathlib import Path

import orjson
import pytest
import zstandard

from lmforge.config import DataConfig
from lmforge.errors import DataError
from lmforge.sources import iter_documents, iter_split, source_fingerprint


def texts(cfg: DataConfig) -> list[str]:
    return [d.text for d in iter_documents(cfg)]


def jsonl(path: Path, rows: list, compress: str = "") -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def test_bundled(shakespeare: str) -> None:
    docs = list(iter_documents(DataConfig()))
    assert len(docs) == 1 and docs[0].text == shakespeare and len(shakespeare) > 1_000_000
    assert docs[0].text.startswith("First Citizen:")
    with pytest.raises(DataError, match="bundled:tinyshakespeare"):
        list(iter_documents(DataConfig(source="bundled:nope")))


def test_text_splits(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\n\nthree\n  \nfour\r\nfive\n", encoding="utf-8")
    assert texts(DataConfig(source=str(f))) == ["one\ntwo\n\n\nthree\n  \nfour\r\nfive\n"]
    assert texts(DataConfig(source=str(f), doc_split="paragraph")) == ["one\ntwo", "three", "four\r\nfive"]
    assert texts(DataConfig(source=str(f), doc_split="line")) == ["one", "two", "three", "four", "five"]
    line_docs = list(iter_documents(DataConfig(source=str(f), doc_split="line")))
    assert line_docs[2].meta == {"path": str(f), "line": 5}


def test_gz_folder_glob(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt.gz").write_bytes(gzip.compress(b"gz text"))
    (tmp_path / "d" / "a.txt").write_text("plain", encoding="utf-8")
    (tmp_path / "d" / ".hidden.txt").write_text("skip me", encoding="utf-8")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zst text"))
    assert texts(DataConfig(source=str(tmp_path / "d"))) == ["plain", "gz text", "zst text"]
    assert texts(DataConfig(source=str(tmp_path / "d" / "*.txt*"))) == ["plain", "gz text"]


def test_jsonl_fields(tmp_path: Path) -> None:
    rows = [{"meta": {"body": {"text": "nested one"}}}, {"meta": {"body": {"text": ["para a", "para b"]}}}]
    for comp in ("", "gz", "zst"):
        path = jsonl(tmp_path / f"x.jsonl{'.' + comp if comp else ''}", rows, comp)
        cfg = DataConfig(source=str(path), text_field="meta.body.text")
        assert texts(cfg) == ["nested one", "para a\n\npara b"]
    docs = list(iter_documents(DataConfig(source=str(tmp_path / "x.jsonl"), text_field="meta.body.text")))
    assert docs[1].meta["line"] == 2
    listy = jsonl(tmp_path / "m.jsonl", [{"messages": [{"content": "hi"}, {"content": "there"}]}])
    assert texts(DataConfig(source=str(listy), text_field="messages.1.content")) == ["there"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.txt not found"):
        list(iter_documents(DataConfig(source=str(tmp_path / "nothere.txt"))))
    with pytest.raises(DataError, match="matches no files"):
        list(iter_documents(DataConfig(source=str(tmp_path / "*.nothing"))))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt holds no text"):
        list(iter_documents(DataConfig(source=str(tmp_path / "empty.txt"))))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        list(iter_documents(DataConfig(source=str(bad))))
    nofield = jsonl(tmp_path / "nofield.jsonl", [{"text": "a"}, {"content": "b", "id": 3}])
    with pytest.raises(DataError, match=r"nofield.jsonl:2: no field 'text'.*available: content, id"):
        list(iter_documents(DataConfig(source=str(nofield))))
    deep = jsonl(tmp_path / "deep.jsonl", [{"a": {"x": 1}}])
    with pytest.raises(DataError, match=r"no field 'a.b'.*available: x"):
        list(iter_documents(DataConfig(source=str(deep), text_field="a.b")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        list(iter_documents(DataConfig(source=str(tmp_path / "latin1.txt"))))


def test_tail_split_is_last_fraction(shakespeare: str) -> None:
    cfg = DataConfig()
    train, val = list(iter_split(cfg, "train")), list(iter_split(cfg, "val"))
    n = int(len(shakespeare) * 0.9)  # nanoGPT: data[:int(n*0.9)], data[int(n*0.9):]
    assert train == [shakespeare[:n]] and val == [shakespeare[n:]]


def test_tail_split_across_documents(tmp_path: Path) -> None:
    f = tmp_path / "lines.txt"
    f.write_text("".join(f"line {i:03d} text\n" for i in range(50)), encoding="utf-8")
    cfg = DataConfig(source=str(f), doc_split="line", val_fraction=0.25)
    docs = texts(cfg)
    stream = "".join(docs)
    cut = int(len(stream) * 0.75)
    train, val = list(iter_split(cfg, "train")), list(iter_split(cfg, "val"))
    assert "".join(train) == stream[:cut] and "".join(val) == stream[cut:]
    assert len(train) + len(val) == len(docs) + 1  # exactly one document straddles the cut


def test_hash_split(tmp_path: Path) -> None:
    f = tmp_path / "many.txt"
    f.write_text("\n".join(f"document number {i}" for i in range(2000)), encoding="utf-8")
    cfg = DataConfig(source=str(f), doc_split="line", val_split="hash", val_fraction=0.1)
    train, val = list(iter_split(cfg, "train")), list(iter_split(cfg, "val"))
    assert sorted(train + val) == sorted(texts(cfg)) and not set(train) & set(val)
    assert 120 < len(val) < 280
    assert val == list(iter_split(cfg, "val"))  # deterministic
    # a document's side does not depend on its neighbours
    f2 = tmp_path / "few.txt"
    f2.write_text("\n".join(val[:5] + train[:5]), encoding="utf-8")
    cfg2 = cfg.model_copy(update={"source": str(f2)})
    assert list(iter_split(cfg2, "val")) == val[:5]


def test_source_fingerprint(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello", encoding="utf-8")
    cfg = DataConfig(source=str(f))
    fp = source_fingerprint(cfg)
    assert fp == source_fingerprint(cfg)
    assert source_fingerprint(cfg.model_copy(update={"val_fraction": 0.2})) != fp
    f.write_text("hello world", encoding="utf-8")
    assert source_fingerprint(cfg) != fp
    st = f.stat()
    fp2 = source_fingerprint(cfg)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_fingerprint(cfg) != fp2
    assert source_fingerprint(DataConfig()) == source_fingerprint(DataConfig())
    with pytest.raises(DataError):
        source_fingerprint(DataConfig(source=str(tmp_path / "missing.txt")))
