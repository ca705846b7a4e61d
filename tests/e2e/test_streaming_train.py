"""Streaming mode: training straight from a raw JSONL corpus, no tokenize step, through the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import tomli_w

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 10


def lmforge(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def losses(run_dir: Path) -> dict[int, float]:
    rows = [orjson.loads(x) for x in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare):
    """A JSONL corpus (one speech per line, nested under a field) and a recipe streaming it with `ring`."""
    root = tmp_path_factory.mktemp("stream")
    speeches = [s.strip() for s in shakespeare[:150_000].split("\n\n") if s.strip()]
    with open(root / "corpus.jsonl", "wb") as f:
        for i, text in enumerate(speeches):
            f.write(orjson.dumps({"id": i, "body": {"text": text}}) + b"\n")
    raw = {
        "name": "stream",
        "data": {"source": str(root / "corpus.jsonl"), "text_field": "body.text", "loader": "ring",
                 "loader_workers": 2, "shards_dir": str(root / "never")},
        "tokenizer": {"dir": str(root / "tokenizer"), "vocab_size": 384},
        "model": {"preset": "tiny"},
        "train": {"run_dir": str(root / "run"), "max_steps": STEPS, "log_every": 1, "eval_every": 5,
                  "save_every": 5, "micro_batch_size": 4, "warmup_steps": 2, "sample_at_eval": False},
        "eval": {"batches": 2},
        "sample": {"max_new_tokens": 8, "prompts": ["ROMEO:"]},
    }
    (root / "r.toml").write_text(tomli_w.dumps(raw))
    res = lmforge("run", "r.toml", cwd=root)
    return root, res


def test_run_streams_raw_jsonl_without_shards(corpus):
    root, res = corpus
    assert not (root / "never").exists(), "streaming mode must not write shards"
    assert sorted(losses(root / "run")) == list(range(1, STEPS + 1))
    final = orjson.loads((root / "run/eval/final.json").read_bytes())
    assert final["tokens"] > 1000 and 0 < final["bpb"] < 10
    assert "bits per byte" in res.stdout and "--- sample: 'ROMEO:'" in res.stdout


def test_slowload_gives_the_same_run_as_ring(corpus):
    """The naive loader yields the ring loader's batches, so the losses are bit-identical."""
    root, _ = corpus
    lmforge("train", "r.toml", "--slowload", "--set", f"train.run_dir={root / 'slow'}", cwd=root)
    assert losses(root / "slow") == losses(root / "run")
    saved = orjson.loads((root / "slow/checkpoints/latest/state.json").read_bytes())
    assert saved["recipe"]["data"]["loader"] == "naive"


def test_streaming_stop_and_resume_is_bit_identical(corpus):
    root, _ = corpus
    run = f"train.run_dir={root / 'resumed'}"
    res = lmforge("train", "r.toml", "--set", run, "--stop-at", "4", cwd=root, check=False)
    assert res.returncode == 130 and "--resume" in res.stderr
    lmforge("train", "r.toml", "--set", run, "--resume", cwd=root)
    assert losses(root / "resumed") == losses(root / "run")


def test_training_stops_cleanly_when_the_epochs_run_out(corpus):
    root, _ = corpus
    res = lmforge("train", "r.toml", "--set", f"train.run_dir={root / 'epoch'}", "--set", "data.epochs=1",
                  "--set", "train.max_steps=100000", "--set", "train.micro_batch_size=16", cwd=root)
    assert "the training data ran out (data.epochs = 1)" in res.stdout
    steps = sorted(losses(root / "epoch"))
    assert 2 < steps[-1] < 100000
    assert os.readlink(root / "epoch/checkpoints/latest") == f"step_{steps[-1]:06d}"
    assert (root / "epoch/eval/final.json").is_file()
