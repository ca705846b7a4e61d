"""CLI commands for chat, serve and generation benchmarks, registered on the main app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli import app, bench_app

CkptsArg = Annotated[list[Path] | None, typer.Argument(
    help="Checkpoint dirs or run dirs (best, else latest); none: pick from --runs")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, or auto")]
DtypeOpt = Annotated[str, typer.Option(help="fp32, bf16 or auto (bf16 where the hardware has it)")]
QuantOpt = Annotated[str | None, typer.Option(help="int8: dynamic int8 linear layers (CPU, fp32)")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the forward pass")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Diffusion models: denoising steps (more = better, slower)")]


@app.command()
def chat(
    ckpts: CkptsArg = None,
    runs: Annotated[Path, typer.Option(help="Where to list runs when no CKPT is given")] = Path("runs"),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0)] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    side_by_side: Annotated[bool, typer.Option("--side-by-side",
                                               help="Several models: answers in columns after they finish")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    steps: StepsOpt = 32,
) -> None:
    """Talk to one or several checkpoints: type a prompt, watch the completion stream (/help for commands);
    a masked-diffusion checkpoint's canvas fills in over --steps denoising steps."""
    from lmforge.chat import ChatSettings, pick_checkpoints, run_chat
    from lmforge.sampling import SamplingParams

    paths = [str(p) for p in ckpts] if ckpts else pick_checkpoints(runs)
    if not paths:
        raise typer.Exit(0)
    settings = ChatSettings(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, seed=seed), side_by_side=side_by_side, steps=steps)
    run_chat(paths, settings, device=device, dtype=dtype, quantize=quantize)


@app.command()
def serve(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint dir or run dir (best, else latest)")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 exposes it to the network)")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LMFORGE_API_KEY",
                                                help="Require 'Authorization: Bearer KEY'")] = None,
    model_name: Annotated[str | None, typer.Option(help="The model id clients use (default: run name)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="Waiting requests before answering 429")] = 64,
    max_tokens: Annotated[int, typer.Option(min=0, help="Largest max_tokens allowed (0 = the context)")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantOpt = None,
    compile: CompileOpt = False,
    step_delay: Annotated[float, typer.Option(hidden=True, min=0.0, help="Sleep after each step (tests)")] = 0.0,
    steps: StepsOpt = 32,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions);
    a masked-diffusion checkpoint is sampled in --steps denoising steps per request."""
    from lmforge.serve import serve as run_server

    run_server(str(ckpt), host=host, port=port, api_key=api_key, device=device, dtype=dtype, quantize=quantize,
               model_name=model_name, max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens,
               compile=compile, step_delay_s=step_delay, steps=steps, log=lambda m: typer.echo(m, err=True))


@bench_app.command("generate")
def bench_generate_cmd(
    ckpt: Annotated[Path | None, typer.Option(help="A checkpoint (default: a random 15.7M Llama)")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated")] = "1,8",
    prompt_len: Annotated[int, typer.Option(min=1)] = 16,
    new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0 = leave the default)")] = 2,
    dtype: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    device: DeviceOpt = "cpu",
    hf: Annotated[bool, typer.Option(help="Also time transformers' generate on the same weights")] = True,
    quantize: Annotated[bool, typer.Option("--quantize-int8", help="Also time int8 dynamic quantization")]
    = False,
    server: Annotated[bool, typer.Option("--server", help="Also measure HTTP overhead and dynamic batching")]
    = False,
    val_shards: Annotated[Path | None, typer.Option(help="Shards dir: report int8's change in val loss")] = None,
    compile: CompileOpt = False,
    repeats: Annotated[int, typer.Option(min=1, help="Take the best of this many runs")] = 1,
    json: Annotated[Path | None, typer.Option(help="Write results as JSON")] = None,
) -> None:
    """Prefill and decode tokens/s at several batch sizes, against transformers on the same weights."""
    from lmforge.bench_generate import BenchOptions, bench_generate, print_table
    from lmforge.fsutil import atomic_write_json

    opts = BenchOptions(ckpt=str(ckpt) if ckpt else None, batches=[int(b) for b in batch.split(",") if b],
                        prompt_len=prompt_len, new_tokens=new_tokens, threads=threads, dtype=dtype, device=device,
                        hf=hf, quantize=quantize, server=server,
                        val_shards=str(val_shards) if val_shards else None, compile=compile, repeats=repeats)
    res = bench_generate(opts, log=lambda m: typer.echo(m, err=True))
    print_table(res)
    if json:
        atomic_write_json(json, res)
