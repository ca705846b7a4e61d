"""Training: `setup(recipe)` builds everything, `run_loop(trainer)` trains it.

One loop for every objective: what differs between runs is the batch source and the loss function.
"""

from __future__ import annotations

import base64
import contextlib
import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import __version__
from lmforge.checkpoint import (
    load_model_weights,
    load_optimizer,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_files,
)
from lmforge.config import Recipe, to_toml
from lmforge.errors import ConfigError, TrainingError
from lmforge.evaluate import evaluate_loss
from lmforge.fsutil import atomic_write_text
from lmforge.metrics import MetricsWriter, Progress, truncate_after
from lmforge.models.transformer import Transformer, param_summary
from lmforge.objectives import autoregressive_loss
from lmforge.optim import lr_at, make_optimizer, set_lr
from lmforge.runtime import (
    Dist,
    autocast_ctx,
    configure_backends,
    dist_from_env,
    peak_flops,
    prepare_model,
    resolve_device,
    resolve_dtype,
    seed_everything,
)

INTERRUPTED_EXIT = 130
# recipe keys whose change makes a resumed run a different run
RUN_DEFINING = ("model", "tokenizer_fingerprint", "train.micro_batch_size", "train.batch_size_tokens")


@dataclass
class Trainer:
    recipe: Recipe
    dist: Dist
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    raw: Transformer
    optimizer: torch.optim.Optimizer
    train_loader: Any
    val_loader: Any
    tokenizer: Any
    token_bytes: torch.Tensor
    run_dir: Path
    accum: int
    loss_fn: Callable = autoregressive_loss
    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    log: Callable[[str], None] = print
    last_val: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        c = self.recipe
        return c.train.micro_batch_size * c.model.seq_len * self.accum * self.dist.world_size


def _accum_steps(recipe: Recipe, world: int) -> int:
    t = recipe.train
    per_micro = t.micro_batch_size * recipe.model.seq_len * world
    if not t.batch_size_tokens:
        return 1
    if t.batch_size_tokens % per_micro:
        raise ConfigError(
            f"train.batch_size_tokens ({t.batch_size_tokens}) must be a multiple of micro_batch_size * seq_len "
            f"* world_size = {per_micro}"
        )
    return t.batch_size_tokens // per_micro


def _rng_state() -> dict[str, Any]:
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": np.random.get_state(legacy=False),
        "torch": enc(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [enc(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    dec = lambda s: torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())  # noqa: E731
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(dec(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([dec(s) for s in state["cuda"]])


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(run-defining differences, harmless differences) between two flattened states."""
    a, b = _flatten(old), _flatten(new)
    defining, harmless = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            (defining if key.startswith(RUN_DEFINING) else harmless).append(line)
    return defining, harmless


def _prepare_run_dir(run_dir: Path, resume: bool, fresh: bool) -> None:
    ckpts = run_dir / "checkpoints"
    if fresh and not resume:
        for name in ("checkpoints", "tb", "plots", "eval"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "samples.txt"):
            (run_dir / name).unlink(missing_ok=True)
    elif not resume and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(
            f"{run_dir} already holds checkpoints: pass --resume to continue it or --fresh to start over"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def setup(recipe: Recipe, *, resume: bool = False, fresh: bool = False, log: Callable = print) -> Trainer:
    from lmforge.loaders.memmap import MemmapLoader
    from lmforge.shards import check_tokenizer
    from lmforge.tokenizer import load_tokenizer

    dist = dist_from_env()
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = resolve_device(recipe.train.device, dist)
    dtype = resolve_dtype(recipe.train.dtype, device)
    configure_backends(device, recipe.train.threads)
    tokenizer = load_tokenizer(recipe.tokenizer.dir)
    check_tokenizer(Path(recipe.data.shards_dir), tokenizer)
    if recipe.model.vocab_size == 0:
        recipe.model.vocab_size = tokenizer.vocab_size
    elif recipe.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({recipe.model.vocab_size}) is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    run_dir = Path(recipe.train.run_dir)
    if dist.is_main:
        _prepare_run_dir(run_dir, resume, fresh)
    seed_everything(recipe.train.seed + dist.rank)
    raw = Transformer(recipe.model)
    optimizer = make_optimizer(raw, recipe.train, device)
    t = recipe.train
    train_loader = MemmapLoader(recipe.data.shards_dir, "train", t.micro_batch_size, recipe.model.seq_len,
                                seed=t.seed, rank=dist.rank, world_size=dist.world_size, device=device)
    val_loader = MemmapLoader(recipe.data.shards_dir, "val", t.micro_batch_size, recipe.model.seq_len,
                              seed=t.seed + 1, rank=dist.rank, world_size=dist.world_size, device=device)
    tr = Trainer(
        recipe=recipe, dist=dist, device=device, dtype=dtype, model=raw, raw=raw, optimizer=optimizer,
        train_loader=train_loader, val_loader=val_loader, tokenizer=tokenizer,
        token_bytes=torch.as_tensor(tokenizer.token_bytes(), dtype=torch.int64), run_dir=run_dir,
        accum=_accum_steps(recipe, dist.world_size), log=log if dist.is_main else (lambda *_: None),
    )
    if resume:
        _restore(tr)
    raw.to(device)
    tr.model, tr.raw = prepare_model(raw, device, compile=recipe.train.compile, dist=dist)
    if dist.is_main:
        atomic_write_text(run_dir / "config.toml", to_toml(recipe))
    return tr


def _state(tr: Trainer) -> dict[str, Any]:
    return {
        "lmforge_version": __version__,
        "tokens_seen": tr.tokens_seen,
        "best_val_loss": tr.best_val if math.isfinite(tr.best_val) else None,
        "val": tr.last_val,
        "model_config": tr.recipe.model.model_dump(mode="json"),
        "recipe": tr.recipe.model_dump(mode="json"),
        "tokenizer_fingerprint": tr.tokenizer.fingerprint,
        "loader": tr.train_loader.state_dict(),
        "val_loader": tr.val_loader.state_dict(),
        "rng": _rng_state(),
        "world_size": tr.dist.world_size,
    }


def _restore(tr: Trainer) -> None:
    ckpt_root = tr.run_dir / "checkpoints"
    if not ckpt_root.is_dir():
        raise TrainingError(f"nothing to resume: {ckpt_root} does not exist (drop --resume to start a new run)")
    ckpt = resolve_checkpoint(ckpt_root, prefer="latest")
    verify_files(ckpt)
    state = read_state(ckpt)
    old = {"model": state["model_config"], "tokenizer_fingerprint": state["tokenizer_fingerprint"],
           "train": state["recipe"]["train"]}
    new = {"model": tr.recipe.model.model_dump(mode="json"), "tokenizer_fingerprint": tr.tokenizer.fingerprint,
           "train": tr.recipe.train.model_dump(mode="json")}
    defining, harmless = config_changes(old, new)
    if defining:
        raise ConfigError("cannot resume: the run would change: " + "; ".join(defining))
    for line in harmless:
        tr.log(f"resume: changed {line}")
    load_model_weights(tr.raw, ckpt)
    load_optimizer(tr.optimizer, ckpt, tr.dist.rank)
    tr.step = state["step"]
    tr.tokens_seen = state["tokens_seen"]
    tr.best_val = state["best_val_loss"] if state.get("best_val_loss") is not None else math.inf
    tr.last_val = state.get("val", {})
    tr.train_loader.load_state_dict(state["loader"])
    tr.val_loader.load_state_dict(state["val_loader"])
    _set_rng_state(state["rng"])
    truncate_after(tr.run_dir / "metrics.jsonl", tr.step)
    tr.log(f"resumed from {ckpt} at step {tr.step}")


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to finish the step and save; a second Ctrl-C exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def validate(tr: Trainer, batches: int | None = None) -> dict[str, float]:
    loader = tr.val_loader
    res = evaluate_loss(tr.raw, loader, tr.token_bytes, device=tr.device, dtype=tr.dtype,
                        max_batches=batches or tr.recipe.eval.batches)
    return res


def _save(tr: Trainer, is_best: bool) -> Path | None:
    if not tr.dist.is_main:
        return None
    return save_checkpoint(
        tr.run_dir / "checkpoints", tr.step, tr.raw, _state(tr), optimizer=tr.optimizer,
        tokenizer_dir=Path(tr.recipe.tokenizer.dir), rank=tr.dist.rank, is_best=is_best,
        keep=tr.recipe.train.keep_checkpoints,
    )


def run_loop(tr: Trainer) -> dict[str, Any]:
    """Train until max_steps (or max_time_s, or a signal). Returns a summary."""
    cfg = tr.recipe.train
    metrics = MetricsWriter(tr.run_dir) if tr.dist.is_main else None
    progress = Progress(cfg.max_steps, tr.step)
    flops_tok = tr.raw.flops_per_token()
    peak = peak_flops(tr.device, tr.dtype)
    p = param_summary(tr.raw)
    tr.log(f"model: {tr.recipe.model.arch}, {p['total'] / 1e6:.2f}M params ({p['non_embedding'] / 1e6:.2f}M "
           f"non-embedding), device {tr.device}, dtype {str(tr.dtype).replace('torch.', '')}, "
           f"{tr.tokens_per_step} tokens/step, grad accum {tr.accum}")
    it = iter(tr.train_loader)
    smooth = None
    t_start = t_last = time.perf_counter()
    tok_since = 0
    saved_at = -1
    interrupted = False
    tr.model.train()
    with _StopFlag() as stop:
        while tr.step < cfg.max_steps:
            set_lr(tr.optimizer, lr := lr_at(tr.step, cfg))
            loss_sum = torch.zeros((), device=tr.device)
            for micro in range(tr.accum):
                x, y = next(it)
                sync = tr.model.no_sync if (tr.dist.enabled and micro < tr.accum - 1) else contextlib.nullcontext
                with sync(), autocast_ctx(tr.device, tr.dtype):
                    loss = tr.loss_fn(tr.model, x, y)
                (loss / tr.accum).backward()
                loss_sum += loss.detach()
            gnorm = torch.nn.utils.clip_grad_norm_(tr.raw.parameters(), cfg.grad_clip or float("inf"))
            if not (torch.isfinite(gnorm) and torch.isfinite(loss_sum)):
                tr.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"non-finite loss or gradient at step {tr.step + 1} (loss {loss_sum.item() / tr.accum}); "
                    f"the last good checkpoint is kept in {tr.run_dir / 'checkpoints'}; try a lower train.lr"
                )
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            tr.step += 1
            tr.tokens_seen += tr.tokens_per_step
            tok_since += tr.tokens_per_step
            last = tr.step == cfg.max_steps or (cfg.max_time_s and time.perf_counter() - t_start > cfg.max_time_s)
            if tr.step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                lossv = loss_sum.item() / tr.accum
                smooth = lossv if smooth is None else 0.9 * smooth + 0.1 * lossv
                tps = tok_since / max(now - t_last, 1e-9)
                vals = {"train/loss": lossv, "train/loss_smooth": smooth, "train/lr": lr,
                        "train/grad_norm": float(gnorm), "train/tok_per_sec": tps,
                        "train/mfu": tps * flops_tok / peak if peak else 0.0,
                        "train/tokens": tr.tokens_seen}
                tr.log(progress.line(tr.step, vals))
                if metrics:
                    metrics.log(tr.step, vals)
                t_last, tok_since = now, 0
            is_best = False
            if tr.step % cfg.eval_every == 0 or last:
                tr.last_val = validate(tr)
                is_best = tr.last_val["loss"] < tr.best_val
                tr.best_val = min(tr.best_val, tr.last_val["loss"])
                tr.log(f"step {tr.step}: val loss {tr.last_val['loss']:.4f} | bpb {tr.last_val['bpb']:.4f}"
                       + (" (best)" if is_best else ""))
                if metrics:
                    metrics.log(tr.step, {"val/loss": tr.last_val["loss"], "val/bpb": tr.last_val["bpb"],
                                          "val/perplexity": tr.last_val["perplexity"]})
                t_last = time.perf_counter()  # validation time is not training throughput
            if tr.step % cfg.save_every == 0 or last or stop.requested or is_best:
                path = _save(tr, is_best)
                saved_at = tr.step
                if path:
                    tr.log(f"checkpoint: {path}")
                t_last = time.perf_counter()
            if stop.requested:
                interrupted = True
                break
            if last:
                break
    if saved_at != tr.step:
        _save(tr, False)
    if metrics:
        metrics.close()
    return {"steps": tr.step, "tokens": tr.tokens_seen, "seconds": time.perf_counter() - t_start,
            "interrupted": interrupted, "val": tr.last_val, "best_val_loss": tr.best_val}
