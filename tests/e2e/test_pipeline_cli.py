"""The CLI as a user runs it: subprocesses in a scratch directory."""

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

TINY = [
    "--set", "model.preset=tiny", "--set", "tokenizer.vocab_size=320", "--set", "tokenizer.max_train_chars=200000",
    "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "train.log_every=2",
    "--set", "train.micro_batch_size=4", "--set", "train.warmup_steps=2", "--set", "eval.batches=2",
    "--set", "sample.max_new_tokens=8", "--set", "sample.prompts=['ROMEO:']",
]


def lmforge(*args, cwd, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    res = lmforge("demo", *TINY, cwd=cwd)
    return cwd, res


def test_demo_leaves_a_complete_run_dir(demo_dir):
    cwd, res = demo_dir
    run = cwd / "runs" / "demo"
    for rel in ("config.toml", "metrics.jsonl", "plots/loss.png", "samples.txt", "eval/final.json",
                "checkpoints/latest", "checkpoints/best", "checkpoints/step_000008/model.safetensors",
                "checkpoints/step_000008/state.json", "checkpoints/step_000008/optim_rank0.pt",
                "tokenizer/tokenizer.json", "shards/manifest.json"):
        assert (run / rel).exists(), rel
    rows = [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8]
    assert {"val/loss", "val/bpb"} <= set().union(*rows)
    final = orjson.loads((run / "eval/final.json").read_bytes())
    assert final["bpb"] > 0 and final["tokens"] > 0
    assert (run / "plots/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bits per byte" in res.stdout and "--- sample: 'ROMEO:'" in res.stdout
    assert 'preset = "tiny"' in (run / "config.toml").read_text()


def test_second_demo_reuses_tokenizer_and_shards(demo_dir):
    cwd, _ = demo_dir
    res = lmforge("demo", *TINY, cwd=cwd)
    assert "tokenizer: up to date" in res.stdout
    assert "shards: up to date" in res.stdout


def test_generate_is_deterministic_at_temperature_zero(demo_dir):
    cwd, _ = demo_dir
    args = ("generate", "runs/demo", "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "12")
    a, b = lmforge(*args, cwd=cwd), lmforge(*args, cwd=cwd)
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:")


def test_info_and_plot(demo_dir):
    cwd, _ = demo_dir
    out = lmforge("info", "runs/demo", cwd=cwd).stdout
    assert "step: 8" in out and "non-embedding" in out and "model.arch = llama" in out
    assert lmforge("plot", "runs/demo", cwd=cwd).stdout.strip().endswith("lr.png")


def test_train_refuses_to_overwrite_and_resume_continues(demo_dir):
    cwd, _ = demo_dir
    recipe = cwd / "r.toml"
    recipe.write_text("")
    res = lmforge("train", str(recipe), *TINY, cwd=cwd, check=False)
    assert res.returncode == 1 and "--resume" in res.stderr and "Traceback" not in res.stderr
    res = lmforge("train", str(recipe), *TINY, "--resume", "--set", "train.max_steps=10", cwd=cwd)
    assert "resumed from" in res.stdout and "step 10/10" in res.stdout
    res = lmforge("train", str(recipe), *TINY, "--resume", "--set", "model.n_layer=3", cwd=cwd, check=False)
    assert res.returncode == 1 and "model.n_layer: 2 -> 3" in res.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["demo", "--set", "data.source=missing.txt"], "missing.txt"),
        (["demo", "--set", "train.max_steps=abc"], "train.max_steps"),
        (["demo", "--set", "tokenizer.vocab_size=258"], "tokenizer.vocab_size"),
        (["generate", "nowhere"], "nowhere does not exist"),
        (["generate", "."], "is not a checkpoint"),
    ],
)
def test_bad_input_gives_one_clean_line(tmp_path, args, fragment):
    res = lmforge(*args, cwd=tmp_path, check=False)
    assert res.returncode == 1, res.stderr
    assert fragment in res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("*.tmp"))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    res = lmforge("demo", "--set", "data.source=empty.txt", cwd=tmp_path, check=False)
    assert res.returncode == 1 and "empty.txt" in res.stderr and "Traceback" not in res.stderr


def test_shards_from_another_tokenizer_are_refused(demo_dir, tmp_path):
    cwd, _ = demo_dir
    other = [*TINY, "--set", "tokenizer.vocab_size=300", "--set", f"tokenizer.dir={tmp_path / 'tok2'}"]
    lmforge("tokenizer", "train", str(cwd / "r.toml"), *other, cwd=cwd)
    res = lmforge("train", str(cwd / "r.toml"), *other, "--fresh", "--set", f"train.run_dir={tmp_path / 'run'}",
                  cwd=cwd, check=False)
    assert res.returncode == 1 and "tokenizer" in res.stderr and "lmforge tokenize" in res.stderr


def test_print_config_and_usage_errors(tmp_path):
    res = lmforge("demo", "--print-config", "--set", "train.max_steps=7", cwd=tmp_path)
    assert "max_steps = 7" in res.stdout and not (tmp_path / "runs").exists()
    assert lmforge("no-such-command", cwd=tmp_path, check=False).returncode == 2
    assert Path(tmp_path).exists()
