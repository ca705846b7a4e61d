"""`lmforge bench generate`: prefill and decode speed of the engine, against transformers' `generate`
on the same weights, plus optional int8, HTTP-overhead and dynamic-batching measurements.

Every number comes from greedy decoding of random prompts with EOS ignored, so each row produces
exactly `new_tokens` tokens.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.bench_table import fastest_rounds
from lmforge.config import ModelConfig
from lmforge.engine import Engine
from lmforge.models.transformer import Transformer
from lmforge.sampling import SamplingParams

# the issue's reference shape: transformers' LlamaForCausalLM at 15.7M parameters
BENCH_SHAPE = dict(arch="llama", vocab_size=16384, n_embd=384, n_layer=6, n_head=6, n_kv_head=2,
                   mlp_hidden=1024, seq_len=512, tie_embeddings=True)


@dataclass
class BenchOptions:
    ckpt: str | None = None
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 16
    new_tokens: int = 256
    threads: int = 2
    dtype: str = "fp32"
    device: str = "cpu"
    hf: bool = True
    quantize: bool = False
    server: bool = False
    val_shards: str | None = None
    compile: bool = False
    repeats: int = 1


class _Silent:
    """Id-only runs need no text: every token decodes to nothing."""

    eos_id = None

    def decode_bytes(self, ids) -> bytes:
        return b""


def load_bench_model(opts: BenchOptions) -> tuple[Transformer, object, str]:
    device = torch.device(opts.device)
    if opts.ckpt:
        from lmforge.generate import load_for_inference

        model, tok, state = load_for_inference(opts.ckpt, device, dtype=opts.dtype)
        return model, tok, state["path"]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BENCH_SHAPE)).eval()
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    return model.to(device=device, dtype=dtype), None, "random 15.7M Llama (the issue's shape)"


def _prompts(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def time_engine(model, prompts: torch.Tensor, new_tokens: int, compile: bool = False) -> dict:
    """One batched greedy run through the engine: prefill, time to first token, decode speed."""
    B, T = prompts.shape
    engine = Engine(model, _Silent(), max_batch=B, max_len=T + new_tokens, compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    rows = [engine.submit(p.tolist(), params, stop_ids=()) for p in prompts]
    t0 = time.perf_counter()
    engine.step()  # admission: the prefill and the first token of every row
    t_first = time.perf_counter()
    engine.run()
    t_end = max(r.t_end for r in rows)
    assert all(len(r.tokens) == new_tokens for r in rows)
    return {"prefill_tokens_per_s": B * T / (t_first - t0), "ttft_ms": 1000 * (t_first - t0),
            "decode_tokens_per_s": B * (new_tokens - 1) / (t_end - t_first),
            "ms_per_step": 1000 * (t_end - t_first) / (new_tokens - 1),
            "tokens_per_s": B * new_tokens / (t_end - t0), "seconds": t_end - t0}


def to_transformers(model: Transformer):
    """The same weights as a transformers model (LlamaForCausalLM / GPT2LMHeadModel), as the HF export has."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.models.hf import to_hf_config, to_hf_state

    cfg = model.cfg
    hf_cfg = to_hf_config(cfg, bos_id=None, eos_id=None, pad_id=None)
    kind = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures", None)
    p = next(model.parameters())
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **hf_cfg), dtype=p.dtype)
    state = to_hf_state(cfg, {k: v.float() for k, v in model.state_dict().items()})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return hf.to(device=p.device, dtype=p.dtype).eval()


@torch.inference_mode()
def time_transformers(hf, prompts: torch.Tensor, new_tokens: int) -> dict:
    prompts = prompts.to(next(hf.parameters()).device)
    mask = torch.ones_like(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0, use_cache=True)
    t0 = time.perf_counter()
    out = hf.generate(prompts, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + new_tokens
    B = prompts.shape[0]
    return {"tokens_per_s": B * new_tokens / dt, "ms_per_step": 1000 * dt / new_tokens, "seconds": dt,
            "tokens": out[:, prompts.shape[1]:]}


@torch.inference_mode()
def step_breakdown(model: Transformer, context: int = 64, steps: int = 50) -> dict:
    """Where one batch-1 decode step goes: the model's own forward pass (what transformers-style code
    runs per token) against the engine's decode step, and that step with its matmuls taken out
    (each linear layer hands back its first output), which leaves the other operators and Python."""
    from lmforge.decode_step import DecodeStep, supports
    from lmforge.kv_cache import KVCache

    p = next(model.parameters())
    context = min(context, model.cfg.seq_len // 2)
    steps = min(steps, model.cfg.seq_len - context)
    cache = KVCache(model.cfg, 1, context + steps, p.device, p.dtype)
    x = torch.randint(0, model.cfg.vocab_size, (1, context), device=p.device)
    model(x, kv_cache=cache)
    tok = x[:, -1:]

    def per_step(fn: Callable[[int], object]) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            fn(context + i)
        return 1000 * (time.perf_counter() - t0) / steps

    out = {"forward_ms": per_step(lambda pos: model(tok, kv_cache=cache, start_pos=pos))}
    if supports(model):
        step = DecodeStep(model)

        def run(pos: int) -> None:
            step(tok[:, 0], [pos], cache)

        per_step(run)  # the first steps time each layer's ways and keep one
        out["decode_step_ms"] = per_step(run)
        outputs: dict = {}
        linear = step._linear

        def first_output(mod: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
            if mod not in outputs:
                outputs[mod] = linear(mod, h)
            return outputs[mod]

        step._linear = first_output
        per_step(run)
        out["other_ops_ms"] = per_step(run)
        out["matmul_ms"] = out["decode_step_ms"] - out["other_ops_ms"]
    return out


def machine_info(opts: BenchOptions) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": opts.device, "dtype": opts.dtype}


def bench_generate(opts: BenchOptions, log: Callable[[str], object] = print) -> dict:
    """Run every measurement `opts` asks for; {"machine", "results", "summary"}."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model, tok, what = load_bench_model(opts)
    cfg = model.cfg
    if opts.prompt_len + opts.new_tokens > cfg.seq_len:  # the engine stops rows at the context's end
        opts.new_tokens = cfg.seq_len - opts.prompt_len
        log(f"new tokens cut to {opts.new_tokens} to fit the context of {cfg.seq_len}")
    log(f"model: {what}; {model.num_params() / 1e6:.1f}M parameters, {opts.dtype}, {opts.device}, "
        f"{torch.get_num_threads()} threads; prompt {opts.prompt_len} + {opts.new_tokens} new tokens")
    results, summary = [], {}
    hf = to_transformers(model) if opts.hf else None
    for B in opts.batches:
        prompts = _prompts(cfg, B, opts.prompt_len)
        time_engine(model, prompts[:, :8], 8, opts.compile)  # warm-up (and compilation)
        jobs = [lambda p=prompts: time_engine(model, p, opts.new_tokens, opts.compile)]
        if hf is not None:
            time_transformers(hf, prompts[:, :8], 8)
            jobs.append(lambda p=prompts: time_transformers(hf, p, opts.new_tokens))
        rows = fastest_rounds(jobs, opts.repeats)  # interleaved: both meet the same machine
        ours = rows[0]
        results.append({"name": f"lmforge b{B}", "batch": B, **ours})
        log(f"lmforge      batch {B}: {ours['tokens_per_s']:.0f} tokens/s ({ours['ms_per_step']:.2f} ms/step), "
            f"prefill {ours['prefill_tokens_per_s']:.0f} tokens/s, TTFT {ours['ttft_ms']:.1f} ms")
        if hf is not None:
            theirs = rows[1]
            tokens = theirs.pop("tokens")
            results.append({"name": f"transformers b{B}", "batch": B, **theirs})
            summary[f"speedup_b{B}"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            same = _same_tokens(model, prompts, tokens)
            log(f"transformers batch {B}: {theirs['tokens_per_s']:.0f} tokens/s ({theirs['ms_per_step']:.2f} "
                f"ms/step) → lmforge is {summary[f'speedup_b{B}']:.2f}x; same greedy tokens: {same:.0%}")
    if 1 in opts.batches:
        summary["step_breakdown_b1"] = step_breakdown(model)
        b = summary["step_breakdown_b1"]
        log(f"batch-1 step: model forward {b['forward_ms']:.2f} ms; " + (
            "engine decode step {decode_step_ms:.2f} ms = matmuls {matmul_ms:.2f} ms + other ops and "
            "Python {other_ops_ms:.2f} ms".format(**b) if "decode_step_ms" in b else "no decode step"))
    if opts.quantize:
        results += _bench_int8(model, opts, summary, log)
    if opts.server:
        from lmforge.bench_serve import bench_server

        summary.update(bench_server(model, tok, opts.new_tokens, log=log))
    return {"machine": machine_info(opts), "results": results, "summary": summary}


@torch.inference_mode()
def _same_tokens(model, prompts: torch.Tensor, hf_tokens: torch.Tensor) -> float:
    """Fraction of rows whose greedy continuation matches transformers' for the first 32 tokens."""
    n = min(32, hf_tokens.shape[1])
    ours = time_engine_tokens(model, prompts, n)
    return sum(o == t[:n].tolist() for o, t in zip(ours, hf_tokens.cpu(), strict=True)) / len(ours)


def time_engine_tokens(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    engine = Engine(model, _Silent(), max_batch=prompts.shape[0], max_len=prompts.shape[1] + n)
    rows = [engine.submit(p.tolist(), SamplingParams(max_new_tokens=n, temperature=0), stop_ids=())
            for p in prompts]
    engine.run()
    return [r.tokens for r in rows]


def _bench_int8(model, opts: BenchOptions, summary: dict, log) -> list[dict]:
    from lmforge.generate import quantize_int8

    if opts.device != "cpu" or opts.dtype != "fp32":
        log("int8: skipped (needs --device cpu --dtype fp32)")
        return []
    q = quantize_int8(model)
    out = []
    for B in opts.batches:
        prompts = _prompts(model.cfg, B, opts.prompt_len)
        time_engine(q, prompts[:, :8], 8)
        r, = fastest_rounds([lambda p=prompts: time_engine(q, p, opts.new_tokens)], opts.repeats)
        out.append({"name": f"lmforge int8 b{B}", "batch": B, **r})
        log(f"lmforge int8 batch {B}: {r['tokens_per_s']:.0f} tokens/s ({r['ms_per_step']:.2f} ms/step)")
    if opts.val_shards:
        fp32, int8 = val_loss(model, opts.val_shards), val_loss(q, opts.val_shards)
        summary["int8_val_loss"] = {"fp32": fp32, "int8": int8, "change": int8 - fp32}
        log(f"int8 validation loss {int8:.4f} vs fp32 {fp32:.4f} (change {int8 - fp32:+.4f})")
    return out


@torch.inference_mode()
def val_loss(model, shards_dir: str, windows: int = 32, batch: int = 4) -> float:
    """Mean next-token loss over evenly spaced full-context windows of the validation split."""
    import numpy as np

    from lmforge.shards import open_split

    T = model.cfg.seq_len
    data = np.concatenate([np.asarray(m) for m in open_split(shards_dir, "val")]).astype(np.int64)
    if len(data) < T + 1:
        raise ValueError(f"{shards_dir}: the validation split has fewer than {T + 1} tokens")
    starts = np.linspace(0, len(data) - T - 1, windows).astype(np.int64)
    total = 0.0
    for i in range(0, windows, batch):
        idx = torch.from_numpy(np.stack([data[s:s + T + 1] for s in starts[i:i + batch]]))
        logits = model(idx[:, :-1])
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten(),
                                                   reduction="sum").item()
    return total / (windows * T)


def print_table(res: dict) -> None:
    from lmforge.bench_table import show_table

    show_table("generation benchmark", ("name", "tokens/s", "ms/step", "prefill tok/s", "TTFT ms"),
               [(r["name"], f"{r['tokens_per_s']:.0f}", f"{r['ms_per_step']:.2f}",
                 f"{r['prefill_tokens_per_s']:.0f}" if "prefill_tokens_per_s" in r else "-",
                 f"{r['ttft_ms']:.1f}" if "ttft_ms" in r else "-") for r in res["results"]])
