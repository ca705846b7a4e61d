"""Evaluation: loss/perplexity/bits per byte and top-k accuracy over windows, loading checkpoints
(lmforge or Hugging Face dirs) for evaluation, and running tasks over many checkpoints."""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import CheckpointError
from lmforge.runtime import autocast_ctx
from lmforge.tasks import Progress, TaskOptions, TaskResult, task_module
from lmforge.tasks.scoring import EvalModel

TOPK = (1, 5, 10)


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    token_bytes: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
    topk: Sequence[int] = TOPK,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, float]:
    """`evaluate_loss`'s numbers plus `top{k}`: how often the target is among the k likeliest tokens."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    sums = {k: torch.zeros((), dtype=torch.float64, device=device)
            for k in ("nll", "count", "text_nll", "bytes", *(f"top{k}" for k in topk))}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        mask = batch[2].to(device) if len(batch) > 2 else torch.ones_like(y, dtype=torch.bool)
        mask = mask & (y >= 0)
        with autocast_ctx(device, dtype):
            logits = model(x)  # (B, T, vocab)
        logits = logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten().clamp_min(0), reduction="none")
        nll = nll.view_as(y).double()
        nbytes = token_bytes[y.clamp_min(0)].double() * mask
        sums["nll"] += (nll * mask).sum()
        sums["count"] += mask.sum()
        sums["text_nll"] += (nll * (nbytes > 0)).sum()  # special tokens have no bytes: out of bpb
        sums["bytes"] += nbytes.sum()
        if topk:
            kmax = min(max(topk), logits.shape[-1])
            ranks = logits.topk(kmax, dim=-1).indices == y.clamp_min(0)[..., None]  # (B, T, kmax)
            for k in topk:
                sums[f"top{k}"] += (ranks[..., :k].any(-1) & mask).sum()
        if progress is not None:
            progress(x.shape[0])
    model.train(was_training)
    return _lm_metrics({k: v.item() for k, v in sums.items()}, topk)


def _lm_metrics(s: dict[str, float], topk: Sequence[int]) -> dict[str, float]:
    n, nb = s["count"], s["bytes"]
    if n == 0:
        out = {"loss": float("nan"), "perplexity": float("nan"), "bpb": float("nan"), "tokens": 0, "bytes": 0}
        return {**out, **{f"top{k}": float("nan") for k in topk}}
    loss = s["nll"] / n
    out = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": s["text_nll"] / (math.log(2) * nb) if nb else float("nan"),
        "tokens": int(n),
        "bytes": int(nb),
    }
    return {**out, **{f"top{k}": s[f"top{k}"] / n for k in topk}}


def evaluate_loss(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    token_bytes: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Score (x, y) or (x, y, mask) batches; mask marks the targets to count (sliding windows).

    loss/perplexity average over every counted target; bits per byte divides the summed NLL of
    targets that are text by their true UTF-8 byte count, so special tokens (0 bytes) are left out
    of both sides and tokenizers of any vocabulary compare fairly.
    """
    return evaluate_lm(model, batches, token_bytes, device=device, dtype=dtype, max_batches=max_batches,
                       topk=())


# ---- what to evaluate --------------------------------------------------------------------------------
def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "state.json").is_file()


def resolve_targets(paths: Sequence[str | Path], all_checkpoints: bool = False) -> list[Path]:
    """CKPT arguments → model dirs: globs expanded, run dirs kept whole (or split into every step)."""
    from lmforge.checkpoint import list_steps

    out: list[Path] = []
    for arg in map(str, paths):
        found = sorted(Path(p) for p in glob.glob(arg)) if any(c in arg for c in "*?[") else [Path(arg)]
        if not found:
            raise CheckpointError(f"{arg} matches nothing")
        for p in found:
            if not p.exists():
                raise CheckpointError(f"{p} does not exist")
            steps = (list_steps(p / "checkpoints") or list_steps(p)) if all_checkpoints else []
            out += steps or [p]
    unique = list(dict.fromkeys(p.resolve() for p in out))
    if not unique:
        raise CheckpointError("no checkpoints to evaluate")
    return unique


def load_eval_model(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> EvalModel:
    """A checkpoint dir, run dir (best, else latest) or exported Hugging Face dir → EvalModel (fp32)."""
    p, device = Path(path), torch.device(device)
    if is_hf_dir(p):
        return _load_hf(p, device, dtype)
    from lmforge.generate import load_for_inference

    model, tok, state = load_for_inference(p, device)
    ckpt = Path(state["path"])
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    step = state.get("step")
    name = f"{run_dir.name}@{step}" if run_dir else f"{ckpt.name}@{step}"
    return EvalModel(model, tok, name, str(ckpt), step, "lmforge", device, dtype, run_dir,
                     _shards_dir(state, run_dir))


def _shards_dir(state: dict, run_dir: Path | None) -> str | None:
    """The run's shard dir; a relative recipe path is tried from here, then next to the run dir."""
    rel = ((state.get("recipe") or {}).get("data") or {}).get("shards_dir")
    if not rel:
        return None
    for cand in (Path(rel), *((run_dir / Path(rel).name,) if run_dir else ())):
        if (cand / "manifest.json").is_file():
            return str(cand)
    return rel


def _load_hf(path: Path, device: torch.device, dtype: torch.dtype) -> EvalModel:
    """An exported HF dir through the exporter's own key map (models/hf.py) into our Transformer."""
    from lmforge.models.hf import load_hf_dir
    from lmforge.models.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    cfg, sd = load_hf_dir(path)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device=device, dtype=torch.float32).eval()
    return EvalModel(model, Tokenizer.load(path), path.name, str(path), None, "hf", device, dtype)


# ---- running ---------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    """Everything one `lmforge eval` produced."""

    tasks: list[str]
    models: list[dict[str, Any]] = field(default_factory=list)
    results: dict[tuple[str, str], TaskResult] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def run_eval(targets: Sequence[Path], tasks: Sequence[str], options: dict[str, TaskOptions], *,
             device: torch.device, dtype: torch.dtype, batch_size: int = 16,
             progress: Callable[[str, str], Progress] | None = None,
             log: Callable[[str], Any] = print) -> EvalRun:
    """Load every task's data first (so a missing file fails before any model loads), then score each
    checkpoint on each task, one model in memory at a time."""
    modules = {t: task_module(t) for t in tasks}
    data = {t: modules[t].load(options[t]) for t in tasks}
    run = EvalRun(list(tasks))
    names: set[str] = set()
    for path in targets:
        em = load_eval_model(path, device, dtype)
        em.batch_size = batch_size
        while em.name in names:  # two dirs of the same name: keep both columns apart
            em.name += "'"
        names.add(em.name)
        run.models.append({"name": em.name, "path": em.path, "step": em.step, "format": em.fmt,
                           "run_dir": str(em.run_dir) if em.run_dir else None,
                           "tokenizer": em.fingerprint[:16], "vocab_size": em.tokenizer.vocab_size,
                           "seq_len": em.seq_len})
        for t in tasks:
            bar = progress(em.name, t) if progress else Progress()
            t0 = time.perf_counter()
            res = modules[t].run(em, data[t], options[t], bar)
            res.seconds = time.perf_counter() - t0
            run.results[(em.name, t)] = res
            if res.error:
                log(f"{em.name} {t}: {res.error}")
        del em
    return run
