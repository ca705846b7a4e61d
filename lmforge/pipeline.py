"""Stages of a recipe chained together: tokenizer → shards → train → evaluate → samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.config import Recipe
from lmforge.evaluate import evaluate_loss
from lmforge.fsutil import atomic_write_json
from lmforge.generate import SamplingParams, generate_text
from lmforge.metrics import plot_runs


def final_eval(tr) -> dict[str, Any]:
    """Every validation token scored once (or the configured random batches), saved to eval/final.json."""
    from lmforge.train import reduce_eval, validate

    res = reduce_eval(_score_all(tr), tr.dist, tr.device) if tr.recipe.eval.final == "full" else validate(tr)
    res["step"] = tr.step
    if tr.dist.is_main:
        atomic_write_json(tr.run_dir / "eval" / "final.json", res)
    tr.log(f"validation ({res['tokens']:,} tokens, {res['bytes']:,} bytes): loss {res['loss']:.4f} | "
        f"perplexity {res['perplexity']:.2f} | bits per byte {res['bpb']:.4f}")
    return res


def _score_all(tr) -> dict[str, Any]:
    """This rank's share of the validation tokens, each scored once."""
    from lmforge.loaders import make_loader

    r = tr.recipe
    loader = make_loader(r, "val", batch_size=r.train.micro_batch_size, seq_len=r.model.seq_len,
                         seed=r.train.seed + 1, mode="sequential", stride=r.eval.stride or None,
                         device=tr.device, rank=tr.dist.rank, world_size=tr.dist.world_size, tokenizer=tr.tokenizer)
    batches = loader.iter_eval()
    if tr.sharded:  # shares may differ by a batch, and every forward of a sharded model is a collective
        from lmforge.sharded import in_lockstep

        batches = in_lockstep(batches, r.model.seq_len, tr.device)
    evaluate = evaluate_loss
    if r.model.objective != "autoregressive":  # e.g. diffusion: its ELBO, a bound on the NLL
        from lmforge.objectives import evaluator_for

        evaluate = evaluator_for(r.model, tr.tokenizer)
    return evaluate(tr.raw, batches, tr.token_bytes, device=tr.device, dtype=tr.dtype)


def write_samples(tr, model: torch.nn.Module | None) -> list[tuple[str, str]]:
    """Samples from the [sample] prompts, appended to samples.txt; `model` is None on ranks that do not
    sample (see `train.unsharded`)."""
    if model is None:
        return []
    s = tr.recipe.sample
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p)
    out = []
    for i, prompt in enumerate(s.prompts):
        params.seed = s.seed + i
        if tr.recipe.model.objective == "diffusion":  # iterative unmasking, not next-token sampling
            from lmforge.diffusion import SAMPLE_STEPS, diffusion_generate

            text = diffusion_generate(model, tr.tokenizer, prompt, max_new_tokens=s.max_new_tokens,
                                      steps=SAMPLE_STEPS, temperature=s.temperature, top_k=s.top_k,
                                      top_p=s.top_p, seed=params.seed)
        elif getattr(tr.tokenizer, "chat_template", None):  # a chat model: the prompt is a user turn
            from lmforge.sft import answer

            text = answer(model, tr.tokenizer, [{"role": "user", "content": prompt}], params)
        else:
            text = generate_text(model, tr.tokenizer, prompt, params)
        out.append((prompt, text))
    tr.raw.train()
    with open(tr.run_dir / "samples.txt", "a", encoding="utf-8") as f:
        for prompt, text in out:
            f.write(f"=== step {tr.step} | prompt {prompt!r}\n{prompt}{text}\n\n")
    return out


def train_and_report(tr, profile: bool = False) -> dict:
    """run_loop, then (unless interrupted) the final evaluation; always releases the run dir."""
    from lmforge.errors import Interrupted
    from lmforge.profiling import maybe_profile
    from lmforge.train import run_loop, unsharded

    try:
        with maybe_profile(profile, tr.run_dir / "profile", tr.device) as prof:
            summary = run_loop(tr, prof)
        if summary["interrupted"]:
            raise Interrupted(f"interrupted at step {tr.step}; checkpoint saved in {tr.run_dir / 'checkpoints'}. "
                              "Resume with the same command and --resume")
        result = {"train": summary, "eval": final_eval(tr), "samples": write_samples(tr, unsharded(tr))}
        if tr.dist.is_main:
            tr.log(f"plots: {', '.join(str(p) for p in plot_runs([tr.run_dir]))}")
            for prompt, text in result["samples"]:
                tr.log(f"\n--- sample: {prompt!r}\n{prompt}{text}")
        return result
    finally:
        tr.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_pipeline(recipe: Recipe, *, resume: bool = False, fresh: bool = True, log: Callable = print,
                 stop_at: int | None = None) -> dict:
    from lmforge.loaders import is_streaming
    from lmforge.runtime import init_distributed
    from lmforge.shards import ensure_shards
    from lmforge.tokenizer import ensure_tokenizer
    from lmforge.train import setup

    t0 = time.perf_counter()
    dist = init_distributed()
    if dist.is_main:  # one process prepares the data; the others wait for it
        tokenizer = ensure_tokenizer(recipe, log=log)
        if not is_streaming(recipe):  # streaming loaders tokenize the raw text as they go
            ensure_shards(recipe, tokenizer, log=log)
    if dist.enabled:
        torch.distributed.barrier()
    t_data = time.perf_counter() - t0
    tr = setup(recipe, resume=resume, fresh=fresh and not resume, log=log)
    tr.stop_at = stop_at
    result = {**train_and_report(tr), "data_seconds": t_data}
    summary = result["train"]
    result["seconds"] = time.perf_counter() - t0
    log(f"\ndone in {result['seconds']:.0f} s (data {t_data:.1f} s, training {summary['seconds']:.0f} s); "
        f"outputs in {Path(recipe.train.run_dir)}/")
    return result
