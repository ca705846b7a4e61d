"""Command line: a table of subcommands, each a thin call into one module. Parsing only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lmforge.errors import LmforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lmforge: raw text to a trained, evaluated and sampled small language model.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train a tokenizer, or encode/decode with one.")
shards_app = typer.Typer(no_args_is_help=True, help="Check and describe token shard directories.")
bench_app = typer.Typer(no_args_is_help=True, help="Throughput benchmarks (tables + JSON).")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(shards_app, name="shards")
app.add_typer(bench_app, name="bench")

RecipeArg = Annotated[Path, typer.Argument(help="A TOML recipe, e.g. recipes/demo.toml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: section.key=value")]
PrintOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved recipe as TOML and exit")]


def _recipe(path: Path | None, sets: list[str] | None, print_config: bool):
    from lmforge.config import load_recipe, to_toml

    recipe = load_recipe(path, sets or [])
    if print_config:
        typer.echo(to_toml(recipe), nl=False)
        raise typer.Exit(0)
    return recipe


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue training from the latest checkpoint")]
StopAtOpt = Annotated[int | None, typer.Option("--stop-at", help="Save and stop after this step (resume later)")]
SlowloadOpt = Annotated[bool, typer.Option("--slowload", help="Stream with the naive loader (data.loader=naive)")]


def _loader_sets(sets: list[str] | None, slowload: bool) -> list[str]:
    return [*(sets or []), "data.loader=naive"] if slowload else list(sets or [])


@app.command()
def demo(sets: SetOpt = None, print_config: PrintOpt = False) -> None:
    """The whole pipeline on the bundled Shakespeare corpus (CPU, a few minutes) → runs/demo."""
    from lmforge.pipeline import run_pipeline

    run_pipeline(_recipe(None, sets, print_config))


@app.command()
def run(recipe: RecipeArg, sets: SetOpt = None, print_config: PrintOpt = False, resume: ResumeOpt = False,
        stop_at: StopAtOpt = None, slowload: SlowloadOpt = False) -> None:
    """Every stage of a recipe; an up-to-date tokenizer and shards are reused."""
    from lmforge.pipeline import run_pipeline

    run_pipeline(_recipe(recipe, _loader_sets(sets, slowload), print_config), resume=resume, stop_at=stop_at)


@tokenizer_app.command("train")
def tokenizer_train(recipe: RecipeArg, sets: SetOpt = None, print_config: PrintOpt = False) -> None:
    """Train (or reuse an up-to-date) tokenizer into tokenizer.dir."""
    from lmforge.tokenizer import ensure_tokenizer

    ensure_tokenizer(_recipe(recipe, sets, print_config))


@tokenizer_app.command("encode")
def tokenizer_encode(tokenizer: Annotated[Path, typer.Argument(help="Tokenizer, checkpoint or run dir")],
                     text: Annotated[str, typer.Argument(help="Text to encode ('-' reads stdin)")]) -> None:
    """Print the token ids of TEXT, space-separated."""
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    typer.echo(" ".join(map(str, tok.encode(sys.stdin.read() if text == "-" else text))))


@tokenizer_app.command("decode")
def tokenizer_decode(tokenizer: Annotated[Path, typer.Argument(help="Tokenizer, checkpoint or run dir")],
                     ids: Annotated[list[int], typer.Argument(help="Token ids")]) -> None:
    """Print the text of token IDS."""
    from lmforge.tokenizer import load_tokenizer

    typer.echo(load_tokenizer(tokenizer).decode(ids))


@app.command()
def tokenize(recipe: RecipeArg, sets: SetOpt = None, print_config: PrintOpt = False) -> None:
    """Tokenize the recipe's data into shards (train/val) in data.shards_dir."""
    from lmforge.shards import ensure_shards
    from lmforge.tokenizer import ensure_tokenizer

    r = _recipe(recipe, sets, print_config)
    ensure_shards(r, ensure_tokenizer(r))


@shards_app.command("verify")
def shards_verify(path: Path,
                  tokenizer: Annotated[Path | None, typer.Option(help="Also check this tokenizer matches")] = None):
    """Check headers, sizes and checksums of every shard against the manifest."""
    from lmforge.shards import verify_shards
    from lmforge.tokenizer import load_tokenizer

    problems = verify_shards(path, load_tokenizer(tokenizer) if tokenizer else None)
    for p in problems:
        typer.echo(f"problem: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{path}: ok")


@shards_app.command("inspect")
def shards_inspect(path: Path) -> None:
    """Summarise a shard dir: splits, tokens, documents, dtype, tokenizer."""
    import orjson

    from lmforge.shards import inspect_shards

    typer.echo(orjson.dumps(inspect_shards(path), option=orjson.OPT_INDENT_2).decode())


@app.command()
def train(recipe: RecipeArg, sets: SetOpt = None, print_config: PrintOpt = False, resume: ResumeOpt = False,
          fresh: Annotated[bool, typer.Option("--fresh", help="Delete the run's checkpoints and logs first")] = False,
          stop_at: StopAtOpt = None, slowload: SlowloadOpt = False,
          profile: Annotated[bool, typer.Option("--profile", help="Write a profiler trace to RUN/profile")] = False,
          find_batch_size: Annotated[bool, typer.Option("--find-batch-size",
                                                        help="GPU: find the largest micro-batch that fits")] = False):
    """Train a model on existing shards (run `lmforge tokenize` first), or on the raw text with a
    streaming data.loader (naive | workers | ring) → train.run_dir."""
    from lmforge.pipeline import train_and_report
    from lmforge.train import setup

    r = _recipe(recipe, _loader_sets(sets, slowload), print_config)
    if find_batch_size:
        from lmforge.batch_size import find_batch_size as search

        search(r)
        return
    tr = setup(r, resume=resume, fresh=fresh)
    tr.stop_at = stop_at
    train_and_report(tr, profile=profile)


@app.command()
def generate(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint dir or run dir (best, else latest)")],
    prompt: Annotated[str, typer.Option(help="Text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0)] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable)")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    steps: Annotated[int, typer.Option(min=1, help="Diffusion models: denoising steps (more = better, slower)")]
    = 32,
    remasking: Annotated[str, typer.Option(help="Diffusion models: low_confidence | random")] = "low_confidence",
) -> None:
    """Continue PROMPT with a trained model (a masked-diffusion model fills its canvas in --steps steps)."""
    from lmforge.diffusion import diffusion_generate, is_diffusion
    from lmforge.generate import SamplingParams, load_for_inference, stream_text
    from lmforge.runtime import resolve_device

    model, tok, _ = load_for_inference(ckpt, resolve_device(device))
    if is_diffusion(model):  # the whole completion appears at once, after the last step
        text = diffusion_generate(model, tok, prompt, max_new_tokens=max_new_tokens, steps=steps,
                                  temperature=temperature, top_k=top_k, top_p=top_p, remasking=remasking,
                                  seed=seed, stop=tuple(stop or ()))
        typer.echo(prompt + text)
        return
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=tuple(stop or ()))
    sys.stdout.write(prompt)
    for delta in stream_text(model, tok, prompt, params):  # tokens appear as they are sampled
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def plot(runs: Annotated[list[Path], typer.Argument(help="Run dirs (several are overlaid)")],
         out: Annotated[Path | None, typer.Option(help="Output dir (default RUN/plots)")] = None) -> None:
    """Loss and learning-rate curves as PNG."""
    from lmforge.metrics import plot_runs

    for run_dir in runs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise LmforgeError(f"{run_dir} has no metrics.jsonl (is it a run dir?)")
    for p in plot_runs(runs, out):
        typer.echo(str(p))


@app.command()
def info(ckpt: Annotated[Path, typer.Argument(help="Checkpoint dir or run dir")]) -> None:
    """Parameters, FLOPs per token, config, tokens seen and best validation loss of a checkpoint."""
    from lmforge.generate import load_for_inference
    from lmforge.models.transformer import param_summary

    model, tok, state = load_for_inference(ckpt)
    p = param_summary(model)
    typer.echo(f"checkpoint: {state['path']}\nstep: {state['step']}\ntokens seen: {state.get('tokens_seen', 0):,}")
    typer.echo(f"parameters: {p['total']:,} total, {p['embedding']:,} embedding, {p['non_embedding']:,} non-embedding")
    typer.echo(f"FLOPs per token (training): {model.flops_per_token():,.0f}")
    typer.echo(f"best val loss: {state.get('best_val_loss')}\ntokenizer: {tok.kind}, vocab {tok.vocab_size}, "
               f"fingerprint {tok.fingerprint[:12]}")
    for k, v in state["model_config"].items():
        typer.echo(f"model.{k} = {v}")


@bench_app.command("tokenizer")
def bench_tokenizer_cmd(vocab_size: int = 16384, mbytes: float = 5.0, repeats: int = 3,
                        json: Annotated[Path | None, typer.Option(help="Write results as JSON")] = None) -> None:
    """Tokenizer training time and encode throughput against rustbpe, tiktoken and HF tokenizers."""
    from lmforge.bench_tokenizer import bench_tokenizer, print_bench_table
    from lmforge.fsutil import atomic_write_json

    res = bench_tokenizer(vocab_size=vocab_size, mbytes=mbytes, repeats=repeats)
    print_bench_table(res)
    if json:
        atomic_write_json(json, res)


@bench_app.command("train")
def bench_train_cmd(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe whose [model] to use (default: the demo)")] = None,
    sets: SetOpt = None,
    preset: Annotated[str | None, typer.Option(help="Model preset instead of the recipe's model")] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary when the recipe leaves it to the tokenizer")] = 4096,
    batch: Annotated[int | None, typer.Option(help="Micro-batch (default: train.micro_batch_size)")] = None,
    steps: int = 10, warmup: int = 2,
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 (autocast)")] = "fp32",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model")] = False,
    optimizer: Annotated[str, typer.Option(help="AdamW flavour: foreach | fused | plain")] = "foreach",
    compare: Annotated[str, typer.Option(help="Also run variants along: dtype,compile,optimizer,threads")] = "",
    device: str = "auto",
    json: Annotated[Path | None, typer.Option(help="Write results as JSON")] = None,
) -> None:
    """Training-step throughput, time split, MFU against a measured peak, memory; variants side by side."""
    from lmforge.bench_train import Setting, bench_train, parse_compare, print_table
    from lmforge.config import ModelConfig
    from lmforge.errors import ConfigError
    from lmforge.fsutil import atomic_write_json

    r = _recipe(recipe, sets, False)
    cfg = ModelConfig(preset=preset) if preset else r.model
    if cfg.vocab_size == 0:
        cfg = cfg.model_copy(update={"vocab_size": vocab_size})
    try:
        settings = parse_compare(compare, Setting(dtype=dtype, compile=compile, optimizer=optimizer))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    res = bench_train(cfg, settings, batch=batch or r.train.micro_batch_size, steps=steps, warmup=warmup,
                      device=device)
    print_table(res)
    if json:
        atomic_write_json(json, res)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 1, usage errors exit 2, Ctrl-C exits 130."""
    args = sys.argv[1:] if argv is None else argv
    if not args and sys.stdin.isatty() and sys.stdout.isatty():
        from lmforge.menu import run_menu

        return run_menu()  # a person at a terminal: a menu of the pipeline's commands
    if not args:
        args = ["--help"]
    try:
        app(args=args, prog_name="lmforge")
    except LmforgeError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as e:  # click's own exits: 0, usage errors (2), typer.Exit codes
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


# command groups that live in their own modules register themselves on `app`
from lmforge import cli_data, cli_eval, cli_infer, cli_interop, cli_loader, cli_sft  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
