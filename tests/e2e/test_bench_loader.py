"""`lmforge bench loader` on a tiny corpus: the table, and JSON in the bench format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

# `lmforge.cli` registers the command once it imports lmforge.cli_loader; importing it here works either way
RUN = "import sys, lmforge.cli_loader, lmforge.cli as c; sys.exit(c.main(sys.argv[1:]))"


def test_bench_loader_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "loader", "--mbytes", "1", "--batches", "4", "--memmap-batches", "20", "--batch-size", "4",
            "--seq-len", "64", "--vocab-size", "300", "--wait-batches", "3", "--step-ms", "5",
            "--dir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for name in ("naive", "workers", "ring", "memmap", "nanogpt get_batch", "tokens/s", "consumer wait"):
        assert name in proc.stdout
    res = orjson.loads(out.read_bytes())
    assert res["machine"]["cpu_count"] >= 1
    names = [r["name"] for r in res["results"]]
    assert names[:4] == ["naive", "workers", "ring", "memmap"]
    for r in res["results"]:
        assert r["tokens_per_s"] > 0 and r["tokens"] == r["batches"] * 4 * 64
    assert {w["name"] for w in res["consumer_wait"]} == {"naive", "ring"}
    assert set(res["ratios"]) == {"workers/naive", "ring/naive", "memmap/nanogpt"}
    assert (tmp_path / "work" / "corpus.jsonl").stat().st_size >= 1e6
