"""recipes/diffusion-demo.toml through the CLI as a user runs it (tiny overrides), then its checkpoint's
round trip: info, resume, export (native yes, HF/GGUF refused in one line), generation, serving (the
official openai client) and chat (through a pseudo-terminal)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from test_chat import STATS, finish, spawn  # tests/e2e is on sys.path (no packages): the shared helpers
from test_serve import KEY, Server

from lmforge.tokenizer import Tokenizer

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


@pytest.fixture(scope="module")
def server(run_dir):
    cwd, _ = run_dir
    srv = Server(cwd / RUN, "--api-key", KEY, "--steps", "4", "--max-tokens", "32")
    yield srv
    srv.close()


def test_serve_samples_a_diffusion_model_as_generate_does(run_dir, server):
    cwd, _ = run_dir
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    # generate's defaults (temperature 0.8, top-k 50) and the server's --steps
    kw = dict(model="tiny", prompt="ROMEO:", max_tokens=16, temperature=0.8, seed=1, extra_body={"top_k": 50})
    full = client.completions.create(**kw)
    text, finish = full.choices[0].text, full.choices[0].finish_reason
    gen = lmforge("generate", RUN, "--prompt", "ROMEO:", "--max-new-tokens", "16", "--steps", "4", "--seed", "1",
                  cwd=cwd)
    assert gen.stdout == "ROMEO:" + text + "\n"
    tok = Tokenizer.load(cwd / RUN / "tokenizer")
    assert full.usage.prompt_tokens == 1 + len(tok.encode("ROMEO:"))
    # every canvas position when it ran to the end; fewer when <|eos|> ended the text (not counted)
    assert (full.usage.completion_tokens == 16) == (finish == "length") and full.usage.completion_tokens <= 16
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    msgs = [{"role": "user", "content": "Who art thou?"}]
    answer = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, seed=2)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, seed=2, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer.choices[0].message.content
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert models["data"][0]["objective"] == "diffusion"
    assert "a diffusion model, 4 denoising steps" in server.output()


def test_serve_keeps_its_limits_for_a_diffusion_model(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=33)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_redraws_the_canvas_and_takes_steps(run_dir):
    cwd, _ = run_dir
    greedy = ("--max-new-tokens", "16", "--steps", "4", "--temperature", "0")
    answer = lmforge("generate", RUN, "--prompt", "ROMEO:", *greedy, cwd=cwd).stdout[len("ROMEO:"):-1]
    child = spawn("-m", "lmforge", "chat", str(cwd / RUN), "--device", "cpu", *greedy)
    child.expect("masked diffusion in 4 steps")
    child.expect("> ")
    child.sendline("ROMEO:")
    child.expect_exact("\x1b[J" + answer.replace("\n", "\r\n") + "\r\n")  # the last drawing: the answer
    child.expect(STATS)
    child.sendline("/steps 0")
    child.expect("steps must be at least 1")
    child.sendline("/steps 2")
    child.expect("steps 2")
    child.sendline("/help")
    child.expect("/steps K")
    child.sendline("To be")
    child.expect(STATS)
    child.sendline("/quit")
    assert finish(child) == 0
