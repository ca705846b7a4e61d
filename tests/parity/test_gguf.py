"""GGUF export: read back with the `gguf` package and compare every tensor and the metadata; when the
llama.cpp binding (llama_cpp) is installed, also compare its logits, greedy tokens and tokenization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from lmforge.checkpoint import model_state, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.export import export_checkpoint
from lmforge.generate import SamplingParams, generate_ids, load_for_inference
from lmforge.models.hf import InteropError
from lmforge.models.transformer import Transformer

gguf = pytest.importorskip("gguf")

TEXT = "Grüße, naïve café — 日本語 🎉\n\nROMEO: To be, or not to be 1234567!"


def make_checkpoint(root: Path, tok_dir: Path, **kw) -> Path:
    torch.manual_seed(4)
    cfg = ModelConfig(**{"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                         "seq_len": 64, "vocab_size": 520, "tie_embeddings": False, **kw})
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.normal_(0.0, 0.08)
    state = {"model_config": cfg.model_dump(mode="json")}
    return save_checkpoint(root, 1, model, state, tokenizer_dir=tok_dir)


def interleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reference for llama.cpp's RoPE row order: per head, row j of each half goes to rows 2j and 2j+1."""
    hd = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for j in range(hd // 2):
            out[h * hd + 2 * j] = w[h * hd + j]
            out[h * hd + 2 * j + 1] = w[h * hd + hd // 2 + j]
    return out


def expected_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_for_inference(ckpt)
    cfg, sd = model.cfg, model_state(model)
    nq, nkv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            qkv = sd[f"{b}attn.qkv.{p}"]
            gate, up = sd[f"{b}mlp.up.{p}"].chunk(2, dim=0)
            out.update({f"blk.{i}.attn_q.{p}": interleave(qkv[:nq], cfg.n_head),
                        f"blk.{i}.attn_k.{p}": interleave(qkv[nq:nq + nkv], cfg.kv_heads),
                        f"blk.{i}.attn_v.{p}": qkv[nq + nkv:],
                        f"blk.{i}.attn_output.{p}": sd[f"{b}attn.proj.{p}"],
                        f"blk.{i}.ffn_gate.{p}": gate, f"blk.{i}.ffn_up.{p}": up,
                        f"blk.{i}.ffn_down.{p}": sd[f"{b}mlp.down.{p}"]})
        out[f"blk.{i}.attn_norm.weight"] = sd[f"{b}norm1.weight"]
        out[f"blk.{i}.ffn_norm.weight"] = sd[f"{b}norm2.weight"]
    return out


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gguf"), tiny_tokenizer_dir, bias=True)


def test_metadata_and_tokenizer_round_trip(ckpt, tmp_path):
    path = export_checkpoint(ckpt, tmp_path / "m.gguf", "gguf", log=lambda _: None)
    r = gguf.GGUFReader(path)
    model, tok, _ = load_for_inference(ckpt)
    c = model.cfg
    assert field(r, "general.architecture") == "llama"
    for key, want in (("context_length", c.seq_len), ("embedding_length", c.n_embd),
                      ("block_count", c.n_layer), ("feed_forward_length", c.hidden_dim),
                      ("attention.head_count", c.n_head),
                      ("attention.head_count_kv", c.kv_heads), ("rope.dimension_count", c.head_dim)):
        assert field(r, f"llama.{key}") == want, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
    hf_json = orjson.loads(tok.to_hf_json())
    vocab = {i: t for t, i in hf_json["model"]["vocab"].items()}
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size == 520  # the model's vocab is larger than the tokenizer's 512
    assert all(tokens[i] == vocab[i] for i in vocab)
    types = field(r, "tokenizer.ggml.token_type")
    assert all(types[i] == gguf.TokenType.CONTROL for i in tok.special_tokens.values())
    assert types[515] == gguf.TokenType.UNUSED and types[0] == gguf.TokenType.NORMAL
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                 for m in hf_json["model"]["merges"]]
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (tok.bos_id,
                                                                                                 tok.eos_id)
    assert field(r, "tokenizer.ggml.model") == "gpt2"


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 2e-3), ("bf16", 1.6e-2), ("q8_0", 1.5e-2)])
def test_tensors_round_trip(ckpt, tmp_path, dtype, tol):
    out = export_checkpoint(ckpt, tmp_path / "dir", "gguf", dtype, log=lambda _: None)
    r = gguf.GGUFReader(out / "model.gguf")
    want = expected_tensors(ckpt)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(want)
    for name, t in got.items():
        arr = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        ref = want[name].float()
        assert tuple(arr.shape) == tuple(ref.shape), name
        if ref.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32  # norms and biases stay exact
        err = (arr - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()), (name, err)


def test_refusals(tmp_path, tiny_tokenizer_dir):
    gpt2 = make_checkpoint(tmp_path / "g", tiny_tokenizer_dir, arch="gpt2", n_kv_head=4)
    with pytest.raises(InteropError, match="arch='llama'"):
        export_checkpoint(gpt2, tmp_path / "g.gguf", "gguf")
    other = make_checkpoint(tmp_path / "p", tiny_tokenizer_dir)
    (other / "lmforge_tokenizer.json").unlink()  # now a plain "pretrained" Hugging Face tokenizer
    with pytest.raises(InteropError, match="BPE tokenizer"):
        export_checkpoint(other, tmp_path / "p.gguf", "gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=4, tie_embeddings=True, bias=True, rope_theta=500.0)],
                         ids=["gqa-untied", "mha-tied-bias"])
def test_llama_cpp_runs_it_the_same(tmp_path, tiny_tokenizer_dir, kw):
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt = make_checkpoint(tmp_path / "c", tiny_tokenizer_dir, vocab_size=512, **kw)
    path = export_checkpoint(ckpt, tmp_path / "m.gguf", "gguf", log=lambda _: None)
    model, tok, _ = load_for_inference(ckpt)
    # F32 key/value cache: llama.cpp defaults to F16 there, which alone moves logits by ~1e-3
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok.encode(TEXT)
    prompt = [tok.bos_id, *tok.encode("ROMEO:")]
    llm.eval(prompt)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt)]))
    diff = (ours - theirs).abs().max().item()
    print(f"llama.cpp max|Δlogits| = {diff:.3g}")
    assert diff < 1e-4
    want = list(generate_ids(model, prompt, SamplingParams(max_new_tokens=32, temperature=0.0)))
    llm.reset()
    got = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        if t == tok.eos_id or len(got) == 32:
            break
        got.append(t)
    assert got == want
