"""Hugging Face interop: configs and weight names both ways for `LlamaForCausalLM` and `GPT2LMHeadModel`.

Layouts: our `attn.qkv` is [q | k | v] and llama's `mlp.up` is [gate | up], so each splits into HF's
separate projections (and concatenates back). HF GPT-2 uses Conv1D, whose weights are stored (in, out):
the transpose of our Linear. HF GPT-2 always has biases: a `bias=False` model exports zero biases, and
an imported GPT-2 whose biases are all exactly zero comes back as `bias=False` (the same function).
Dropout only matters in training: GPT-2's three dropout fields all carry ours; Llama has only
`attention_dropout`, so a llama model's residual dropout is not represented (inference is unchanged).
Nothing here imports transformers; the files are read and written as plain JSON + safetensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_write_json, read_json

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
# ModelConfig fields this module knows how to express; any other field must keep its default
HANDLED_FIELDS = {"preset", "arch", "n_layer", "n_head", "n_kv_head", "n_embd", "seq_len", "vocab_size",
                  "mlp_hidden", "tie_embeddings", "rope_theta", "bias", "dropout", "norm_eps", "objective"}
GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh")  # both are tanh-approximate GELU, our gpt2 activation
# buffers some HF checkpoints carry that are not weights
IGNORED_HF_KEYS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


class InteropError(LmforgeError):
    """A model, checkpoint or directory cannot be converted to or from another format."""


# ---- config ----------------------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, naming the option, a model that the Hugging Face class for its arch cannot express."""
    defaults = ModelConfig.model_fields
    for name, value in cfg.model_dump().items():
        if name not in HANDLED_FIELDS and value != defaults[name].default:
            raise InteropError(f"model option {name}={value!r} has no Hugging Face equivalent; cannot export")
    if cfg.objective != "autoregressive":
        raise InteropError(f"model.objective={cfg.objective!r} has no Hugging Face causal-LM equivalent")
    if cfg.arch == "gpt2" and cfg.kv_heads != cfg.n_head:
        raise InteropError(f"model.n_kv_head={cfg.n_kv_head} (grouped-query attention) cannot be expressed "
                           "by GPT2LMHeadModel; use arch='llama' for GQA")


def to_hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of the Hugging Face model equal to `cfg`."""
    check_exportable(cfg)
    common = {"architectures": [ARCHITECTURES[cfg.arch]], "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "pad_token_id": pad_id, "initializer_range": 0.02, "use_cache": True, "dtype": dtype}
    if cfg.arch == "llama":
        return {"model_type": "llama", **common, "hidden_size": cfg.n_embd,
                "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
                "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.seq_len,
                "rms_norm_eps": cfg.norm_eps,
                # transformers 5 reads rope_parameters; 4.x and llama.cpp's converter read rope_theta
                "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
                "pretraining_tp": 1}
    return {"model_type": "gpt2", **common, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_positions": cfg.seq_len, "n_ctx": cfg.seq_len, "n_inner": cfg.hidden_dim,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False}


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InteropError(f"unsupported Hugging Face option: {what}")


def _llama_fields(c: dict[str, Any]) -> dict[str, Any]:
    _require(c.get("hidden_act", "silu") == "silu", f"hidden_act={c.get('hidden_act')!r} (only 'silu')")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type == "default", f"RoPE scaling type {rope_type!r} (only plain RoPE)")
    _require(not rope.get("partial_rotary_factor", 1.0) < 1.0, "partial_rotary_factor < 1")
    heads, hidden = c["num_attention_heads"], c["hidden_size"]
    _require(c.get("head_dim") in (None, hidden // heads),
             f"head_dim={c.get('head_dim')} differs from hidden_size / num_attention_heads")
    attn_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    _require(attn_bias == mlp_bias, f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (lmforge has "
             "one `bias` switch for both)")
    return dict(arch="llama", n_layer=c["num_hidden_layers"], n_head=heads,
                n_kv_head=c.get("num_key_value_heads") or heads, n_embd=hidden,
                seq_len=c.get("max_position_embeddings", 2048), mlp_hidden=c["intermediate_size"],
                tie_embeddings=c.get("tie_word_embeddings", False),
                rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                norm_eps=c.get("rms_norm_eps", 1e-6), bias=attn_bias,
                dropout=c.get("attention_dropout", 0.0) or 0.0)


def _gpt2_fields(c: dict[str, Any]) -> dict[str, Any]:
    act = c.get("activation_function", "gelu_new")
    _require(act in GPT2_ACTS, f"activation_function={act!r} (only {' / '.join(GPT2_ACTS)})")
    _require(c.get("scale_attn_weights", True), "scale_attn_weights=false")
    _require(not c.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
    _require(not c.get("add_cross_attention", False), "add_cross_attention=true")
    n_embd = c.get("n_embd", 768)
    return dict(arch="gpt2", n_layer=c.get("n_layer", 12), n_head=c.get("n_head", 12), n_embd=n_embd,
                seq_len=c.get("n_positions", 1024), mlp_hidden=c.get("n_inner") or 4 * n_embd,
                tie_embeddings=c.get("tie_word_embeddings", True),
                norm_eps=c.get("layer_norm_epsilon", 1e-5), bias=True, dropout=c.get("resid_pdrop", 0.0))


def from_hf_config(c: dict[str, Any], seq_len: int | None = None) -> ModelConfig:
    """A Hugging Face `config.json` → ModelConfig; anything lmforge cannot express is refused."""
    model_type = c.get("model_type")
    if model_type not in ARCHITECTURES:
        raise InteropError(f"model_type {model_type!r} is not supported; lmforge imports "
                           f"{' and '.join(ARCHITECTURES.values())} checkpoints")
    try:
        fields = _llama_fields(c) if model_type == "llama" else _gpt2_fields(c)
    except KeyError as err:
        raise InteropError(f"config.json lacks {err.args[0]!r}") from None
    fields["vocab_size"] = c.get("vocab_size", 50257 if model_type == "gpt2" else 32000)
    if seq_len:
        if model_type == "gpt2" and seq_len > fields["seq_len"]:
            raise InteropError(f"--seq-len {seq_len} exceeds the {fields['seq_len']} learned positions "
                               "of this GPT-2")
        fields["seq_len"] = seq_len
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise InteropError(f"config.json describes a model lmforge cannot build: {err}") from None


# ---- weights ---------------------------------------------------------------------------------------
def _layer_table(cfg: ModelConfig) -> list[tuple[str, list[str], list[int], bool]]:
    """Per layer: (our name, HF names, split sizes along dim 0, HF stores it transposed)."""
    hd, d = cfg.head_dim, cfg.n_embd
    qkv = [cfg.n_head * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]
    if cfg.arch == "llama":
        rows = [("norm1.weight", ["input_layernorm.weight"], [d], False),
                ("norm2.weight", ["post_attention_layernorm.weight"], [d], False)]
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            rows += [(f"attn.qkv.{p}", [f"self_attn.{n}_proj.{p}" for n in "qkv"], qkv, False),
                     (f"attn.proj.{p}", [f"self_attn.o_proj.{p}"], [d], False),
                     (f"mlp.up.{p}", [f"mlp.gate_proj.{p}", f"mlp.up_proj.{p}"], [cfg.hidden_dim] * 2, False),
                     (f"mlp.down.{p}", [f"mlp.down_proj.{p}"], [d], False)]
        return rows
    rows = []
    for ours, theirs, out in (("attn.qkv", "attn.c_attn", sum(qkv)), ("attn.proj", "attn.c_proj", d),
                              ("mlp.up", "mlp.c_fc", cfg.hidden_dim), ("mlp.down", "mlp.c_proj", d)):
        rows += [(f"{ours}.weight", [f"{theirs}.weight"], [out], True),
                 (f"{ours}.bias", [f"{theirs}.bias"], [out], False)]
    for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
        rows += [(f"{ours}.{p}", [f"{theirs}.{p}"], [d], False) for p in ("weight", "bias")]
    return rows


def _top_table(cfg: ModelConfig) -> list[tuple[str, str]]:
    if cfg.arch == "llama":
        rows = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    else:
        rows = [("tok_emb.weight", "transformer.wte.weight"), ("pos_emb.weight", "transformer.wpe.weight"),
                ("norm.weight", "transformer.ln_f.weight"), ("norm.bias", "transformer.ln_f.bias")]
    return rows if cfg.tie_embeddings else [*rows, ("lm_head.weight", "lm_head.weight")]


def _layer_prefix(cfg: ModelConfig, i: int) -> str:
    return f"model.layers.{i}." if cfg.arch == "llama" else f"transformer.h.{i}."


def to_hf_state(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (tied lm_head may be absent) → HF tensor names and layouts, contiguous.

    Biases our model lacks (gpt2 with bias=False) become zeros, which HF GPT-2 always expects.
    """
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _top_table(cfg):
        out[theirs] = sd[ours] if ours in sd else torch.zeros(cfg.n_embd)
    for i in range(cfg.n_layer):
        for ours, theirs, sizes, transposed in _layer_table(cfg):
            t = sd.get(f"blocks.{i}.{ours}")
            if t is None:  # only a gpt2 bias can be missing here
                t = torch.zeros(sum(sizes))
            parts = t.split(sizes, dim=0) if len(theirs) > 1 else [t]
            for name, part in zip(theirs, parts, strict=True):
                out[_layer_prefix(cfg, i) + name] = part.t() if transposed else part
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors → our state dict (float32). Missing or unexpected tensors are refused by name."""
    hf_sd = {k: v for k, v in hf_sd.items() if not IGNORED_HF_KEYS.search(k)}
    if cfg.arch == "gpt2" and not any(k.startswith("transformer.") for k in hf_sd):
        # the original GPT-2 checkpoints name their weights without the `transformer.` prefix
        hf_sd = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in hf_sd.items()}
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise InteropError(f"the Hugging Face weights lack {name!r}")
        used.add(name)
        return hf_sd[name].to(torch.float32)

    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _top_table(cfg):
        out[ours] = take(theirs)
    for i in range(cfg.n_layer):
        for ours, theirs, _, transposed in _layer_table(cfg):
            parts = [take(_layer_prefix(cfg, i) + n) for n in theirs]
            out[f"blocks.{i}.{ours}"] = torch.cat([p.t() if transposed else p for p in parts], dim=0)
    extra = sorted(set(hf_sd) - used)
    if extra:
        raise InteropError(f"unexpected Hugging Face weights (an unsupported option?): "
                           f"{', '.join(extra[:4])}")
    if not cfg.bias:
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    return {k: v.contiguous() for k, v in out.items()}


def gpt2_bias_free(hf_sd: dict[str, torch.Tensor]) -> bool:
    """Whether a GPT-2 state dict's biases are all zero, i.e. it is exactly a `bias=False` model."""
    return all(not v.any() for k, v in hf_sd.items() if k.endswith(".bias") and not IGNORED_HF_KEYS.search(k))


# ---- Hugging Face directories -------------------------------------------------------------
def save_sharded(tensors: dict[str, torch.Tensor], dst: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or numbered shards plus model.safetensors.index.json above `max_shard_bytes`."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(dst / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, "model.safetensors.index.json"]


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model dir: model.safetensors, a sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    files: list[Path]
    if (src / "model.safetensors").is_file():
        files = [src / "model.safetensors"]
    elif (src / "model.safetensors.index.json").is_file():
        index = _read_json(src / "model.safetensors.index.json")
        files = [src / f for f in sorted(set(index.get("weight_map", {}).values()))]
    elif (src / "pytorch_model.bin").is_file():
        files = [src / "pytorch_model.bin"]
    else:
        raise InteropError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise InteropError(f"{src}: weight file {f.name} named by the index is missing")
        try:
            part = (torch.load(f, map_location="cpu", weights_only=True) if f.suffix == ".bin"
                    else load_file(str(f)))
        except Exception as err:  # safetensors and torch raise assorted types for damaged files
            raise InteropError(f"{f} cannot be read: {str(err).splitlines()[0]}") from None
        sd.update(part)
    return sd


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        raise InteropError(f"{path} cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return data


def load_hf_dir(src: str | Path, seq_len: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A HF Llama/GPT-2 model dir → (ModelConfig, our state dict); refuses what it cannot express."""
    src = Path(src)
    if not src.is_dir():
        raise InteropError(f"{src} is not a directory")
    if not (src / "config.json").is_file():
        raise InteropError(f"{src}: config.json is missing (is it a Hugging Face model dir?)")
    hf_cfg = _read_json(src / "config.json")
    cfg = from_hf_config(hf_cfg, seq_len)
    hf_sd = read_hf_weights(src)
    if cfg.arch == "gpt2" and gpt2_bias_free(hf_sd):
        cfg = ModelConfig(**{**cfg.model_dump(), "bias": False})
    sd = from_hf_state(cfg, hf_sd)
    if cfg.arch == "gpt2":  # a shorter --seq-len keeps the first positions
        sd["pos_emb.weight"] = sd["pos_emb.weight"][: cfg.seq_len].contiguous()
    return cfg, sd


def import_hf_checkpoint(src: str | Path, out: str | Path, *, force: bool = False, seq_len: int | None = None,
                         log: Callable[[str], Any] = print) -> Path:
    """A HF Llama/GPT-2 dir → an lmforge checkpoint dir (step 0) to continue pretraining or SFT from."""
    import shutil

    from safetensors.torch import save_file

    from lmforge import __version__
    from lmforge.checkpoint import model_state
    from lmforge.fsutil import atomic_dir, sha256_file
    from lmforge.models.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise InteropError(f"{out} already exists; pass --force to replace it")
    if src.resolve() == out.resolve():
        raise InteropError("--out must differ from the Hugging Face dir being imported")
    cfg, sd = load_hf_dir(src, seq_len)
    if not (src / "tokenizer.json").is_file():
        raise InteropError(f"{src}: tokenizer.json is missing; write one with "
                           "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:  # a mapping bug rather than a user mistake, but say what happened
        raise InteropError(f"converted weights do not fit the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    with atomic_dir(out) as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        tok = Tokenizer.load(tmp)
        if tok.vocab_size > cfg.vocab_size:
            raise InteropError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                               f"{cfg.vocab_size} embeddings")
        save_file(model_state(model), str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "state.json", {
            "lmforge_version": __version__, "step": 0, "tokens_seen": 0, "best_val_loss": None,
            "model_config": cfg.model_dump(mode="json"), "tokenizer_fingerprint": tok.fingerprint,
            "imported_from": {"path": str(src.resolve()), "architecture": ARCHITECTURES[cfg.arch]},
            "files": {"model.safetensors": sha256_file(tmp / "model.safetensors")}})
    log(f"import: {ARCHITECTURES[cfg.arch]} from {src} -> {out} ({sum(v.numel() for v in sd.values()):,} "
        "parameters)")
    return out
