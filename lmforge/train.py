"""Training: `setup(recipe)` builds everything, `run_loop(trainer)` trains it.

One loop for every objective: what differs between runs is the batch source and the loss function.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import __version__
from lmforge.checkpoint import (
    load_model_weights,
    load_optimizer,
    read_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmforge.config import Recipe, to_toml
from lmforge.errors import ConfigError, TrainingError
from lmforge.evaluate import evaluate_loss
from lmforge.fsutil import atomic_write_text
from lmforge.metrics import MetricsWriter, Progress, memory_stats, truncate_after
from lmforge.models.transformer import Transformer, param_summary
from lmforge.objectives import autoregressive_loss
from lmforge.optim import lr_at, make_optimizer, set_lr
from lmforge.profiling import nvtx_range
from lmforge.resume import RunLock, check_resume_config, find_resumable, rng_state, set_rng_state
from lmforge.runtime import (
    Dist,
    autocast_ctx,
    configure_backends,
    init_distributed,
    peak_flops,
    prepare_model,
    resolve_device,
    resolve_dtype,
    seed_everything,
)

INTERRUPTED_EXIT = 130


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
    lock: RunLock | None = None
    loss_fn: Callable = autoregressive_loss
    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    evals_without_improvement: int = 0
    log: Callable[[str], None] = print
    last_val: dict = field(default_factory=dict)
    val_start: dict | None = None
    stop_at: int | None = None
    """Save and stop after this step, as if interrupted (scheduled preemption, tests)."""
    extra_state: dict = field(default_factory=dict)
    """More for every checkpoint's state.json (SFT: the base model's lineage and the chat template)."""
    sharded: bool = False
    """FSDP: `raw` holds this rank's shards only; checkpoints are sharded (lmforge.sharded)."""

    @property
    def tokens_per_step(self) -> int:
        c = self.recipe
        return c.train.micro_batch_size * c.model.seq_len * self.accum * self.dist.world_size

    def close(self) -> None:
        for loader in (self.train_loader, self.val_loader):
            close = getattr(loader, "close", None)
            if close:
                close()
        if self.lock:
            self.lock.release()


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


def _prepare_run_dir(run_dir: Path, resume: bool, fresh: bool) -> None:
    ckpts = run_dir / "checkpoints"
    if fresh and not resume:
        for name in ("checkpoints", "tb", "plots", "eval", "profile", "wandb"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "samples.txt", "wandb_id"):
            (run_dir / name).unlink(missing_ok=True)
    elif not resume and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(
            f"{run_dir} already holds checkpoints: pass --resume to continue it or --fresh to start over"
        )


def _make_loaders(recipe: Recipe, dist: Dist, device: torch.device, tokenizer: Any = None):
    from lmforge.loaders import make_loader

    t, seq = recipe.train, recipe.model.seq_len
    common = dict(batch_size=t.micro_batch_size, seq_len=seq, rank=dist.rank, world_size=dist.world_size,
                  device=device, tokenizer=tokenizer)
    return make_loader(recipe, "train", seed=t.seed, **common), make_loader(recipe, "val", seed=t.seed + 1, **common)


def setup(recipe: Recipe, *, resume: bool = False, fresh: bool = False, log: Callable = print,
          loaders: Callable | None = None, loss_fn: Callable | None = None, tokenizer: Any = None) -> Trainer:
    """Build the run. `loaders(recipe, dist, device) -> (train, val)` and `loss_fn(model, *batch)`
    replace the pretraining ones (SFT passes its own); `tokenizer` replaces `tokenizer.dir`'s."""
    from lmforge.loaders import is_streaming
    from lmforge.objectives import loss_for
    from lmforge.shards import check_tokenizer
    from lmforge.tokenizer import load_tokenizer

    dist = init_distributed()
    device = resolve_device(recipe.train.device, dist)
    dtype = resolve_dtype(recipe.train.dtype, device)
    configure_backends(device, recipe.train.threads)
    if tokenizer is None:
        tokenizer = load_tokenizer(recipe.tokenizer.dir)
        if not is_streaming(recipe):  # streaming mode tokenizes as it reads: there are no shards
            check_tokenizer(Path(recipe.data.shards_dir), tokenizer)
    if recipe.model.vocab_size == 0:
        recipe.model.vocab_size = tokenizer.vocab_size
    elif recipe.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({recipe.model.vocab_size}) is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    if recipe.train.wandb and dist.is_main:
        from lmforge.metrics import require_wandb

        require_wandb()
    run_dir = Path(recipe.train.run_dir)
    lock = RunLock(run_dir).acquire() if dist.is_main else None
    try:
        if dist.is_main:
            _prepare_run_dir(run_dir, resume, fresh)
        seed_everything(recipe.train.seed + dist.rank)
        raw = Transformer(recipe.model)
        if recipe.train.init_from and not resume:
            init_weights_from(raw, recipe.train.init_from, log)
        if loaders:
            train_loader, val_loader = loaders(recipe, dist, device)
        else:
            train_loader, val_loader = _make_loaders(recipe, dist, device, tokenizer)
        sharded = dist.enabled and recipe.train.parallel == "fsdp"
        model = raw
        if sharded:  # sharding replaces the parameters: the optimizer must be built on the new ones
            model, raw = prepare_model(raw, device, compile=recipe.train.compile, dist=dist, parallel="fsdp")
        tr = Trainer(
            recipe=recipe, dist=dist, device=device, dtype=dtype, model=model, raw=raw,
            optimizer=make_optimizer(raw, recipe.train, device), train_loader=train_loader,
            val_loader=val_loader, tokenizer=tokenizer,
            token_bytes=torch.as_tensor(tokenizer.token_bytes(), dtype=torch.int64), run_dir=run_dir,
            accum=_accum_steps(recipe, dist.world_size), lock=lock,
            loss_fn=loss_fn or loss_for(recipe.model, tokenizer),
            log=log if dist.is_main else (lambda *_: None), sharded=sharded,
        )
        if resume:
            _restore(tr)
        if not sharded:
            raw.to(device)
            tr.model, tr.raw = prepare_model(raw, device, compile=recipe.train.compile, dist=dist)
    except BaseException:
        if lock:
            lock.release()
        raise
    if dist.is_main:
        atomic_write_text(run_dir / "config.toml", to_toml(recipe))
    return tr


def init_weights_from(model: Transformer, path: str, log: Callable = print) -> None:
    """Start from another checkpoint's weights (a fresh optimizer and step 0, unlike --resume)."""
    from lmforge.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    theirs = {k: v for k, v in state.get("model_config", {}).items() if k not in ("preset", "dropout")}
    ours = {k: v for k, v in model.cfg.model_dump(mode="json").items() if k not in ("preset", "dropout")}
    diff = [f"model.{k}: {theirs.get(k)!r} in {ckpt} vs {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
    if diff:
        raise ConfigError("train.init_from does not match this model: " + "; ".join(diff))
    load_model_weights(model, ckpt)
    log(f"initialised from {ckpt}")


def _state(tr: Trainer) -> dict[str, Any]:
    rngs = [rng_state()]
    loaders = [tr.train_loader.state_dict()]
    if tr.dist.enabled:  # every rank's RNG and loader position, gathered into rank 0's state.json
        rngs, loaders = [None] * tr.dist.world_size, [None] * tr.dist.world_size
        torch.distributed.all_gather_object(rngs, rng_state())
        torch.distributed.all_gather_object(loaders, tr.train_loader.state_dict())
    return {
        "lmforge_version": __version__,
        "tokens_seen": tr.tokens_seen,
        "best_val_loss": tr.best_val if math.isfinite(tr.best_val) else None,
        "evals_without_improvement": tr.evals_without_improvement,
        "val": tr.last_val,
        "model_config": tr.recipe.model.model_dump(mode="json"),
        "recipe": tr.recipe.model_dump(mode="json"),
        "tokenizer_fingerprint": tr.tokenizer.fingerprint,
        "loader": loaders,
        "rng": rngs,
        "world_size": tr.dist.world_size,
        **tr.extra_state,
    }


def _restore(tr: Trainer) -> None:
    ckpt = find_resumable(tr.run_dir / "checkpoints", tr.log)
    state = read_state(ckpt)
    new = {"model": tr.recipe.model.model_dump(mode="json"), "tokenizer_fingerprint": tr.tokenizer.fingerprint,
           "train": tr.recipe.train.model_dump(mode="json"), "world_size": tr.dist.world_size}
    for line in check_resume_config(state, new):
        tr.log(f"resume: changed {line}")
    if tr.sharded:
        from lmforge.sharded import load_sharded

        load_sharded(ckpt, tr.raw, tr.optimizer)
    else:
        load_model_weights(tr.raw, ckpt)
        load_optimizer(tr.optimizer, ckpt, 0)
    tr.step = state["step"]
    tr.tokens_seen = state["tokens_seen"]
    tr.best_val = state["best_val_loss"] if state.get("best_val_loss") is not None else math.inf
    tr.evals_without_improvement = state.get("evals_without_improvement", 0)
    tr.last_val = state.get("val", {})
    tr.train_loader.load_state_dict(state["loader"][tr.dist.rank])
    set_rng_state(state["rng"][tr.dist.rank])
    if tr.dist.is_main:
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
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def validate(tr: Trainer) -> dict[str, float]:
    # the same validation windows every time, so that successive losses compare the model, not the sample
    if tr.val_start is None:
        tr.val_start = tr.val_loader.state_dict()
    tr.val_loader.load_state_dict(tr.val_start)
    evaluate = evaluate_loss
    if tr.recipe.model.objective != "autoregressive":  # e.g. diffusion: its ELBO, a bound on the NLL
        from lmforge.objectives import evaluator_for

        evaluate = evaluator_for(tr.recipe.model, tr.tokenizer)
    res = evaluate(tr.raw, tr.val_loader, tr.token_bytes, device=tr.device, dtype=tr.dtype,
                   max_batches=tr.recipe.eval.batches)
    return reduce_eval(res, tr.dist, tr.device)


def reduce_eval(res: dict[str, float], dist: Dist, device: torch.device) -> dict[str, float]:
    """Combine per-rank evaluation results (each rank scored its own windows) into one."""
    if not dist.enabled:
        return res
    ln2 = math.log(2)
    t = torch.tensor([res["loss"] * res["tokens"], res["tokens"], res["bpb"] * ln2 * res["bytes"], res["bytes"]],
                     dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    loss = (t[0] / t[1]).item()
    return {**res, "loss": loss, "tokens": int(t[1]), "bpb": (t[2] / (ln2 * t[3])).item(), "bytes": int(t[3]),
            "perplexity": math.exp(min(loss, 700.0))}


def _save(tr: Trainer, is_best: bool) -> Path | None:
    failures: tuple[type[Exception], ...] = (OSError,)
    if tr.sharded:  # only then: torch.distributed.checkpoint takes a second to import
        from torch.distributed.checkpoint import CheckpointException

        failures = (OSError, CheckpointException)
    state = _state(tr)  # collective under DDP: every rank takes part
    if not (tr.dist.is_main or tr.sharded):
        return None
    save = save_sharded_checkpoint if tr.sharded else save_checkpoint  # sharded: every rank writes its part
    try:
        path = save(
            tr.run_dir / "checkpoints", tr.step, tr.raw, state, optimizer=tr.optimizer,
            tokenizer_dir=Path(tr.recipe.tokenizer.dir), is_best=is_best, keep=tr.recipe.train.keep_checkpoints,
        )
    except failures as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise TrainingError(f"could not write the checkpoint for step {tr.step} in {tr.run_dir / 'checkpoints'}: "
                            f"{reason}; the previous checkpoint is intact") from None
    tr.log(f"checkpoint: {path}")
    return path


def _log_step(tr: Trainer, metrics, progress, lossv: float, lr: float, gnorm: float, tps: float,
              smooth: float, flops_tok: float, peak: float, step_s: float) -> None:
    vals = {"train/loss": lossv, "train/loss_smooth": smooth, "train/lr": lr, "train/grad_norm": gnorm,
            "train/tok_per_sec": tps, "train/mfu": tps * flops_tok / peak if peak else 0.0,
            "train/tokens": tr.tokens_seen, "train/step_ms": 1000 * step_s, **memory_stats(tr.device)}
    tr.log(progress.line(tr.step, vals))
    if metrics:
        metrics.log(tr.step, vals)


def _after_validation(tr: Trainer, metrics) -> bool:
    """Validate, track the best loss and early stopping; True when this step is the best so far."""
    from lmforge.pipeline import write_samples

    tr.last_val = validate(tr)
    cfg = tr.recipe.train
    is_best = tr.last_val["loss"] < tr.best_val - cfg.early_stop_min_delta
    if is_best:
        tr.best_val, tr.evals_without_improvement = tr.last_val["loss"], 0
    else:
        tr.evals_without_improvement += 1
    tr.log(f"step {tr.step}: val loss {tr.last_val['loss']:.4f} | bpb {tr.last_val['bpb']:.4f}"
           + (" (best)" if is_best else ""))
    if metrics:
        metrics.log(tr.step, {"val/loss": tr.last_val["loss"], "val/bpb": tr.last_val["bpb"],
                              "val/perplexity": tr.last_val["perplexity"]})
    if cfg.sample_at_eval:
        write_samples(tr, unsharded(tr))
    return is_best


def unsharded(tr: Trainer) -> torch.nn.Module | None:
    """The module to sample from on rank 0: `raw` (None on other ranks), or under FSDP a full copy
    gathered onto rank 0 (a collective: every rank calls it)."""
    if tr.sharded:
        from lmforge.sharded import gather_full_model

        return gather_full_model(tr.raw, tr.device)
    return tr.raw if tr.dist.is_main else None


def _token_weights(tr: Trainer, batches: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each micro-batch's share of the step's gradient: its target tokens over all ranks' targets.

    A micro-batch loss is a mean over its own targets, so weighting by target counts (rather than
    1/accum) makes the step's loss the mean over every target token of the global batch, however the
    masks (SFT) or padding spread them. DDP and FSDP average gradients over ranks, hence `* world`.
    Returns (weights, the global batch's target count)."""
    counts = torch.stack([(b[1] != -1).sum() for b in batches]).double()  # on the device: no sync here
    total = counts.sum()
    if tr.dist.enabled:
        torch.distributed.all_reduce(total)
    return (counts * tr.dist.world_size / total.clamp_min(1)).float(), total


def _sync_grads(tr: Trainer, last: bool):
    """Synchronise gradients across ranks on the last micro-batch only."""
    if not tr.dist.enabled:
        return contextlib.nullcontext()
    if tr.sharded:
        tr.raw.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else tr.model.no_sync()


def _train_step(tr: Trainer, it) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro-batches, clip, optimizer step. Returns (mean loss, grad norm)."""
    # (x, y) or, from loaders with more to say (SFT), (x, y, extras...); all of the step's first, for the weights
    batches = [next(it) for _ in range(tr.accum)]
    weights, targets = _token_weights(tr, batches)
    loss_mean = torch.zeros((), device=tr.device)  # over the global batch's targets once the ranks' shares add up
    for micro, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
        with _sync_grads(tr, micro == tr.accum - 1):
            with nvtx_range("forward", tr.device), autocast_ctx(tr.device, tr.dtype):
                loss = tr.loss_fn(tr.model, *batch)
            with nvtx_range("backward", tr.device):
                (loss * weight).backward()
        # a micro-batch without targets has a NaN mean, weight 0 and zero gradients: it adds nothing
        loss_mean += torch.where(weight > 0, loss.detach(), 0.0) * (weight / tr.dist.world_size)
    if tr.dist.enabled:
        torch.distributed.all_reduce(loss_mean)
    loss_mean = torch.where(targets > 0, loss_mean, torch.nan)  # no target in the whole step: undefined
    clip = tr.recipe.train.grad_clip or float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(tr.raw.parameters(), clip)
    if tr.sharded:  # a DTensor: its value is the same on every rank
        gnorm = gnorm.full_tensor()
    if not (torch.isfinite(gnorm) and torch.isfinite(loss_mean)):
        tr.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            f"non-finite loss or gradient at step {tr.step + 1} (loss {loss_mean.item():.4g}, grad norm "
            f"{gnorm.item():.4g}); nothing was updated and the last good checkpoint in "
            f"{tr.run_dir / 'checkpoints'} is kept; try a lower train.lr"
        )
    with nvtx_range("optimizer", tr.device):
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
    return loss_mean, gnorm


def run_loop(tr: Trainer, profiler=None) -> dict[str, Any]:
    """Train until max_steps, max_time_s, early stopping or a signal. Returns a summary."""
    cfg = tr.recipe.train
    metrics = None
    if tr.dist.is_main:
        metrics = MetricsWriter(tr.run_dir, wandb_project=cfg.wandb_project if cfg.wandb else "",
                                config=tr.recipe.model_dump(mode="json"))
    progress = Progress(cfg.max_steps, tr.step)
    flops_tok, peak = tr.raw.flops_per_token(), peak_flops(tr.device, tr.dtype)
    p = param_summary(tr.raw)
    tr.log(f"model: {tr.recipe.model.arch}, {p['total'] / 1e6:.2f}M params ({p['non_embedding'] / 1e6:.2f}M "
           f"non-embedding), device {tr.device}, dtype {str(tr.dtype).replace('torch.', '')}, "
           f"{tr.tokens_per_step} tokens/step, grad accum {tr.accum}, world size {tr.dist.world_size}")
    it = iter(tr.train_loader)
    smooth, saved_at, stopped = None, -1, ""
    t_start = t_last = time.perf_counter()
    tok_since = steps_since = 0
    tr.model.train()
    try:
        with _StopFlag() as stop:
            while tr.step < cfg.max_steps:
                set_lr(tr.optimizer, lr := lr_at(tr.step, cfg))
                try:
                    loss_mean, gnorm = _train_step(tr, it)
                except StopIteration:  # the loader's data.epochs are used up: keep what was learnt
                    tr.optimizer.zero_grad(set_to_none=True)
                    stopped = "data exhausted"
                    break
                tr.step += 1
                tr.tokens_seen += tr.tokens_per_step
                tok_since, steps_since = tok_since + tr.tokens_per_step, steps_since + 1
                if profiler is not None:
                    profiler.step()
                timed_out = cfg.max_time_s and time.perf_counter() - t_start > cfg.max_time_s
                last = tr.step == cfg.max_steps or bool(timed_out)
                if tr.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    lossv = loss_mean.item()
                    smooth = lossv if smooth is None else 0.9 * smooth + 0.1 * lossv
                    _log_step(tr, metrics, progress, lossv, lr, float(gnorm), tok_since / max(now - t_last, 1e-9),
                              smooth, flops_tok, peak, (now - t_last) / steps_since)
                    t_last, tok_since, steps_since = now, 0, 0
                is_best = False
                if tr.step % cfg.eval_every == 0 or last:
                    is_best = _after_validation(tr, metrics)
                    if cfg.early_stop_patience and tr.evals_without_improvement >= cfg.early_stop_patience:
                        stopped = "early stopping"
                        last = True
                if stop.requested or tr.step == tr.stop_at:
                    stopped = stopped or "interrupted"
                if tr.step % cfg.save_every == 0 or last or is_best or stopped:
                    _save(tr, is_best)
                    saved_at = tr.step
                if tr.step % cfg.eval_every == 0 or last or saved_at == tr.step:
                    t_last = time.perf_counter()  # validation and saving are not training throughput
                if last or stopped:
                    break
    finally:
        if metrics:
            metrics.close()
    if saved_at != tr.step:
        _save(tr, False)
    if stopped == "data exhausted":
        tr.log(f"the training data ran out (data.epochs = {tr.recipe.data.epochs}) at step {tr.step}")
    if stopped == "early stopping":
        tr.log(f"early stopping at step {tr.step}: no improvement in {cfg.early_stop_patience} validations")
    return {"steps": tr.step, "tokens": tr.tokens_seen, "seconds": time.perf_counter() - t_start,
            "interrupted": stopped == "interrupted", "val": tr.last_val, "best_val_loss": tr.best_val}
