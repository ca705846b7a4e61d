"""`lmforge export / import hf / hub upload` as a user runs them: exit codes, one-line errors, files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer


def lmforge(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=120)


def one_line_error(res: subprocess.CompletedProcess, match: str) -> None:
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], res.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=64, vocab_size=512)
    state = {"model_config": cfg.model_dump(mode="json"), "tokens_seen": 100}
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "checkpoints", 5, Transformer(cfg), state,
                           tokenizer_dir=tiny_tokenizer_dir)


def test_export_refuses_existing_out(ckpt, tmp_path):
    run_dir = ckpt.parent.parent  # a run dir resolves to its latest checkpoint
    res = lmforge("export", run_dir, "--format", "hf", "--out", tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "README.md").is_file()
    one_line_error(lmforge("export", ckpt, "--format", "hf", "--out", tmp_path / "hf"), "--force")


def test_bad_input_fails_in_one_line(ckpt, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-3] ^= 0x55
    (broken / "model.safetensors").write_bytes(bytes(data))
    one_line_error(lmforge("export", broken, "--out", tmp_path / "o1"), "damaged")
    one_line_error(lmforge("import", "hf", tmp_path / "nowhere", "--out", tmp_path / "o2"), "not a directory")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o", "."))]


def test_hub_upload_without_token(tmp_path):
    pytest.importorskip("huggingface_hub")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    one_line_error(lmforge("hub", "upload", folder, "--repo", "me/tiny", env=env), "HF_TOKEN")


@pytest.mark.slow
def test_export_import_generate(ckpt, tmp_path):
    res = lmforge("export", ckpt, "--format", "hf", "--out", tmp_path / "hf", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    res = lmforge("export", ckpt, "--format", "hf", "--out", tmp_path / "hf", "--force")
    assert res.returncode == 0, res.stderr
    res = lmforge("import", "hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert res.returncode == 0, res.stderr
    res = lmforge("generate", tmp_path / "back", "--prompt", "ROMEO:", "--max-new-tokens", "5",
                  "--temperature", "0")
    assert res.returncode == 0 and res.stdout.startswith("ROMEO:"), res.stderr
    (tmp_path / "hf" / "config.json").write_text("{}")
    one_line_error(lmforge("import", "hf", tmp_path / "hf", "--out", tmp_path / "o3"), "model_type")
    one_line_error(lmforge("export", ckpt, "--format", "onnx", "--out", tmp_path / "o4"), "onnx")


@pytest.mark.slow
def test_native_and_gguf_exports(ckpt, tmp_path):
    res = lmforge("export", ckpt, "--format", "safetensors", "--out", tmp_path / "native")
    assert res.returncode == 0, res.stderr
    res = lmforge("generate", tmp_path / "native", "--prompt", "To be", "--max-new-tokens", "3")
    assert res.returncode == 0, res.stderr
    pytest.importorskip("gguf")
    res = lmforge("export", ckpt, "--format", "gguf", "--dtype", "q8_0", "--out", tmp_path / "m.gguf")
    assert res.returncode == 0 and (tmp_path / "m.gguf").stat().st_size > 0, res.stderr
