"""lmforge ⇄ transformers: logits within 1e-5 (fp32), greedy generation token for token, same token ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.export import export_checkpoint
from lmforge.generate import SamplingParams, generate_ids, load_for_inference
from lmforge.models.hf import import_hf_checkpoint
from lmforge.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 512
TOL = 1e-5
UNICODE_TEXT = ("Grüße aus Köln! naïve café, façade — «quoted» “smart” 'single'\n"
                "日本語のテキスト、中文字符，한국어 문장. Ελληνικά και русский текст.\n"
                "Emoji: 🎉🚀👩🏽‍💻 flags 🇫🇷, math ∑∫√∞ ≤ ≥, tabs\tand  double  spaces\r\n"
                "numbers 1234567 3.14159 and symbols @#$%^&*()[]{}<>~` ‽ \u200b zero-width\n\n\nend.")
CONFIGS = {
    "llama-gqa-untied": dict(arch="llama", n_kv_head=2, tie_embeddings=False, bias=False),
    "llama-mha-tied-bias": dict(arch="llama", n_kv_head=4, tie_embeddings=True, bias=True, rope_theta=500.0,
                                norm_eps=1e-6),
    "llama-mqa-untied-bias": dict(arch="llama", n_kv_head=1, tie_embeddings=False, bias=True, mlp_hidden=80),
    "gpt2-tied-bias": dict(arch="gpt2", tie_embeddings=True, bias=True),
    "gpt2-untied-nobias": dict(arch="gpt2", tie_embeddings=False, bias=False, norm_eps=1e-6),
}


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial norms and biases, so a swapped or dropped tensor cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.normal_(0.0, 0.08)


def make_checkpoint(root: Path, tok_dir: Path, **kw) -> Path:
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, seq_len=64, vocab_size=VOCAB, **kw)
    model = Transformer(cfg)
    randomize(model)
    state = {"model_config": cfg.model_dump(mode="json")}
    return save_checkpoint(root, 1, model, state, tokenizer_dir=tok_dir)


def greedy_lmforge(model, prompt: list[int], n: int = 32) -> list[int]:
    return list(generate_ids(model, prompt, SamplingParams(max_new_tokens=n, temperature=0.0)))


def greedy_hf(hf, prompt: list[int], n: int = 32) -> list[int]:
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def compare(ours, hf, vocab: int, seq_len: int) -> float:
    torch.manual_seed(2)
    x = torch.randint(0, vocab, (3, seq_len))
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {name: make_checkpoint(root / name, tiny_tokenizer_dir, **kw) for name, kw in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_logits_and_greedy_match(name, checkpoints, tmp_path):
    ckpt = checkpoints[name]
    out = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    ours, tok, _ = load_for_inference(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    want_class = "LlamaForCausalLM" if CONFIGS[name]["arch"] == "llama" else "GPT2LMHeadModel"
    assert type(hf).__name__ == want_class
    diff = compare(ours, hf, VOCAB, ours.cfg.seq_len)
    print(f"{name}: export max|Δlogits| = {diff:.3g}")
    assert diff < TOL
    prompt = [tok.bos_id, *tok.encode("To be, or not")]
    assert greedy_lmforge(ours, prompt) == greedy_hf(hf, prompt)


def hf_random_model(kind: str):
    torch.manual_seed(3)
    common = dict(vocab_size=VOCAB, bos_token_id=509, eos_token_id=510)
    if kind == "llama":
        rope = {"rope_type": "default", "rope_theta": 1000.0}
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, rms_norm_eps=1e-6, rope_parameters=rope,
                                       attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                       **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_import_logits_and_greedy_match(kind, tmp_path, tiny_tokenizer_dir):
    hf = hf_random_model(kind)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_tokenizer_dir / f, src / f)
    ckpt = import_hf_checkpoint(src, tmp_path / "ckpt", log=lambda _: None)
    ours, tok, _ = load_for_inference(ckpt)
    assert ours.cfg.arch == kind and ours.cfg.bias is True
    diff = compare(ours, hf, VOCAB, 64)
    print(f"{kind}: import max|Δlogits| = {diff:.3g}")
    assert diff < TOL
    prompt = [509, *tok.encode("ROMEO:")]
    assert greedy_lmforge(ours, prompt) == greedy_hf(hf, prompt)


def test_exported_tokenizer_matches(checkpoints, tmp_path):
    ckpt = checkpoints["llama-gqa-untied"]
    out = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    _, tok, _ = load_for_inference(ckpt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(UNICODE_TEXT)
    assert hf_tok.encode(UNICODE_TEXT, add_special_tokens=False) == ids
    assert hf_tok(UNICODE_TEXT)["input_ids"] == ids  # no hidden BOS/EOS post-processing
    assert hf_tok.decode(ids) == tok.decode(ids) == UNICODE_TEXT
    hf_ids = (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert hf_ids == (tok.bos_id, tok.eos_id, tok.pad_id)
    # special-token text: HF reads it as the special token by default; split_special_tokens gives our ids
    text = "a <|eos|> b"
    split = transformers.AutoTokenizer.from_pretrained(out, split_special_tokens=True)
    assert split.encode(text, add_special_tokens=False) == tok.encode(text)


def test_sharded_bf16_and_chat_template(checkpoints, tmp_path):
    ckpt = tmp_path / "sft"
    shutil.copytree(checkpoints["llama-gqa-untied"], ckpt)
    template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
    import orjson

    cfg = orjson.loads((ckpt / "tokenizer_config.json").read_bytes())
    (ckpt / "tokenizer_config.json").write_bytes(orjson.dumps({**cfg, "chat_template": template}))
    out = export_checkpoint(ckpt, tmp_path / "hf", "hf", "bf16", max_shard_bytes=60_000, log=lambda _: None)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.bfloat16
    ours, _, _ = load_for_inference(ckpt)
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits.float()).abs().max() < 0.25  # bf16 rounding of weights and activations
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|bos|>user: hi<|eos|>"
