"""Sampling from a trained model: single, batched and streaming generation, chat prompts, loading.

The work happens in `lmforge.engine.Engine` (KV cache, batching) and `lmforge.sampling` (choosing
tokens, streaming text); these functions are the convenient front doors to them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint import load_model_weights, read_state, resolve_checkpoint
from lmforge.config import ModelConfig
from lmforge.engine import Engine, Row
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.transformer import Transformer
from lmforge.sampling import RowSampler, SamplingParams, TextStream, filter_logits, sample_next

__all__ = ["SamplingParams", "filter_logits", "sample_next", "RowSampler", "TextStream", "Completion",
           "ChatPrompt", "generate_ids", "generate_text", "generate_batch", "stream_text", "stream_row",
           "render_messages", "load_for_inference", "quantize_int8", "encode_prompt", "count_params"]

# special tokens that end an assistant turn in common chat templates
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|assistant_end|>", "<end_of_turn>")
TEMPLATE_ROLES = {"developer": "system", "tool": "user"}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    """Time to first token: from submission to the first sampled token (prefill included)."""
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0


def completion_of(row: Row) -> Completion:
    end = row.t_end or row.t_first or row.t_submit
    return Completion(row.text, list(row.tokens), row.finish_reason or "length", len(row.prompt_ids),
                      (row.t_first or end) - row.t_submit, end - row.t_submit)


def encode_prompt(tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Prompt text → ids, starting with <|bos|> when the tokenizer has one (as training documents do)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    ids = bos + tokenizer.encode(text)
    if not ids:  # an empty prompt with no <|bos|>: start from <|eos|>, the document boundary
        ids = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    return ids


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], params: SamplingParams, *,
                 eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; the context slides when it is full. Stops at `eos_id`."""
    model.eval()
    ids = list(prompt_ids) or ([eos_id] if eos_id is not None else [0])
    engine = Engine(model, _NoText(), max_batch=1, slide=True)
    plain = SamplingParams(**{**params.__dict__, "stop": ()})  # text-level stops are the caller's job
    row = engine.submit(ids, plain, stop_ids=() if eos_id is None else (eos_id,))
    while not row.finished:
        for ev in engine.step():
            if ev.token is not None:
                yield ev.token


class _NoText:
    """A stand-in tokenizer for id-only generation: every token decodes to nothing."""

    eos_id = None

    def decode_bytes(self, ids) -> bytes:
        return b""


def generate_text(model: Transformer, tokenizer, prompt: str, params: SamplingParams) -> str:
    """The completion of `prompt` (without the prompt), cut at the first stop string."""
    return generate_batch(model, tokenizer, [prompt], params, slide=True)[0].text


@torch.no_grad()
def generate_batch(model: Transformer, tokenizer, prompts: Sequence[str | list[int]],
                   params: SamplingParams | Sequence[SamplingParams], *, max_batch: int = 0,
                   slide: bool = False, add_bos: bool = True, compile: bool = False) -> list[Completion]:
    """Complete several prompts (text or ids) at once, each with its own parameters and stop rules.

    Rows run in batches of `max_batch` (default: all of them); a row that finishes early hands its
    slot to the next prompt waiting.
    """
    model.eval()
    plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
    ids = [p if isinstance(p, list) else encode_prompt(tokenizer, p, add_bos) for p in prompts]
    need = max(len(i) + p.max_new_tokens for i, p in zip(ids, plist, strict=True)) if ids else 1
    engine = Engine(model, tokenizer, max_batch=max_batch or max(1, len(ids)), slide=slide,
                    max_len=min(need, model.cfg.seq_len), compile=compile)
    rows = [engine.submit(i, p) for i, p in zip(ids, plist, strict=True)]
    engine.run()
    return [completion_of(r) for r in rows]


@torch.no_grad()
def stream_text(model: Transformer, tokenizer, prompt: str | list[int], params: SamplingParams, *,
                add_bos: bool = True) -> Iterator[str]:
    """Yield the completion as text deltas: whole characters only, and nothing past a stop string."""
    model.eval()
    ids = prompt if isinstance(prompt, list) else encode_prompt(tokenizer, prompt, add_bos)
    engine = Engine(model, tokenizer, max_batch=1, slide=True,
                    max_len=min(len(ids) + params.max_new_tokens, model.cfg.seq_len))
    yield from stream_row(engine, engine.submit(ids, params))


def stream_row(engine: Engine, row: Row) -> Iterator[str]:
    """Step `engine` until `row` finishes, yielding its text deltas (other rows advance too)."""
    while not row.finished:
        for ev in engine.step():
            if ev.row is row and ev.delta:
                yield ev.delta
        if row.cancelled:
            return


# ---- chat -----------------------------------------------------------------------------------------
@dataclass
class ChatPrompt:
    ids: list[int]
    templated: bool
    """False: a base model, the messages were rendered as plain "User: ... / Assistant:" text."""
    stop: tuple[str, ...]
    stop_ids: frozenset[int]


def render_messages(tokenizer, messages: Sequence[dict]) -> ChatPrompt:
    """Messages [{"role", "content"}] → prompt ids, with the tokenizer's chat template when it has one.

    A tokenizer with a `chat_template` must offer `apply_chat_template(messages,
    add_generation_prompt=True)` returning ids (or (ids, loss_mask)), as `Tokenizer.with_chat_tokens()` does.
    """
    eos = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    if getattr(tokenizer, "chat_template", None):
        # the template knows system/user/assistant: OpenAI's newer roles map onto those
        msgs = [{**m, "role": TEMPLATE_ROLES.get(m.get("role"), m.get("role"))} for m in messages]
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        ids = out[0] if isinstance(out, tuple) else out
        ends = {specials[n] for n in END_OF_TURN if n in specials}
        if getattr(tokenizer, "end_of_turn_id", None) is not None:
            ends.add(tokenizer.end_of_turn_id)
        return ChatPrompt(list(ids), True, (), frozenset(eos | ends))
    parts = []
    for m in messages:
        role, content = str(m.get("role", "user")), str(m.get("content") or "")
        if role == "system":
            parts.append(f"{content}\n\n")
        else:
            parts.append(f"{'Assistant' if role == 'assistant' else 'User'}: {content}\n")
    text = "".join(parts) + "Assistant:"
    return ChatPrompt(encode_prompt(tokenizer, text), False, ("\nUser:",), frozenset(eos))


# ---- loading --------------------------------------------------------------------------------------
def load_for_inference(path: str | Path, device: torch.device | str = "cpu", *, dtype: str | None = None,
                       quantize: str | None = None) -> tuple[Transformer, object, dict]:
    """A checkpoint dir, run dir or exported Hugging Face dir → (model in eval mode, tokenizer, state).

    dtype: "fp32" | "bf16" | "auto" | None (as saved, fp32). quantize: "int8" for dynamic int8 linear
    layers (CPU only).
    """
    from lmforge.tokenizer import Tokenizer

    if _is_hf_dir(Path(path)):
        model, tokenizer, state = _load_hf_export(Path(path))
        ckpt = Path(path)
    else:
        ckpt = resolve_checkpoint(path)
        state = read_state(ckpt)
        if "model_config" not in state:
            raise CheckpointError(f"{ckpt}/state.json has no model_config")
        model = Transformer(ModelConfig.model_validate(state["model_config"]))
        load_model_weights(model, ckpt)
        if not (ckpt / "tokenizer.json").exists() and not (ckpt / "lmforge_tokenizer.json").exists():
            raise CheckpointError(f"{ckpt} has no tokenizer files")
        tokenizer = Tokenizer.load(ckpt)
    device = torch.device(device)
    if dtype not in (None, "fp32", "bf16", "auto"):
        raise ConfigError(f"dtype {dtype!r}: choose fp32 or bf16")
    if dtype == "auto":
        from lmforge.runtime import resolve_dtype

        dtype = "bf16" if resolve_dtype("auto", device) == torch.bfloat16 else "fp32"
    model.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    if quantize:
        model = quantize_int8(model, quantize)
    return model, tokenizer, {**state, "path": str(ckpt)}


def _is_hf_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and not (p / "state.json").is_file()


def _load_hf_export(p: Path) -> tuple[Transformer, object, dict]:
    """A Hugging Face Llama/GPT-2 dir (e.g. from `lmforge export --format hf`) as an lmforge model."""
    from lmforge.models.hf import load_hf_dir
    from lmforge.tokenizer import load_tokenizer

    cfg, sd = load_hf_dir(p)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CheckpointError(f"{p}: weights do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, load_tokenizer(p), {"model_config": cfg.model_dump(mode="json"), "step": None}


def quantize_int8(model: nn.Module, kind: str = "int8") -> nn.Module:
    """Dynamic int8 quantization of every linear layer (weights int8, activations quantized per call).

    CPU only; the embedding stays in float, the tied output layer gets its own int8 copy.
    """
    if kind != "int8":
        raise ConfigError(f"--quantize {kind!r}: only int8 is supported")
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ConfigError("--quantize int8 needs an fp32 model on the CPU (use --device cpu --dtype fp32)")
    from torch.ao.quantization import quantize_dynamic

    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"  # fbgemm kernels with a small-batch fast path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks the quantized tensor API as deprecated
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
