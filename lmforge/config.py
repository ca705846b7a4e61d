"""Recipes: one pydantic model per section, presets, TOML loading and `--set` overrides.

Every section forbids unknown keys so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmforge.errors import ConfigError

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = "bundled:tinyshakespeare"
    """A text/JSONL/Parquet file, a glob, a folder, `bundled:tinyshakespeare`, or `hf:NAME` (a Hugging Face
    dataset, streamed; NAME may also be a builder such as `json`/`parquet` with `hf_data_files`)."""
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    """A key, a dotted path into nested JSON (`article.sections.text` joins a list's texts), or a column."""
    meta_fields: list[str] = Field(default_factory=list)
    """Fields (dotted paths) carried with each document to the filters, e.g. ["language_score", "url"]."""
    doc_split: Literal["file", "paragraph", "line"] = "file"
    """How plain text becomes documents: one per file, per blank-line block, or per line."""
    hf_config: str = ""
    """`hf:` sources: the dataset configuration, e.g. "sample-10BT" for HuggingFaceFW/fineweb."""
    hf_split: str = "train"
    hf_data_files: list[str] = Field(default_factory=list)
    """`hf:` sources: data files for builder datasets (`hf:json`, `hf:parquet`), local paths or globs."""
    limit: int = Field(0, ge=0)
    """Read at most this many source documents (0 = all): test mode."""
    val_split: Literal["tail", "hash"] = "tail"
    """`tail`: the last `val_fraction` of the text (nanoGPT's split); `hash`: by document hash."""
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    shards_dir: str = "runs/demo/shards"
    shard_tokens: int = Field(50_000_000, ge=1024)
    workers: int = Field(0, ge=0)
    """Tokenization processes; 0 = one per core."""
    loader: Literal["memmap", "naive", "workers", "ring"] = "memmap"
    """Where training batches come from: `memmap` reads the shards (`lmforge tokenize` first); `naive`,
    `workers` and `ring` tokenize the raw source on the fly (streaming mode) and yield the same batches."""
    loader_workers: int = Field(2, ge=1)
    """Streaming: worker processes, each reading its own share of the data. The number also fixes the
    batch order, so `naive` takes the same shares in turn in one process."""
    loader_slots: int = Field(4, ge=1)
    """Streaming: batches each worker may have ready (ring slots / queue depth)."""
    epochs: int = Field(0, ge=0)
    """Streaming: passes over the data before the loader stops; 0 = no end (reshuffled every epoch)."""
    shuffle: bool = True
    """Streaming: read the file chunks in an order shuffled by train.seed, a new one each epoch."""
    val_tokens: int = Field(10_000_000, ge=0)
    """Streaming: validation tokenizes at most this many tokens of the val split at start (0 = all)."""
    window_align: Literal["any", "bos"] = "any"
    """Memmap: a window may start anywhere, or (`bos`) only where a document starts."""
    sampling: Literal["random", "epoch"] = "random"
    """Memmap: `random` draws windows with replacement (as nanoGPT does); `epoch` visits every window
    once per epoch, in an order shuffled anew each epoch."""
    device_resident: bool = False
    """Memmap: load the training tokens onto the device once and cut windows there."""
    resident_share: float = Field(0.5, gt=0.0, le=1.0)
    """Device-resident: the share of device memory the tokens may take; more are loaded in parts."""
    resident_parts: int = Field(0, ge=0)
    """Device-resident: load the tokens in this many parts, one after another; 0 = as few as fit."""

    @staticmethod
    def loader_keys() -> frozenset[str]:
        """Keys that choose how batches are read, not what the shards hold (kept out of their hash)."""
        return frozenset({"loader", "loader_workers", "loader_slots", "epochs", "shuffle", "val_tokens",
                          "window_align", "sampling", "device_resident", "resident_share", "resident_parts"})


class TokenizerConfig(Section):
    kind: Literal["bpe", "byte", "pretrained"] = "bpe"
    vocab_size: int = Field(4096, ge=257)
    dir: str = "runs/demo/tokenizer"
    pretrained: str = ""
    """For kind = "pretrained": a `tokenizer.json`, a tokenizer directory, a SentencePiece `.model`, or a
    Hugging Face Hub name such as "gpt2" (fetched through transformers when online)."""
    special_tokens: list[str] = Field(default_factory=lambda: list(SPECIAL_TOKENS))
    add_bos: bool = True
    """Start every document with `<|bos|>` (documents always end with `<|eos|>`)."""
    max_train_chars: int = Field(0, ge=0)
    """Train the BPE on at most this many characters of the train split (0 = all)."""


class PrepareConfig(Section):
    """`lmforge prepare`: clean, filter, deduplicate and tokenize the source in one streaming pass.

    Its train/val split is always by document hash (`data.val_fraction`), whatever `data.val_split` says."""

    enabled: bool = False
    """Route `tokenizer train`, `tokenize` and `run` through prepare (cleaned docs, stats.json)."""
    out_dir: str = "runs/demo/prepared"
    """Cleaned documents (docs/*.jsonl.zst), stats.json and the resume state."""
    normalize: bool = True
    """NFC, control characters removed, whitespace tidied (Unicode kept as it is)."""
    strip_wiki: bool = False
    """Remove wiki markup leftovers: [1] markers, {{templates}}, <ref>s, category/file links, tables."""
    min_chars: int = Field(0, ge=0)
    max_chars: int = Field(0, ge=0)
    """0 = no limit."""
    min_tokens: int = Field(0, ge=0)
    min_alpha_frac: float = Field(0.0, ge=0.0, le=1.0)
    """Minimum fraction of letters among the non-space characters."""
    max_line_chars: int = Field(0, ge=0)
    max_dup_line_frac: float = Field(1.0, ge=0.0, le=1.0)
    """Gopher-style: maximum fraction of (non-blank) lines that repeat an earlier line; 1 = off."""
    max_dup_ngram_frac: float = Field(1.0, ge=0.0, le=1.0)
    """Gopher-style: maximum fraction of characters inside repeated word n-grams; 1 = off."""
    dup_ngram: int = Field(5, ge=1)
    meta_filters: list[str] = Field(default_factory=list)
    """Conditions on metadata fields, e.g. ["language_score >= 0.65", "language == 'en'"]."""
    dedup: Literal["none", "exact", "minhash"] = "exact"
    """exact: a hash of the normalized text; minhash: also near-duplicates (MinHash + LSH bands)."""
    minhash_threshold: float = Field(0.8, gt=0.0, lt=1.0)
    minhash_perms: int = Field(128, ge=16)
    minhash_ngram: int = Field(5, ge=1)
    dedup_max_mb: int = Field(256, ge=1)
    """Memory for the dedup tables; when full, new documents are still checked but no longer added."""
    write_docs: bool = True
    """Also keep the cleaned documents as JSONL.zst (what `lmforge tokenize` re-reads for a new tokenizer)."""
    window: int = Field(0, ge=0)
    """Also export fixed-length windows of this many tokens as a 2-D array per split (0 = off)."""
    stride: int = Field(0, ge=0)
    """Step between windows; 0 = window (no overlap), e.g. window/2 for 50% overlap."""
    strict: bool = False
    """Fail on the first malformed JSON line or bad field instead of skipping and counting it."""
    num_parts: int = Field(1, ge=1)
    part: int = Field(0, ge=0)
    """Prepare only part `part` of `num_parts` disjoint parts of the input (one machine each)."""

    @model_validator(mode="after")
    def _check_part(self) -> PrepareConfig:
        if self.part >= self.num_parts:
            raise ValueError(f"part ({self.part}) must be below num_parts ({self.num_parts})")
        for expr in self.meta_filters:
            from lmforge.clean import MetaCondition

            MetaCondition.parse(expr)  # a malformed condition is a config error, found before any work
        return self


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, seq_len=64),
    "llama-demo": dict(arch="llama", n_layer=4, n_head=4, n_kv_head=4, n_embd=256, seq_len=256),
    "nanogpt-cpu": dict(arch="gpt2", n_layer=4, n_head=4, n_kv_head=4, n_embd=128, seq_len=64, bias=False),
    "gpt2-124m": dict(arch="gpt2", n_layer=12, n_head=12, n_kv_head=12, n_embd=768, seq_len=1024,
                      vocab_size=50304, bias=True),
    "llama-110m": dict(arch="llama", n_layer=12, n_head=12, n_kv_head=4, n_embd=768, seq_len=1024,
                       vocab_size=32768),
    "llama-270m": dict(arch="llama", n_layer=16, n_head=16, n_kv_head=4, n_embd=1024, seq_len=2048,
                       vocab_size=32768),
}


class ModelConfig(Section):
    preset: str = ""
    arch: Literal["gpt2", "llama"] = "llama"
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int = Field(0, ge=0)
    """Key/value heads for grouped-query attention; 0 = n_head."""
    n_embd: int = Field(256, ge=8)
    seq_len: int = Field(256, ge=2)
    vocab_size: int = Field(0, ge=0)
    """0 = take it from the tokenizer."""
    mlp_hidden: int = Field(0, ge=0)
    """0 = 4 * n_embd for gpt2, about 8/3 * n_embd (rounded to 64) for llama."""
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    bias: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm_eps: float = Field(1e-5, gt=0)
    objective: Literal["autoregressive", "diffusion"] = "autoregressive"
    """"diffusion": masked diffusion (lmforge.diffusion); the tokenizer needs a `<|mask|>` special token."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            name = data["preset"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
            data = {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return 64 * ((8 * self.n_embd // 3 + 63) // 64)


class TrainConfig(Section):
    run_dir: str = "runs/demo"
    max_steps: int = Field(500, ge=1)
    max_time_s: float = Field(0.0, ge=0)
    """Stop (with a checkpoint) after this much training time; 0 = no limit."""
    micro_batch_size: int = Field(8, ge=1)
    batch_size_tokens: int = Field(0, ge=0)
    """Global batch in tokens; 0 = micro_batch_size * seq_len * world size (no accumulation)."""
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(2e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """WSD: the fraction of steps spent decaying at the end."""
    decay_start: int = Field(0, ge=0)
    """WSD: the step where the decay starts (0 = from decay_fraction); set it on resume to decay now."""
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    device: str = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: `ddp` replicates the model on every rank; `fsdp` shards parameters, gradients and
    optimizer state across ranks (FSDP2) for models that do not fit one device, with sharded checkpoints."""
    seed: int = 1337
    init_from: str = ""
    """Start from this checkpoint's (or run dir's) weights, with a fresh optimizer and step 0."""
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    save_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stop_patience: int = Field(0, ge=0)
    """Stop after this many validations without improvement (0 = never stop early)."""
    early_stop_min_delta: float = Field(0.0, ge=0)
    threads: int = Field(0, ge=0)
    """torch intra-op threads; 0 = leave PyTorch's default."""
    sample_at_eval: bool = True
    """Write samples from the [sample] prompts to samples.txt at every validation."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works offline)."""
    wandb_project: str = "lmforge"


class EvalConfig(Section):
    batches: int = Field(10, ge=1)
    """Validation batches per periodic evaluation (random windows)."""
    final: Literal["full", "batches"] = "full"
    """Final evaluation: every validation token once (`full`) or `batches` random windows."""
    stride: int = Field(0, ge=0)
    """Sliding-window stride for the full evaluation; 0 = seq_len (no overlap)."""


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "First Citizen:\n", "To be, or not"])
    max_new_tokens: int = Field(100, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 1234


class SFTConfig(Section):
    """`lmforge sft`: chat fine-tuning of a pretrained model. Keys left unset in [model], [train], [eval]
    and [sample] are taken from the base run, except the SFT defaults (lr 5e-5, epochs for steps, ...)."""

    base: str = "runs/demo"
    """The pretrained model: a checkpoint dir, a run dir (its best, else latest) or an exported HF dir."""
    source: str = ""
    """Conversations: a .jsonl or .json (array) file, a glob of them, or `hf:NAME` (a Hugging Face dataset)."""
    format: Literal["auto", "conversations", "messages", "alpaca"] = "auto"
    """auto: per record, by its keys (`messages`, `conversations`, `instruction`)."""
    hf_config: str = ""
    hf_split: str = "train"
    limit: int = Field(0, ge=0)
    """Read at most this many records (0 = all)."""
    system_prompt: str = ""
    """Added as the system message to conversations that have none ("" = none)."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Held-out conversations (chosen by content hash): validation loss and the sample prompts."""
    epochs: int = Field(3, ge=1)
    """Passes over the training conversations (train.max_steps, when set in the recipe, wins)."""
    evals_per_epoch: int = Field(2, ge=1)
    too_long: Literal["drop", "truncate"] = "drop"
    """Conversations longer than the model's context: left out, or cut at the context (both counted)."""
    packing: Literal["pack", "pad"] = "pack"
    """pack: several conversations per row, each attending only to itself; pad: one per row."""
    strict: bool = False
    """Stop at the first malformed conversation instead of skipping and counting it."""
    prepared_dir: str = ""
    """Where `lmforge sft prepare` writes the tokenized conversations ("" = <run_dir>/sft_data)."""
    sample_prompts: int = Field(3, ge=0)
    """Held-out prompts that become sample.prompts (answered at each validation) and fill chats.txt."""


class Recipe(Section):
    name: str = "demo"
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)

    @model_validator(mode="after")
    def _check_mask_token(self) -> Recipe:
        # a pretrained tokenizer brings its own special tokens: checked when it is loaded
        if (self.model.objective == "diffusion" and self.tokenizer.kind != "pretrained"
                and "<|mask|>" not in self.tokenizer.special_tokens):
            raise ValueError('model.objective = "diffusion" needs "<|mask|>" in tokenizer.special_tokens')
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value), the value parsed as TOML when it can be."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 1:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: keep it as a string and let the schema judge it
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe (or the built-in defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, source if not overrides else f"{source} (with --set)")


def to_toml(recipe: Recipe) -> str:
    return tomli_w.dumps(recipe.model_dump(mode="json"))


def section_hash(section: BaseModel) -> str:
    """A short stable digest of a section, to tell whether an artifact is up to date."""
    import hashlib

    import orjson

    return hashlib.sha256(orjson.dumps(section.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
