"""Where and how the model runs: device, dtype, distributed environment, seeding, compile.

Model code stays single-device; `prepare_model` is the one place that wraps it.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> Dist:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); a plain run is rank 0 of 1."""
    return Dist(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_distributed() -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); a plain run is rank 0 of 1."""
    dist = dist_from_env()
    if dist.enabled and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist


def resolve_device(name: str = "auto", dist: Dist | None = None) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            idx = dist.local_rank if dist else 0
            return torch.device("cuda", idx)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); emulated bf16 is ~100x slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on CUDA with bf16 support and on CPUs with native bf16, else fp32."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_backends(device: torch.device, threads: int = 0) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        # TF32 matmuls on Ampere and newer: ~8x the fp32 rate for a negligible precision cost
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def prepare_model(model: nn.Module, device: torch.device, *, compile: bool = False, dist: Dist | None = None,
                  parallel: str = "ddp"):
    """Move to device, then DDP or FSDP, then compile, in that order. Returns (wrapped, raw).

    FSDP shards `raw` in place (it stays the module to save, evaluate and sample); DDP wraps it."""
    raw = model.to(device)
    wrapped: nn.Module = raw
    if dist is not None and dist.enabled and parallel == "fsdp":
        from lmforge.sharded import shard_model

        wrapped = shard_model(raw, device)
    elif dist is not None and dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped, raw


# Dense bf16 peak FLOP/s of common accelerators, for MFU.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "T4": 65e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> float:
    """Peak FLOP/s for MFU: configured, else the GPU table, else a short matmul measurement."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2
        return 0.0
    return measure_matmul_flops(device, dtype)


@lru_cache(maxsize=8)
def measure_matmul_flops(device: torch.device, dtype: torch.dtype, m: int = 4096, k: int = 384,
                         n: int = 1536, repeats: int = 5) -> float:
    import time

    # a private generator: measuring must not move the training RNG (exact resume depends on it)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best
