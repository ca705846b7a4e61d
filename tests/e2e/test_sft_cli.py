"""`lmforge sft prepare` and `lmforge sft` as a user runs them: a tiny base checkpoint, conversations in a
file, the LIMA sample through recipes/sft-lima.toml, and bad input answered in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "sft-lima.toml"
LIMA = ROOT.parent / "shared" / "data" / "samples" / "lima_sample.json"
# until lmforge/cli.py imports lmforge.cli_sft itself, the command is registered here first
MAIN = "import sys, lmforge.cli_sft, lmforge.cli as cli; sys.exit(cli.main(sys.argv[1:]))"
TURNS = ["Who's there?", "Nay, answer me.", "Long live the king!", "Bernardo?", "He.", "You come most carefully",
         "upon your hour.", "'Tis now struck twelve.", "Get thee to bed.", "For this relief much thanks."]


def lmforge(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-c", MAIN, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(map(str, args))} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Recipe
    from lmforge.models.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("sft-cli")
    tok = Tokenizer.load(tiny_tokenizer_dir)
    base = Recipe.model_validate({"model": {"preset": "tiny", "vocab_size": tok.vocab_size},
                                  "train": {"micro_batch_size": 4}})
    torch.manual_seed(0)
    state = {"model_config": base.model.model_dump(mode="json"), "recipe": base.model_dump(mode="json"),
             "tokenizer_fingerprint": tok.fingerprint}
    save_checkpoint(root / "base" / "checkpoints", 3, Transformer(base.model), state, tokenizer_dir=tiny_tokenizer_dir)
    chats = [{"conversations": [TURNS[i % 10], TURNS[(i + 3) % 10]]} for i in range(30)]
    (root / "chats.jsonl").write_bytes(b"\n".join(map(orjson.dumps, chats)) + b"\n")
    bad = chats[:3] + [{"conversations": ["only a question"]}]
    (root / "bad.jsonl").write_bytes(b"\n".join(map(orjson.dumps, bad)) + b"\n")
    return {"root": root, "base": root / "base", "chats": root / "chats.jsonl", "bad": root / "bad.jsonl"}


def tiny(files: dict[str, Path], run: str, source: Path | None = None) -> list[str]:
    return ["--set", f"sft.base={files['base']}", "--set", f"sft.source={source or files['chats']}",
            "--set", f"train.run_dir={files['root'] / run}", "--set", "sft.epochs=2", "--set", "train.lr=1e-3",
            "--set", "sample.max_new_tokens=6", "--set", "sft.too_long=drop"]


@pytest.mark.slow
def test_prepare_then_fine_tune(files):
    run = files["root"] / "run"
    res = lmforge("sft", "prepare", RECIPE, *tiny(files, "run"), cwd=files["root"])
    assert "train: 27/27 kept at 65 tokens" in res.stdout and "supervised tokens" in res.stdout
    assert "[[" in (run / "sft_data" / "examples.txt").read_text()
    res = lmforge("sft", RECIPE, *tiny(files, "run"), cwd=files["root"])
    out = res.stdout
    assert "sft data: up to date" in out and "train.lr" in out and "recipe (base: 0.002)" in out
    assert "train.micro_batch_size      4                         base run" in out
    assert "--- chat:" in out and (run / "chats.txt").is_file()
    ckpt = run / "checkpoints" / "latest"
    cfg = orjson.loads((ckpt / "tokenizer_config.json").read_bytes())
    assert "<|assistant|>" in cfg["chat_template"]
    state = orjson.loads((ckpt / "state.json").read_bytes())
    assert state["model_config"]["vocab_size"] == 516
    assert state["sft"]["base_checkpoint"].endswith("step_000003") and "<|assistant|>" in state["chat_template"]
    assert "before fine-tuning: val loss" in out and state["sft"]["val_before"]["loss"] > 0
    assert "=== before | user:" in (run / "chats.txt").read_text()
    samples = (run / "samples.txt").read_text()
    assert "=== step" in samples and "<|user|>" not in samples  # answered as a chat, template not echoed
    again = lmforge("sft", RECIPE, *tiny(files, "run"), cwd=files["root"], check=False)
    assert again.returncode == 1 and "pass --resume" in again.stderr


@pytest.mark.skipif(not LIMA.is_file(), reason="the LIMA sample (../shared/data/samples) is not here")
def test_lima_recipe_prepares_from_the_repo_root(files):
    out = files["root"] / "lima"
    res = lmforge("sft", "prepare", RECIPE, "--set", f"sft.base={files['base']}", "--set", f"train.run_dir={out}",
                  cwd=ROOT)
    assert "sft data: train:" in res.stdout and "truncated" in res.stdout
    meta = orjson.loads((out / "sft_data" / "meta.json").read_bytes())
    assert meta["records"] == 200 and meta["source"].endswith("lima_sample.json")


def test_bad_input_is_one_line(files):
    res = lmforge("sft", "prepare", RECIPE, *tiny(files, "bad", files["bad"]), "--set", "sft.strict=true",
                  cwd=files["root"], check=False)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "bad.jsonl:4: no assistant answer at the end" in res.stderr
    res = lmforge("sft", RECIPE, *tiny(files, "bad"), "--set", "model.n_layer=5", cwd=files["root"], check=False)
    assert res.returncode == 1 and "SFT keeps the base architecture" in res.stderr
