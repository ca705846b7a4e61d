"""recipes/diffusion-demo.toml through the CLI as a user runs it (tiny overrides), then its checkpoint's
round trip: info, resume, export (native yes, HF/GGUF refused in one line) and generation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "diffusion-demo.toml"
TINY = [
    "--set", "model.preset=tiny", "--set", "tokenizer.vocab_size=320", "--set", "tokenizer.max_train_chars=200000",
    "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "train.log_every=2",
    "--set", "train.micro_batch_size=4", "--set", "train.warmup_steps=2", "--set", "eval.batches=2",
    "--set", "sample.max_new_tokens=8", "--set", "sample.prompts=['ROMEO:']", "--set", "train.dtype=fp32",
]
RUN = Path("runs") / "diffusion-demo"


def lmforge(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(map(str, args))} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("diffusion-cli")
    return cwd, lmforge("run", RECIPE, *TINY, cwd=cwd)


def test_run_trains_validates_with_the_elbo_and_samples(run_dir):
    cwd, res = run_dir
    run = cwd / RUN
    for rel in ("metrics.jsonl", "samples.txt", "eval/final.json", "checkpoints/step_000008/state.json",
                "tokenizer/tokenizer.json", "shards/manifest.json"):
        assert (run / rel).exists(), rel
    rows = [orjson.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()]
    assert {"train/loss", "val/loss", "val/bpb"} <= set().union(*rows)
    final = orjson.loads((run / "eval/final.json").read_bytes())
    assert final["elbo"] == final["loss"] and final["bpb"] > 0 and final["elbo_samples"] >= 1
    state = orjson.loads((run / "checkpoints/step_000008/state.json").read_bytes())
    assert state["model_config"]["objective"] == "diffusion"
    assert "<|mask|>" in (run / "tokenizer/tokenizer.json").read_text()
    assert "--- sample: 'ROMEO:'" in res.stdout and "bits per byte" in res.stdout
    assert "objective = \"diffusion\"" in (run / "config.toml").read_text()


def test_resume_continues_a_diffusion_run(run_dir):
    cwd, _ = run_dir
    res = lmforge("train", RECIPE, *TINY, "--resume", "--set", "train.max_steps=10", cwd=cwd)
    assert "resumed from" in res.stdout
    assert (cwd / RUN / "checkpoints" / "step_000010").is_dir()


def test_export_refuses_hf_and_gguf_and_writes_native(run_dir):
    cwd, _ = run_dir
    for fmt, out in (("hf", "hf"), ("gguf", "m.gguf")):
        res = lmforge("export", RUN, "--format", fmt, "--out", out, cwd=cwd, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, res.stderr
        assert "objective='diffusion'" in lines[0] and "--format safetensors" in lines[0]
        assert not (cwd / out).exists()
    lmforge("export", RUN, "--format", "safetensors", "--out", "native", cwd=cwd)
    state = orjson.loads((cwd / "native" / "state.json").read_bytes())
    assert state["model_config"]["objective"] == "diffusion"
    assert "objective = diffusion" in lmforge("info", "native", cwd=cwd).stdout.replace('"', "").replace("'", "")


def test_generate_picks_the_diffusion_sampler(run_dir):
    cwd, _ = run_dir
    args = ("generate", RUN, "--prompt", "ROMEO:", "--max-new-tokens", "16", "--steps", "4", "--seed", "1")
    a, b = lmforge(*args, cwd=cwd), lmforge(*args, cwd=cwd)
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:")
    assert "░" not in a.stdout


def test_serve_and_chat_refuse_a_diffusion_model_in_one_line(run_dir):
    cwd, _ = run_dir
    for args in (("serve", RUN, "--port", "65000"), ("chat", RUN)):
        res = lmforge(*args, cwd=cwd, check=False)
        assert res.returncode == 1, res.stderr
        assert "diffusion model" in res.stderr and "--steps" in res.stderr and "Traceback" not in res.stderr
