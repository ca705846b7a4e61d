"""Where training numbers go: metrics.jsonl, TensorBoard, the console, and PNG plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard
    and, when asked (`wandb_project`), to Weights & Biases."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb_project: str = "",
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 (held open for the whole run)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                self._tb = None
        self._wandb = start_wandb(Path(run_dir), wandb_project, config or {}) if wandb_project else None

    def log(self, step: int, values: dict[str, Any]) -> None:
        self._f.write(orjson.dumps({"step": step, **values}) + b"\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def require_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        from lmforge.errors import ConfigError

        raise ConfigError("train.wandb = true needs the wandb package: pip install wandb "
                          "(or set train.wandb = false)") from None
    return wandb


def start_wandb(run_dir: Path, project: str, config: dict[str, Any]) -> Any:
    """A W&B run that a resumed training continues: its id is kept in the run dir (`wandb_id`)."""
    wandb = require_wandb()
    id_file = run_dir / "wandb_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                      config=config)


def memory_stats(device) -> dict[str, float]:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU, in MiB."""
    import torch

    if getattr(device, "type", "") == "cuda":
        return {"mem/cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    return {"mem/cpu_rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a resumed run re-logs them)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_bytes().splitlines() if line and orjson.loads(line).get("step", 0) <= step]
    path.write_bytes(b"".join(line + b"\n" for line in keep))


def read_metrics(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


class Progress:
    """A one-line console report per logged step with throughput and ETA."""

    def __init__(self, total_steps: int, start_step: int = 0) -> None:
        self.total = total_steps
        self.t0 = time.perf_counter()
        self.start_step = start_step

    def line(self, step: int, v: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        parts = [f"step {step:>{len(str(self.total))}}/{self.total}", f"loss {v['train/loss']:.4f}"]
        if "train/loss_smooth" in v:
            parts.append(f"(avg {v['train/loss_smooth']:.4f})")
        parts += [f"lr {v['train/lr']:.2e}", f"gnorm {v.get('train/grad_norm', 0):.2f}",
                  f"{fmt_count(v['train/tok_per_sec'])} tok/s"]
        if v.get("train/mfu"):
            parts.append(f"MFU {100 * v['train/mfu']:.1f}%")
        parts += [f"elapsed {fmt_duration(elapsed)}", f"ETA {fmt_duration(eta)}"]
        return " | ".join(parts)


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    """Loss (train + val) and learning-rate curves as PNG; several runs are overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(r) for r in run_dirs]
    out_dir = Path(out) if out else run_dirs[0] / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_loss, ax_loss = plt.subplots(figsize=(8, 5))
    fig_lr, ax_lr = plt.subplots(figsize=(8, 3))
    for run in run_dirs:
        rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        label = run.name if len(run_dirs) > 1 else ""
        for key, style in (("train/loss", "-"), ("val/loss", "o-")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax_loss.plot(xs, ys, style, label=f"{label} {key}".strip(), markersize=3)
        pts = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax_lr.plot(xs, ys, label=label or "lr")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    paths = [out_dir / "loss.png", out_dir / "lr.png"]
    from lmforge.fsutil import atomic_path

    for fig, path in ((fig_loss, paths[0]), (fig_lr, paths[1])):
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
    return paths
