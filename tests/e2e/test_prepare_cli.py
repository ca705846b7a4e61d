"""`lmforge prepare`, `shards merge`, `shards export-megatron` as a user runs them (subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"
# cli_data registers its commands on import; until cli.py imports it, load it before main()
ENTRY = "import sys, lmforge.cli_data, lmforge.cli as c; sys.exit(c.main(sys.argv[1:]))"


def lmforge(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def write_recipe(dir: Path, source: Path, **data: str) -> Path:
    lines = ["[data]", f'source = "{source}"', 'meta_fields = ["score"]', 'shards_dir = "out/shards"',
             "shard_tokens = 1024", "workers = 2", *(f"{k} = {v}" for k, v in data.items()), "",
             "[tokenizer]", 'kind = "byte"', 'dir = "out/tok"', "",
             "[prepare]", "enabled = true", 'out_dir = "out/prep"', "min_chars = 20", 'meta_filters = ["score >= 0.1"]']
    path = dir / "recipe.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = SAMPLES / "tinystories_sample.txt"
    stories = ([s.strip() for s in path.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
               if path.is_file() else [f"A story about the number {i}. " * 20 for i in range(200)])
    out = tmp_path_factory.mktemp("corpus") / "stories.jsonl"
    with open(out, "wb") as f:
        for rep in range(25):  # ~4 MB: several 1 MB blocks, so several segments
            for i, s in enumerate(stories):
                f.write(orjson.dumps({"text": f"{s} (retelling {rep})", "score": (i % 10) / 10}) + b"\n")
        f.write(b"{this line is broken\n")
    return out


def test_prepare_then_up_to_date(tmp_path: Path, corpus: Path) -> None:
    recipe = write_recipe(tmp_path, corpus)
    res = lmforge("prepare", str(recipe), "--limit", "300", cwd=tmp_path)
    assert "prepare: 300 docs in" in res.stdout
    stats = orjson.loads((tmp_path / "out/prep/stats.json").read_bytes())
    assert stats["docs_in"] == 300 and stats["filters"][2]["filter"] == "meta: score >= 0.1"
    res = lmforge("prepare", str(recipe), "--limit", "300", cwd=tmp_path)
    assert "shards: up to date" in res.stdout
    res = lmforge("prepare", str(recipe), cwd=tmp_path)  # the whole input: the broken line is counted
    stats = orjson.loads((tmp_path / "out/prep/stats.json").read_bytes())
    assert stats["bad_input"]["malformed_lines"] == 1 and stats["bad_input"]["malformed_at"][0].endswith(":5001")
    res = lmforge("shards", "verify", "out/shards", cwd=tmp_path)
    assert "ok" in res.stdout
    res = lmforge("shards", "export-megatron", "out/shards", "--out", "mega", cwd=tmp_path)
    assert (tmp_path / "mega/train.idx").is_file() and (tmp_path / "mega/val.bin").is_file()
    (tmp_path / "strict").mkdir()
    res = lmforge("prepare", str(recipe), "--strict", cwd=tmp_path / "strict", check=False)
    assert res.returncode == 1 and "not valid JSON" in res.stderr and "Traceback" not in res.stderr


def test_bad_input_errors(tmp_path: Path, corpus: Path) -> None:
    res = lmforge("prepare", str(write_recipe(tmp_path, tmp_path / "nope.jsonl")), cwd=tmp_path, check=False)
    assert res.returncode == 1 and "nope.jsonl not found" in res.stderr and "Traceback" not in res.stderr
    res = lmforge("prepare", str(write_recipe(tmp_path, tmp_path / "*.none")), cwd=tmp_path, check=False)
    assert res.returncode == 1 and "matches no files" in res.stderr
    recipe = write_recipe(tmp_path, corpus, text_field='"body"')
    res = lmforge("prepare", str(recipe), cwd=tmp_path, check=False)
    assert res.returncode == 1 and "no field 'body'" in res.stderr and "available: text, score" in res.stderr


def _kill_after_first_segment(tmp_path: Path, recipe: Path, sig: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "prepare", str(recipe)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    record = tmp_path / "out/prep/state/segment_000000.json"
    deadline = time.time() + 120
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL])
def test_interrupted_run_resumes_identically(tmp_path: Path, corpus: Path, sig: int) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lmforge("prepare", str(write_recipe(tmp_path / "a", corpus)), cwd=tmp_path / "a")
    recipe = write_recipe(tmp_path / "b", corpus)
    code = _kill_after_first_segment(tmp_path / "b", recipe, sig)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    shards = tmp_path / "b/out/shards"
    assert not (shards / "manifest.json").exists()
    res = lmforge("prepare", str(recipe), cwd=tmp_path / "b")
    assert "resuming after" in res.stdout
    a = {p.name: p.read_bytes() for p in (tmp_path / "a/out/shards").glob("*.bin")}
    b = {p.name: p.read_bytes() for p in shards.glob("*.bin")}
    assert a == b and len(a) > 3
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]


def test_parts_and_merge(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "more").mkdir()
    for i in range(3):  # three files, so three parts have something each
        (tmp_path / "more" / f"f{i}.jsonl").write_bytes(corpus.read_bytes()[i * 1000:i * 1000 + 900_000]
                                                         .split(b"\n", 1)[1].rsplit(b"\n", 1)[0] + b"\n")
    recipe = write_recipe(tmp_path, tmp_path / "more")
    for part in range(3):
        lmforge("prepare", str(recipe), "--num-parts", "3", "--part", str(part), cwd=tmp_path)
    parts = sorted(str(p) for p in (tmp_path / "out/shards").glob("part_*"))
    assert len(parts) == 3
    res = lmforge("shards", "merge", *parts, "--out", "out/shards", cwd=tmp_path)
    assert "merged 3 dirs" in res.stdout
    assert "ok" in lmforge("shards", "verify", "out/shards", cwd=tmp_path).stdout
    res = lmforge("prepare", str(recipe), "--num-parts", "2", "--part", "2", cwd=tmp_path, check=False)
    assert res.returncode == 1 and "--part 2 must be below --num-parts 2" in res.stderr
