from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import DataError
from lmforge.megatron import MegatronIndex, MegatronWriter, export_megatron, is_megatron, megatron_dtype
from lmforge.shards import check_tokenizer, inspect_shards, load_manifest, open_split, verify_shards
from lmforge.tokenizer import Tokenizer


def test_writer_header_by_hand(tmp_path: Path) -> None:
    w = MegatronWriter(tmp_path / "d", np.uint16)
    for doc in ([5, 6, 7], [8], [9, 10]):
        w.add_document(np.array(doc))
    w.close()
    idx = (tmp_path / "d.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", idx[9:17]) == (1,)  # version
    assert idx[17] == 8  # dtype code: uint16
    assert struct.unpack("<QQ", idx[18:34]) == (3, 4)  # 3 sequences, 4 document indices
    assert struct.unpack("<3i", idx[34:46]) == (3, 1, 2)  # lengths
    assert struct.unpack("<3q", idx[46:70]) == (0, 6, 8)  # byte pointers
    assert struct.unpack("<4q", idx[70:102]) == (0, 1, 2, 3)  # document indices
    assert len(idx) == 102
    assert np.fromfile(tmp_path / "d.bin", dtype="<u2").tolist() == [5, 6, 7, 8, 9, 10]
    index = MegatronIndex(tmp_path / "d")
    assert len(index) == 3 and index.document(2).tolist() == [9, 10] and index.dtype == np.uint16


def test_dtype_choice() -> None:
    assert megatron_dtype(50257) == np.uint16 and megatron_dtype(65500) == np.int32


def test_round_trip_from_shards(tiny_shards_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mega"
    assert export_megatron(tiny_shards_dir, out) == [out / "train", out / "val"]
    assert is_megatron(out) and not is_megatron(tiny_shards_dir)
    for split in ("train", "val"):
        ours = np.concatenate(open_split(tiny_shards_dir, split))
        theirs = np.concatenate(open_split(out, split))
        assert np.array_equal(ours, theirs)
    # document boundaries survive, even where a document ran on into the next shard
    tok = Tokenizer.load(tiny_tokenizer_dir)
    index = MegatronIndex(out / "train")
    m = load_manifest(tiny_shards_dir)
    assert len(index) == m["splits"]["train"]["docs"]
    assert index.document(0)[0] == tok.bos_id and index.document(len(index) - 1)[-1] == tok.eos_id
    info = inspect_shards(out)
    assert info["splits"]["train"]["tokens"] == m["splits"]["train"]["tokens"] and info["vocab_size"] is None
    assert verify_shards(out) == []
    check_tokenizer(out, tok)  # Megatron data names no tokenizer: nothing to compare


def test_prefix_as_training_data(tmp_path: Path) -> None:
    from lmforge.loaders.memmap import MemmapLoader

    w = MegatronWriter(tmp_path / "corpus_text_document", np.int32)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=rng.integers(5, 50)) for _ in range(300)]
    for d in docs:
        w.add_document(d)
    w.close()
    prefix = tmp_path / "corpus_text_document"
    train, val = open_split(prefix, "train"), open_split(prefix, "val")
    assert np.concatenate(train).tolist() == np.concatenate(docs[:297]).tolist()
    assert np.concatenate(val).tolist() == np.concatenate(docs[297:]).tolist()
    loader = MemmapLoader(prefix, "train", 4, 16)
    x, y = next(iter(loader))
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x.idx").write_bytes(b"NOTMEGATRON" + b"\0" * 40)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="not a Megatron index"):
        open_split(tmp_path / "x", "train")
    w = MegatronWriter(tmp_path / "t", np.uint16)
    w.add_document(np.arange(100))
    w.add_document(np.arange(100))
    w.close()
    (tmp_path / "t.bin").write_bytes((tmp_path / "t.bin").read_bytes()[:50])
    with pytest.raises(DataError, match="shorter than its index"):
        open_split(tmp_path / "t", "val")
