"""Export a checkpoint as a Hugging Face model dir, a GGUF file or native safetensors; upload to the Hub.

Every export is built in a temporary sibling and renamed into place, so an interrupted or refused
export leaves nothing behind, and each carries `lmforge_export.json` saying what it is and what made it.
GGUF (Llama architecture only) is written as F32, F16, BF16 or Q8_0 (2-D weights; norms stay F32).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge import __version__
from lmforge.checkpoint import TOKENIZER_FILES, model_state, read_state, resolve_checkpoint, verify_files
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.fsutil import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, read_json, sha256_file
from lmforge.models.hf import ARCHITECTURES, InteropError, check_exportable, save_sharded, to_hf_config, to_hf_state

FORMATS = ("hf", "gguf", "safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GGUF_TYPES = ("fp32", "fp16", "bf16", "q8_0")
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
EXPORT_INFO = "lmforge_export.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3  # below Hugging Face's 5 GB default; larger models get an index
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class Source:
    """A verified checkpoint, ready to convert."""

    path: Path
    state: dict[str, Any]
    cfg: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Any


def load_source(ckpt: str | Path) -> Source:
    """Resolve and check a checkpoint: checksums, config, weights that fit the config, tokenizer."""
    from lmforge.generate import load_for_inference

    path = resolve_checkpoint(ckpt)
    verify_files(path)
    state = read_state(path)
    if "files" not in state:
        raise CheckpointError(f"{path}/state.json lists no files; it is incomplete")
    model, tokenizer, _ = load_for_inference(path)
    return Source(path, state, model.cfg, model_state(model), tokenizer)


def _check_out(out: Path, src: Path, force: bool) -> None:
    if out.exists() and not force:
        raise InteropError(f"{out} already exists; pass --force to replace it")
    out_r, src_r = out.resolve(), src.resolve()
    if out_r == src_r or out_r in src_r.parents:
        raise InteropError(f"{out} holds the checkpoint being exported; choose another --out")


def export_checkpoint(ckpt: str | Path, out: str | Path, fmt: str, dtype: str = "fp32", *,
                      force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      log: Callable[[str], Any] = print) -> Path:
    """Write `ckpt` to `out` in format `fmt` ("hf" | "gguf" | "safetensors"); return what was written."""
    if fmt not in FORMATS:
        raise InteropError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    allowed = GGUF_TYPES if fmt == "gguf" else tuple(DTYPES)
    if dtype not in allowed:
        raise InteropError(f"--dtype {dtype} is not available for {fmt}; choose one of {', '.join(allowed)}")
    out = Path(out)
    _check_out(out, resolve_checkpoint(ckpt), force)  # before the (possibly large) weights are read
    src = load_source(ckpt)
    _check_format(src, fmt)  # before anything is written
    t0 = time.perf_counter()
    if fmt == "gguf" and out.suffix == ".gguf":
        with atomic_path(out) as tmp:
            _write_gguf(src, tmp, dtype)
    else:
        with atomic_dir(out) as tmp:
            if fmt == "hf":
                _write_hf(src, tmp, dtype, max_shard_bytes)
            elif fmt == "safetensors":
                _write_native(src, tmp, dtype)
            else:
                _write_gguf(src, tmp / "model.gguf", dtype)
            atomic_write_json(tmp / EXPORT_INFO, _export_info(src, fmt, dtype, tmp))
    log(f"export: {fmt} ({dtype}) of {src.path} -> {out} in {time.perf_counter() - t0:.1f}s")
    return out


def _check_format(src: Source, fmt: str) -> None:
    if fmt in ("hf", "gguf") and src.cfg.objective != "autoregressive":
        raise InteropError(f"model.objective={src.cfg.objective!r}: {fmt} has no such architecture (causal LMs "
                           "only); export it with --format safetensors")
    if fmt == "hf":
        check_exportable(src.cfg)
    elif fmt == "gguf":
        if src.cfg.arch != "llama":
            raise InteropError(f"GGUF export supports arch='llama' only (this model is {src.cfg.arch!r}); "
                               "use --format hf for it")
        check_exportable(src.cfg)
        _gguf_vocab(src)  # refuses a tokenizer GGUF cannot carry


def _export_info(src: Source, fmt: str, dtype: str, folder: Path) -> dict[str, Any]:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {"format": f"lmforge-export-{fmt}", "version": 1, "dtype": dtype, "files": files,
            "source_checkpoint": str(src.path), "step": src.state.get("step"),
            "model_config": src.cfg.model_dump(mode="json"),
            "tokenizer_fingerprint": src.tokenizer.fingerprint,
            "made_by": {"lmforge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


def _cast(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    return {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}


# ---- native ----------------------------------------------------------------------------------------
def _copy_tokenizer(src: Source, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src.path / name).is_file():
            shutil.copy2(src.path / name, dst / name)


def _write_native(src: Source, dst: Path, dtype: str) -> None:
    """The smallest dir `lmforge generate/serve` loads: weights, state.json with the config, tokenizer."""
    save_file(_cast(src.weights, dtype), str(dst / "model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(src, dst)
    keep = ("step", "tokens_seen", "best_val_loss", "val", "lmforge_version", "tokenizer_fingerprint")
    state = {k: src.state[k] for k in keep if k in src.state}
    files = {"model.safetensors": sha256_file(dst / "model.safetensors")}
    state.update(model_config=src.cfg.model_dump(mode="json"), files=files)
    atomic_write_json(dst / "state.json", state)


# ---- Hugging Face ----------------------------------------------------------------------------------
def _chat_template(src: Source) -> str | None:
    """An SFT model's chat template, wherever the checkpoint keeps it."""
    found = getattr(src.tokenizer, "chat_template", None) or src.state.get("chat_template")
    if not found and (src.path / "tokenizer_config.json").is_file():
        found = read_json(src.path / "tokenizer_config.json").get("chat_template")
    if not found and (src.path / "chat_template.jinja").is_file():
        found = (src.path / "chat_template.jinja").read_text(encoding="utf-8")
    return found or None


def _write_hf_tokenizer(src: Source, dst: Path) -> None:
    tok = src.tokenizer
    atomic_write_text(dst / "tokenizer.json", tok.to_hf_json())
    base_path = src.path / "tokenizer_config.json"
    base = read_json(base_path) if base_path.is_file() else {}
    base.pop("auto_map", None)  # remote tokenizer code would need trust_remote_code to load
    cfg = {**base, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": src.cfg.seq_len,
           "clean_up_tokenization_spaces": False}
    for role in ("bos", "eos", "pad"):
        if role in tok.roles:
            cfg[f"{role}_token"] = tok.roles[role]
    template = _chat_template(src)
    if template:
        cfg["chat_template"] = template
    atomic_write_json(dst / "tokenizer_config.json", cfg)
    if (src.path / "lmforge_tokenizer.json").is_file():  # lets lmforge reload the exact tokenizer
        shutil.copy2(src.path / "lmforge_tokenizer.json", dst / "lmforge_tokenizer.json")


def _write_hf(src: Source, dst: Path, dtype: str, max_shard_bytes: int) -> None:
    tok, cfg = src.tokenizer, src.cfg
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    hf_cfg = to_hf_config(cfg, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          dtype=HF_DTYPE_NAMES[dtype])
    atomic_write_json(dst / "config.json", hf_cfg)
    save_sharded(_cast(to_hf_state(cfg, src.weights), dtype), dst, max_shard_bytes)
    atomic_write_json(dst / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
    _write_hf_tokenizer(src, dst)
    atomic_write_text(dst / "README.md", model_card(src, dtype))


def _model_name(src: Source) -> str:
    recipe_name = (src.state.get("recipe") or {}).get("name")
    in_run = src.path.parent.name == "checkpoints"  # runs/<name>/checkpoints/step_X
    return recipe_name or (src.path.parent.parent.name if in_run else src.path.name)


def model_card(src: Source, dtype: str, repo_id: str | None = None) -> str:
    """A Hugging Face model card: what the model is, how it was trained, how to load it."""
    cfg, st, tok = src.cfg, src.state, src.tokenizer
    n_total = sum(v.numel() for k, v in src.weights.items())
    n_emb = sum(v.numel() for k, v in src.weights.items()
                if k in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight"))
    recipe = st.get("recipe") or {}
    data = (recipe.get("data") or {}).get("source", "unknown")
    val = st.get("val") or {}
    val_loss = st.get("best_val_loss")
    val_txt = "not measured" if val_loss is None else f"{val_loss:.4f}"
    if isinstance(val, dict) and val.get("val/bpb") is not None:
        val_txt += f" (bits per byte {val['val/bpb']:.4f})"
    where = repo_id or "path/to/this/dir"
    bos = src.tokenizer.roles.get("bos")
    bos_note = (f"lmforge starts every document with `{bos}`; prepend it as above for the best results.\n"
                if bos else "")
    prefix = "[tok.bos_token_id] + " if bos else ""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [lmforge, {cfg.arch}, causal-lm]
---
# {_model_name(src)}

A small decoder-only Transformer pretrained with lmforge {__version__}.

| | |
|---|---|
| architecture | `{ARCHITECTURES[cfg.arch]}`: {cfg.n_layer} layers, {cfg.n_head} heads \
({cfg.kv_heads} key/value), width {cfg.n_embd}, MLP {cfg.hidden_dim}, context {cfg.seq_len}, \
{"tied" if cfg.tie_embeddings else "untied"} embeddings, bias {"on" if cfg.bias else "off"} |
| parameters | {n_total:,} ({n_total - n_emb:,} non-embedding) |
| training | {st.get("step", 0):,} steps, {st.get("tokens_seen", 0):,} tokens |
| data | `{data}` |
| tokenizer | {tok.kind}, vocab {tok.vocab_size}, fingerprint `{tok.fingerprint[:12]}` |
| validation loss | {val_txt} |
| weights | {dtype} |

## How to load

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForCausalLM.from_pretrained("{where}")
ids = {prefix}tok.encode("Once upon a time", add_special_tokens=False)
out = model.generate(torch.tensor([ids]), max_new_tokens=50, do_sample=False)
print(tok.decode(out[0]))
```

{bos_note}lmforge never reads special-token text in ordinary input as a special token; the Hugging Face
tokenizer does unless loaded with `split_special_tokens=True`.
"""


# ---- GGUF ------------------------------------------------------------------------------------------
def _gguf_vocab(src: Source) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for `tokenizer.ggml.*`, padded to the model's vocab size."""
    import orjson
    from gguf import TokenType

    from lmforge.tokenizer import GPT4_PATTERN

    tok = src.tokenizer
    if tok.kind not in ("bpe", "byte") or tok.pattern != GPT4_PATTERN:
        raise InteropError(f"GGUF export needs an lmforge-trained BPE tokenizer with the GPT-4 split pattern "
                           f"(this one is {tok.kind!r}); use --format hf")
    data = orjson.loads(tok.to_hf_json())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    specials = {i: t for t, i in tok.special_tokens.items()}
    tokens, types = [], []
    for i in range(src.cfg.vocab_size):  # ids past the tokenizer (a padded vocab) are never produced
        if i in specials:
            tokens.append(specials[i])
            types.append(int(TokenType.CONTROL))
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return tokens, types, merges


def gguf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split RoPE rows → llama.cpp's interleaved pairs, per head (weights or biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensors(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = to_hf_state(cfg, weights)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    for key, t in hf.items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            continue
        i, part, kind = m.groups()
        if part == "self_attn.q_proj":
            t = gguf_permute(t, cfg.n_head)
        elif part == "self_attn.k_proj":
            t = gguf_permute(t, cfg.kv_heads)
        out[f"blk.{i}.{names[part]}.{kind}"] = t
    return out


def _write_gguf(src: Source, path: Path, dtype: str) -> None:
    import gguf

    cfg, tok = src.cfg, src.tokenizer
    qtypes = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    ftypes = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(_model_name(src))
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(ftypes[dtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = _gguf_vocab(src)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("llama-bpe")  # the Llama 3 split regex, equivalent to our GPT-4 pattern
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for role, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if tid is not None:
            getattr(w, f"add_{role}_token_id")(tid)
    w.add_add_bos_token(tok.bos_id is not None)  # lmforge starts every document with bos
    if template := _chat_template(src):
        w.add_chat_template(template)
    for name, t in _gguf_tensors(cfg, src.weights).items():
        arr = t.float().numpy()
        qtype = qtypes[dtype] if arr.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and arr.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 wide
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- Hub -------------------------------------------------------------------------------------------
def upload_files(folder: str | Path) -> list[str]:
    """The files `hub upload` would send: every regular, non-hidden file of an export dir."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InteropError(f"{folder} is not a directory")
    if not (folder / EXPORT_INFO).is_file() and not (folder / "config.json").is_file():
        raise InteropError(f"{folder} is not an export dir (no {EXPORT_INFO} or config.json); "
                           "make one with `lmforge export CKPT --format hf --out DIR`")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not any(f.endswith((".safetensors", ".gguf")) for f in files):
        raise InteropError(f"{folder} holds no weights (*.safetensors or *.gguf)")
    return files


def hub_upload(folder: str | Path, repo_id: str, private: bool = False, *, api: Any = None) -> str:
    """Create `repo_id` if needed and upload the export dir; returns the repo URL."""
    if not REPO_RE.match(repo_id):
        raise InteropError(f"--repo {repo_id!r}: expected USER/NAME")
    files = upload_files(folder)
    if api is None:
        try:
            import huggingface_hub as hub
        except ImportError:
            raise InteropError("hub upload needs huggingface_hub: pip install huggingface_hub") from None
        token = hub.get_token()  # HF_TOKEN, else the saved `hf auth login`
        if not token:
            raise InteropError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
        api = hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", allow_patterns=files,
                          commit_message=f"Upload with lmforge {__version__}")
    except Exception as err:  # network and Hub errors come in many types; the message is what matters
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise InteropError(f"upload to {repo_id} failed: {first}") from None
    return str(url)
