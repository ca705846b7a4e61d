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


# ---- formats, lenient reading, parts and resume positions ------------------------------------------
from lmforge.sources import ReadStats, iter_blocks, parse_block  # noqa: E402


def lenient(cfg: DataConfig) -> tuple[list, ReadStats]:
    stats = ReadStats()
    docs = [d for b in iter_blocks(cfg, stats=stats) for d in parse_block(b, cfg, stats)]
    return docs, stats


def test_wikipedia_sections_and_meta(tmp_path: Path) -> None:
    rows = [{"title": "A", "score": 0.9, "article": {"sections": [{"heading": "Intro", "text": "First part."},
                                                                   {"heading": "More", "text": "Second part."}]}}]
    path = jsonl(tmp_path / "wiki.jsonl", rows)
    cfg = DataConfig(source=str(path), text_field="article.sections.text", meta_fields=["title", "score", "nope"])
    docs = list(iter_documents(cfg))
    assert docs[0].text == "First part.\n\nSecond part."
    assert docs[0].meta == {"path": str(path), "line": 1, "title": "A", "score": 0.9, "nope": None}


def test_lenient_counts_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok one"}\n{broken\n{"text": "caf\xe9 latin-1"}\n{"text": ""}\n'
                     b'{"text": 5}\n{"text": "ok two"}\n')
    docs, stats = lenient(DataConfig(source=str(path)))
    assert [d.text for d in docs] == ["ok one", "caf\ufffd latin-1", "ok two"]
    assert stats.malformed == 2 and stats.malformed_at == [f"{path}:2", f"{path}:5"]
    assert stats.utf8_replaced == 1 and stats.empty == 1
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        list(iter_documents(DataConfig(source=str(path))))
    text = tmp_path / "bad.txt"
    text.write_bytes(b"good line\nbad \xff\xfe line\n")
    docs, stats = lenient(DataConfig(source=str(text), doc_split="line"))
    assert [d.text for d in docs] == ["good line", "bad \ufffd\ufffd line"] and stats.utf8_replaced == 2


def test_missing_field_is_an_error_even_when_lenient(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "x.jsonl", [{"content": "a", "id": 1}])
    with pytest.raises(DataError, match=r"no field 'text'.*available: content, id"):
        lenient(DataConfig(source=str(path)))


def test_parquet_source(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"doc {i}" for i in range(1000)], "score": [i / 1000 for i in range(1000)],
                      "n": list(range(1000))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=300)
    cfg = DataConfig(source=str(tmp_path / "a.parquet"), meta_fields=["score"])
    docs = list(iter_documents(cfg))
    assert [d.text for d in docs] == [f"doc {i}" for i in range(1000)]
    assert docs[420].meta == {"path": str(tmp_path / "a.parquet"), "row": 420, "score": 0.42}
    blocks = list(iter_blocks(cfg))
    assert len(blocks) >= 4 and all(b.data.num_rows <= 300 for b in blocks)  # row-group batches
    with pytest.raises(DataError, match="column 'n' holds int64, not text"):
        list(iter_documents(cfg.model_copy(update={"text_field": "n"})))
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, score, n\)"):
        list(iter_documents(cfg.model_copy(update={"text_field": "body"})))


def test_hf_datasets_streaming_on_local_files(tmp_path: Path) -> None:
    rows = [{"text": f"story {i}", "language_score": i / 10} for i in range(10)]
    path = jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source="hf:json", hf_data_files=[str(path)], meta_fields=["language_score"], limit=7)
    docs = list(iter_documents(cfg))
    assert [d.text for d in docs] == [f"story {i}" for i in range(7)]
    assert docs[3].meta["language_score"] == 0.3 and docs[3].meta["row"] == 3
    assert source_fingerprint(cfg) == source_fingerprint(cfg)
    with pytest.raises(DataError, match=r"no field 'body'.*available: text, language_score"):
        list(iter_documents(cfg.model_copy(update={"text_field": "body"})))
    other = jsonl(tmp_path / "e.jsonl", [{"text": f"other {i}"} for i in range(4)])
    two = DataConfig(source="hf:json", hf_data_files=[str(path), str(other)])
    parts = [[d.text for b in iter_blocks(two, part=i, num_parts=2) for d in parse_block(b, two)] for i in range(2)]
    assert parts == [[f"story {i}" for i in range(10)], [f"other {i}" for i in range(4)]]
    rest = [d.text for b in iter_blocks(two, resume={"unit": 0, "row": 12}) for d in parse_block(b, two)]
    assert rest == ["other 2", "other 3"]
    with pytest.raises(DataError, match="2 data files, fewer than --num-parts 3"):
        list(iter_blocks(two, part=0, num_parts=3))


def test_limit_and_huge_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("short\n" + "x" * 3_000_000 + "\n" + "\n".join(f"l{i}" for i in range(50)), encoding="utf-8")
    docs = texts(DataConfig(source=str(path), doc_split="line"))
    assert len(docs) == 52 and len(docs[1]) == 3_000_000
    assert texts(DataConfig(source=str(path), doc_split="line", limit=5)) == docs[:5]


@pytest.mark.parametrize("fmt", ["jsonl", "line", "paragraph"])
def test_resume_positions_and_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    import lmforge.source_readers as readers
    import lmforge.sources as sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", 200)
    monkeypatch.setattr(readers, "BLOCK_BYTES", 200)
    monkeypatch.setattr(readers, "RANGE_BYTES", 1000)
    if fmt == "jsonl":
        path = jsonl(tmp_path / "a.jsonl", [{"text": f"document {i} " * (i % 7 + 1)} for i in range(300)])
        cfg = DataConfig(source=str(path))
    else:
        path = tmp_path / "a.txt"
        sep = "\n\n" if fmt == "paragraph" else "\n"
        path.write_text(sep.join(f"text {i}\nmore {i}" if fmt == "paragraph" else f"line {i}" for i in range(300)),
                        encoding="utf-8")
        cfg = DataConfig(source=str(path), doc_split=fmt)
    everything = texts(cfg)
    blocks = list(iter_blocks(cfg))
    assert len(blocks) > 5
    for k in (1, len(blocks) // 2):  # reading on from a block's position gives exactly what follows it
        rest = [d.text for b in iter_blocks(cfg, resume=blocks[k].pos) for d in parse_block(b, cfg)]
        before = [d.text for b in blocks[:k + 1] for d in parse_block(b, cfg)]
        assert before + rest == everything
    if fmt == "paragraph":  # paragraphs may span any byte: a file is one unit, shared by no parts
        with pytest.raises(DataError, match="part 1 of 3 has no input"):
            list(iter_blocks(cfg, part=1, num_parts=3))
        return
    parts = [[d.text for b in iter_blocks(cfg, part=i, num_parts=3) for d in parse_block(b, cfg)] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything) and all(parts)
