"""Export/import plumbing without transformers: key maps, config conversion, refusals, atomicity, Hub plan."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import model_state, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.export import EXPORT_INFO, export_checkpoint, hub_upload, upload_files
from lmforge.generate import load_for_inference
from lmforge.models.hf import (
    InteropError,
    check_exportable,
    from_hf_config,
    from_hf_state,
    import_hf_checkpoint,
    read_hf_weights,
    save_sharded,
    to_hf_config,
    to_hf_state,
)
from lmforge.models.transformer import Transformer

CONFIGS = [
    dict(arch="llama", n_kv_head=2, tie_embeddings=False, bias=False),
    dict(arch="llama", n_kv_head=4, tie_embeddings=True, bias=True, rope_theta=500.0, norm_eps=1e-6),
    dict(arch="gpt2", tie_embeddings=True, bias=True),
    dict(arch="gpt2", tie_embeddings=False, bias=False, mlp_hidden=96),
]


def tiny_model(vocab: int = 512, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 64, "seq_len": 64, "vocab_size": vocab, **kw})
    return Transformer(cfg).eval()


def save_tiny(root: Path, tok_dir: Path, **kw) -> Path:
    m = tiny_model(**kw)
    state = {"model_config": m.cfg.model_dump(mode="json"), "tokens_seen": 4096, "best_val_loss": 4.5}
    return save_checkpoint(root, 3, m, state, tokenizer_dir=tok_dir)


@pytest.fixture
def ckpt(tmp_path: Path, tiny_tokenizer_dir: Path) -> Path:
    return save_tiny(tmp_path / "ckpts", tiny_tokenizer_dir, arch="llama", n_kv_head=2)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda k: f"{k['arch']}-bias{k['bias']}-tie{k['tie_embeddings']}")
def test_state_round_trip_is_exact(kw):
    m = tiny_model(**kw)
    sd = model_state(m)
    hf_cfg = to_hf_config(m.cfg, bos_id=1, eos_id=2, pad_id=None)
    cfg = from_hf_config(hf_cfg)
    for field in ("arch", "n_layer", "n_head", "kv_heads", "n_embd", "seq_len", "vocab_size", "hidden_dim",
                  "tie_embeddings", "norm_eps"):
        assert getattr(cfg, field) == getattr(m.cfg, field), field
    if m.cfg.arch == "llama":
        assert cfg.rope_theta == m.cfg.rope_theta and cfg.bias == m.cfg.bias
    hf_sd = to_hf_state(m.cfg, sd)
    if m.cfg.arch == "gpt2":  # Conv1D stores (in, out); biases always present
        assert hf_sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 3 * 64)
        assert "transformer.h.1.mlp.c_fc.bias" in hf_sd
    back = from_hf_state(m.cfg, hf_sd)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_llama_split_layout():
    m = tiny_model(arch="llama", n_kv_head=2)
    sd = model_state(m)
    hf = to_hf_state(m.cfg, sd)
    qkv = sd["blocks.0.attn.qkv.weight"]
    assert torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], qkv[:64])
    assert torch.equal(hf["model.layers.0.self_attn.k_proj.weight"], qkv[64:96])
    assert torch.equal(hf["model.layers.0.self_attn.v_proj.weight"], qkv[96:])
    up = sd["blocks.1.mlp.up.weight"]
    assert torch.equal(hf["model.layers.1.mlp.gate_proj.weight"], up[: m.cfg.hidden_dim])
    assert "lm_head.weight" not in hf  # tied


def test_unexpressible_options_are_refused():
    with pytest.raises(InteropError, match="n_kv_head=2"):
        check_exportable(tiny_model(arch="gpt2", n_kv_head=2).cfg)
    base = to_hf_config(tiny_model(arch="llama").cfg, bos_id=None, eos_id=None, pad_id=None)
    bad = [({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "llama3"),
           ({"hidden_act": "gelu"}, "hidden_act"), ({"head_dim": 32}, "head_dim"),
           ({"attention_bias": True, "mlp_bias": False}, "mlp_bias"), ({"model_type": "qwen2"}, "qwen2")]
    for change, match in bad:
        with pytest.raises(InteropError, match=match):
            from_hf_config({**base, **change})
    gpt2 = to_hf_config(tiny_model(arch="gpt2").cfg, bos_id=None, eos_id=None, pad_id=None)
    with pytest.raises(InteropError, match="activation_function"):
        from_hf_config({**gpt2, "activation_function": "relu"})
    with pytest.raises(InteropError, match="learned positions"):
        from_hf_config(gpt2, seq_len=1000)


def test_unknown_and_missing_hf_weights_are_named():
    m = tiny_model(arch="llama")
    hf = to_hf_state(m.cfg, model_state(m))
    with pytest.raises(InteropError, match="extra.weight"):
        from_hf_state(m.cfg, {**hf, "model.extra.weight": torch.zeros(1)})
    del hf["model.norm.weight"]
    with pytest.raises(InteropError, match="model.norm.weight"):
        from_hf_state(m.cfg, hf)


def test_sharding_writes_an_index(tmp_path):
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    names = save_sharded(tensors, tmp_path, max_shard_bytes=2048)
    assert names[-1] == "model.safetensors.index.json" and len(names) == 4
    back = read_hf_weights(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    (tmp_path / names[0]).unlink()
    with pytest.raises(InteropError, match="missing"):
        read_hf_weights(tmp_path)


def test_native_export_loads_and_matches(ckpt, tmp_path):
    out = export_checkpoint(ckpt, tmp_path / "native", "safetensors", log=lambda _: None)
    a, tok_a, _ = load_for_inference(ckpt)
    b, tok_b, state = load_for_inference(out)
    x = torch.randint(0, 512, (2, 20))
    assert torch.equal(a(x), b(x))
    assert tok_a.fingerprint == tok_b.fingerprint and state["tokens_seen"] == 4096
    assert not (out / "optim_rank0.pt").exists() and (out / EXPORT_INFO).is_file()
    half = export_checkpoint(ckpt, tmp_path / "half", "safetensors", "bf16", log=lambda _: None)
    assert load_file(str(half / "model.safetensors"))["tok_emb.weight"].dtype == torch.bfloat16
    c, _, _ = load_for_inference(half)
    assert (a(x) - c(x)).abs().max() < 0.05


def test_hf_export_files_and_card(ckpt, tmp_path):
    out = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", EXPORT_INFO} <= names
    card = (out / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "4,096 tokens" in card and "4.5000" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_refusals_leave_nothing_behind(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InteropError, match="--force"):
        export_checkpoint(ckpt, out, "hf")
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(ckpt, out, "hf", force=True, log=lambda _: None)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(InteropError, match="format"):
        export_checkpoint(ckpt, tmp_path / "x", "onnx")
    with pytest.raises(InteropError, match="q8_0"):
        export_checkpoint(ckpt, tmp_path / "x", "hf", "q8_0")
    with pytest.raises(InteropError, match="holds the checkpoint"):
        export_checkpoint(ckpt, ckpt.parent, "hf", force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_damaged_or_incomplete_checkpoints(tmp_path, tiny_tokenizer_dir):
    def fresh(name):
        return save_tiny(tmp_path / name, tiny_tokenizer_dir, arch="llama")

    bad = fresh("flip")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    no_tok = fresh("notok")
    for name in ("tokenizer.json", "lmforge_tokenizer.json"):
        (no_tok / name).unlink()
    no_state = fresh("nostate")
    (no_state / "state.json").write_text("{not json")
    for path, match in ((bad, "damaged"), (no_tok, "tokenizer"), (no_state, "cannot be read"),
                        (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(LmforgeError, match=match):
            export_checkpoint(path, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


def test_import_refuses_incomplete_dirs(ckpt, tmp_path):
    hf = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(InteropError, match="tokenizer.json is missing"):
        import_hf_checkpoint(broken, tmp_path / "c1")
    (broken / "model.safetensors").unlink()
    with pytest.raises(InteropError, match="no model.safetensors"):
        import_hf_checkpoint(broken, tmp_path / "c2")
    (broken / "config.json").unlink()
    with pytest.raises(InteropError, match="config.json is missing"):
        import_hf_checkpoint(broken, tmp_path / "c3")
    (hf / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(InteropError, match="cannot be read"):
        import_hf_checkpoint(hf, tmp_path / "c4")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("c1", "c2", "c3", "c4", "."))]


def test_import_round_trip_matches(ckpt, tmp_path):
    hf = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    back = import_hf_checkpoint(hf, tmp_path / "back", log=lambda _: None)
    a, _, _ = load_for_inference(ckpt)
    b, tok, state = load_for_inference(back)
    x = torch.randint(0, 512, (2, 16))
    assert torch.equal(a(x), b(x))
    assert state["step"] == 0 and state["imported_from"]["architecture"] == "LlamaForCausalLM"
    assert tok.encode("To be, or not") == load_for_inference(ckpt)[1].encode("To be, or not")


def test_gpt2_zero_biases_import_as_bias_free(tmp_path, tiny_tokenizer_dir):
    ck = save_tiny(tmp_path / "c", tiny_tokenizer_dir, arch="gpt2", bias=False)
    hf = export_checkpoint(ck, tmp_path / "hf", "hf", log=lambda _: None)
    assert not load_file(str(hf / "model.safetensors"))["transformer.h.0.ln_1.bias"].any()
    back = import_hf_checkpoint(hf, tmp_path / "back", log=lambda _: None)
    assert load_for_inference(back)[0].cfg.bias is False
    sd = load_file(str(hf / "model.safetensors"))
    sd["transformer.h.0.attn.c_proj.bias"] += 0.5
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    again = import_hf_checkpoint(hf, tmp_path / "again", log=lambda _: None)
    assert load_for_inference(again)[0].cfg.bias is True


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))


def test_hub_upload_sends_the_export_dir(ckpt, tmp_path, monkeypatch):
    hf = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    (hf / ".cache").mkdir()
    (hf / ".cache" / "junk").write_text("x")
    files = upload_files(hf)
    assert "model.safetensors" in files and "README.md" in files and not any(".cache" in f for f in files)
    api = FakeHub()
    url = hub_upload(hf, "someone/tiny-llama", private=True, api=api)
    assert url.endswith("someone/tiny-llama")
    assert api.calls[0] == ("create_repo", "someone/tiny-llama",
                            {"private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[1][1]["allow_patterns"] == files and api.calls[1][1]["folder_path"] == str(hf)
    with pytest.raises(InteropError, match="USER/NAME"):
        hub_upload(hf, "no-slash", api=api)
    with pytest.raises(InteropError, match="not an export dir"):
        hub_upload(tmp_path, "a/b", api=api)
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(InteropError, match="HF_TOKEN"):
        hub_upload(hf, "a/b")


def test_original_gpt2_key_names_import(tmp_path, tiny_tokenizer_dir):
    """The first GPT-2 checkpoints name weights without `transformer.` and carry attention-mask buffers."""
    ck = save_tiny(tmp_path / "c", tiny_tokenizer_dir, arch="gpt2", bias=True)
    hf = export_checkpoint(ck, tmp_path / "hf", "hf", log=lambda _: None)
    sd = load_file(str(hf / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    old.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
    (hf / "model.safetensors").unlink()
    torch.save(old, hf / "pytorch_model.bin")
    back = import_hf_checkpoint(hf, tmp_path / "back", seq_len=32, log=lambda _: None)
    a, _, _ = load_for_inference(ck)
    b, _, _ = load_for_inference(back)
    assert b.cfg.seq_len == 32
    x = torch.randint(0, 512, (2, 32))
    assert torch.equal(a(x), b(x))


def test_gpt2_with_gqa_is_refused_before_writing(tmp_path, tiny_tokenizer_dir):
    ck = save_tiny(tmp_path / "c", tiny_tokenizer_dir, arch="gpt2", n_kv_head=2)
    with pytest.raises(InteropError, match="n_kv_head=2"):
        export_checkpoint(ck, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
