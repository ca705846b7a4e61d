"""`--profile`: a torch.profiler trace of a few training steps (and a CUDA memory snapshot)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def maybe_profile(enabled: bool, out_dir: Path, device: torch.device, active: int = 3) -> Iterator:
    """Yield a profiler to call `.step()` on after each training step, or None when disabled.

    Skips one step and warms up one, records `active` steps, then writes `trace.json` (open it in
    chrome://tracing or Perfetto) and, on CUDA, `memory_snapshot.pickle` (pytorch.org/memory_viz).
    """
    if not enabled:
        yield None
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.memory._record_memory_history(max_entries=100_000)

    def export(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(out_dir / "trace.json"))
        (out_dir / "summary.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    schedule = torch.profiler.schedule(wait=1, warmup=1, active=active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=export,
                                record_shapes=True, profile_memory=True) as prof:
        yield prof
    if cuda:
        torch.cuda.memory._dump_snapshot(str(out_dir / "memory_snapshot.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)


def nvtx_range(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """A named NVTX range on CUDA (Nsight Systems shows it on the timeline); nothing elsewhere."""
    return torch.cuda.nvtx.range(name) if device.type == "cuda" else contextlib.nullcontext()
