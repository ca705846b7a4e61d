"""`lmforge bench train`: where a training step's time goes, and how settings compare.

Each setting builds the model fresh, runs warm-up steps (compile time reported apart), then times
N steps split into data / forward / backward / optimizer, and reports tokens/s, achieved FLOP/s and
MFU against a matmul peak measured in the same run on the model's own shapes.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.objectives import autoregressive_loss
from lmforge.runtime import autocast_ctx, cpu_has_native_bf16, resolve_device


@dataclass(frozen=True)
class Setting:
    dtype: str = "fp32"
    compile: bool = False
    optimizer: str = "foreach"  # "foreach" | "fused" | "plain"
    threads: int = 0

    @property
    def name(self) -> str:
        parts = [self.dtype, "compile" if self.compile else "eager", f"adamw-{self.optimizer}"]
        if self.threads:
            parts.append(f"{self.threads}thr")
        return " ".join(parts)


def parse_compare(spec: str, base: Setting) -> list[Setting]:
    """`dtype,compile,optimizer,threads` → the base setting plus one variant per listed axis."""
    variants = [base]
    for axis in [s.strip() for s in spec.split(",") if s.strip()]:
        if axis == "dtype":
            variants.append(replace(base, dtype="bf16" if base.dtype == "fp32" else "fp32"))
        elif axis == "compile":
            variants.append(replace(base, compile=not base.compile))
        elif axis == "optimizer":
            variants += [replace(base, optimizer=o) for o in ("plain", "fused") if o != base.optimizer]
        elif axis == "threads":
            variants += [replace(base, threads=t) for t in (1, 2) if t != base.threads]
        else:
            raise ValueError(f"--compare: unknown axis {axis!r} (dtype, compile, optimizer, threads)")
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(cfg: ModelConfig, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the model's typical matmul, (tokens, d) @ (d, hidden), best of `repeats`."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(tokens, cfg.n_embd, device=device, dtype=dtype, generator=gen)
    b = torch.randn(cfg.n_embd, cfg.hidden_dim, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * tokens * cfg.n_embd * cfg.hidden_dim / best


def _optimizer(model: torch.nn.Module, kind: str, device: torch.device) -> torch.optim.Optimizer:
    from lmforge.optim import param_groups

    kw: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.95)}
    if kind == "fused":
        kw["fused"] = True
    elif kind == "foreach":
        kw["foreach"] = True
    else:
        kw["foreach"] = False
    return torch.optim.AdamW(param_groups(model, 0.1), **kw)


def bench_setting(cfg: ModelConfig, s: Setting, *, batch: int, steps: int, warmup: int, device: torch.device,
                  peaks: dict[str, float]) -> dict[str, Any]:
    old_threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    raw = Transformer(cfg).to(device)
    model = torch.compile(raw) if s.compile else raw
    opt = _optimizer(raw, s.optimizer, device)
    dtype = torch.bfloat16 if s.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (steps + warmup, batch, cfg.seq_len + 1), generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    t_warm = time.perf_counter()
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        xy = data[i].to(device, non_blocking=True)
        x, y = xy[:, :-1], xy[:, 1:]
        _sync(device)
        t1 = time.perf_counter()
        with autocast_ctx(device, dtype):
            loss = autoregressive_loss(model, x, y)
        _sync(device)
        t2 = time.perf_counter()
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t4 = time.perf_counter()
        if i == warmup - 1:
            warm_s = t4 - t_warm
        if i >= warmup:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[k].append(dt)
    torch.set_num_threads(old_threads)
    step_times = [sum(p) for p in zip(*phases.values(), strict=True)]
    step_s = statistics.median(step_times)
    tokens = batch * cfg.seq_len
    flops = raw.flops_per_token() * tokens / step_s
    peak = peaks["bf16" if s.dtype == "bf16" else "fp32"]
    mem = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "name": s.name, "tokens_per_s": tokens / step_s, "ms_per_step": 1000 * step_s,
        **{f"ms_{k}": 1000 * statistics.median(v) for k, v in phases.items()},
        "flops_per_token": raw.flops_per_token(), "achieved_tflops": flops / 1e12, "peak_tflops": peak / 1e12,
        "mfu": flops / peak if peak else 0.0, "warmup_s": warm_s if warmup else 0.0,
        "peak_mem_mib": mem, "final_loss": float(loss.detach()), "settings": s.__dict__,
    }


def bench_train(cfg: ModelConfig, settings: list[Setting], *, batch: int, steps: int = 10, warmup: int = 2,
                device: str = "auto") -> dict[str, Any]:
    dev = resolve_device(device)
    tokens = batch * cfg.seq_len
    peaks = {"fp32": measure_peak(cfg, tokens, dev, torch.float32)}
    # bf16 matmuls are emulated (and ~100x slower) on CPUs without native support: measure on a small shape
    bf16_tokens = tokens if dev.type != "cpu" or cpu_has_native_bf16() else min(tokens, 256)
    peaks["bf16"] = measure_peak(cfg, bf16_tokens, dev, torch.bfloat16)
    results = [bench_setting(cfg, s, batch=batch, steps=steps, warmup=warmup, device=dev, peaks=peaks)
               for s in settings]
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup"] = r["tokens_per_s"] / base
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev),
               "cpu_native_bf16": cpu_has_native_bf16(),
               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               "peak_fp32_tflops": peaks["fp32"] / 1e12, "peak_bf16_tflops": peaks["bf16"] / 1e12}
    return {"machine": machine, "model": cfg.model_dump(mode="json"), "batch": batch, "steps": steps,
            "results": results}


def print_table(res: dict[str, Any]) -> None:
    from lmforge.bench_table import show_table

    m = res["machine"]
    show_table(f"bench train: {res['model']['arch']} L{res['model']['n_layer']} d{res['model']['n_embd']} "
               f"T{res['model']['seq_len']} B{res['batch']} on {m['gpu'] or m['processor']} "
               f"(peak fp32 {m['peak_fp32_tflops'] * 1e3:.0f} GFLOP/s, bf16 {m['peak_bf16_tflops'] * 1e3:.0f})",
               ("setting", "tokens/s", "ms/step", "data", "fwd", "bwd", "optim", "TFLOP/s", "MFU", "warm-up s",
                "mem MiB", "vs first"),
               [(r["name"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.1f}", f"{r['ms_data']:.1f}",
                 f"{r['ms_forward']:.1f}", f"{r['ms_backward']:.1f}", f"{r['ms_optimizer']:.1f}",
                 f"{r['achieved_tflops']:.3f}", f"{100 * r['mfu']:.1f}%", f"{r['warmup_s']:.1f}",
                 f"{r['peak_mem_mib']:.0f}", f"{r['speedup']:.2f}x") for r in res["results"]])
