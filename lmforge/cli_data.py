"""CLI commands for data preparation: prepare, shards merge/export-megatron, bench prepare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli import PrintOpt, RecipeArg, SetOpt, _recipe, app, bench_app, shards_app
from lmforge.errors import ConfigError


@app.command()
def prepare(
    recipe: RecipeArg, sets: SetOpt = None, print_config: PrintOpt = False,
    limit: Annotated[int, typer.Option(min=0, help="Read only the first N documents (test mode)")] = 0,
    workers: Annotated[int | None, typer.Option(min=0, help="Worker processes (0 = all cores)")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first malformed line instead of skipping it")] = False,
    num_parts: Annotated[int, typer.Option(min=1, help="Split the input into N disjoint parts (one per machine)")] = 1,
    part: Annotated[int, typer.Option(min=0, help="Which part this run prepares (0-based)")] = 0,
) -> None:
    """Clean, filter, deduplicate and tokenize the recipe's source → shards + docs + stats.json.

    An interrupted run resumes from its last completed shard when run again with the same settings."""
    from lmforge.prepare import prepare_recipe

    r = _recipe(recipe, sets, False)
    r.prepare.enabled = True
    if limit:
        r.data.limit = limit
    if workers is not None:
        r.data.workers = workers
    r.prepare.strict = strict or r.prepare.strict
    if part >= num_parts:
        raise ConfigError(f"--part {part} must be below --num-parts {num_parts}")
    if num_parts > 1:  # each part writes its own directories; `lmforge shards merge` joins them
        r.prepare.num_parts, r.prepare.part = num_parts, part
        r.data.shards_dir = str(Path(r.data.shards_dir) / f"part_{part:03d}")
        r.prepare.out_dir = str(Path(r.prepare.out_dir) / f"part_{part:03d}")
    if print_config:
        from lmforge.config import to_toml

        typer.echo(to_toml(r), nl=False)
        raise typer.Exit(0)
    prepare_recipe(r, log=typer.echo)


@shards_app.command("merge")
def shards_merge(
    dirs: Annotated[list[Path], typer.Argument(help="Shard dirs to join (e.g. shards/part_*)")],
    out: Annotated[Path, typer.Option("--out", help="Dir for the merged manifest.json")],
) -> None:
    """Join shard dirs (the parts of `prepare --num-parts`) into one manifest, without copying."""
    from lmforge.prepare_io import merge_shards

    m = merge_shards([d.resolve() for d in dirs], out.resolve())
    typer.echo(f"merged {len(dirs)} dirs -> {out / 'manifest.json'}: "
               + ", ".join(f"{s} {i['tokens']:,} tokens in {len(i['files'])} files" for s, i in m["splits"].items()))


@shards_app.command("export-megatron")
def shards_export_megatron(
    path: Annotated[Path, typer.Argument(help="An lmforge shard dir")],
    out: Annotated[Path, typer.Option("--out", help="Dir for train.bin/.idx and val.bin/.idx")],
) -> None:
    """Write a shard dir as Megatron-LM indexed datasets (one document per sequence)."""
    from lmforge.megatron import export_megatron

    for prefix in export_megatron(path, out):
        typer.echo(f"{prefix}.bin / {prefix}.idx")


@bench_app.command("prepare")
def bench_prepare_cmd(
    mbytes: Annotated[float, typer.Option(help="Size of the generated corpus in MB")] = 200.0,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary of the tokenizer used")] = 32768,
    workers: Annotated[str, typer.Option(help="Worker counts to time, comma-separated")] = "1,2",
    dir: Annotated[Path, typer.Option(help="Scratch dir (corpus + outputs)")] = Path("runs/bench_prepare"),
    filters: Annotated[bool, typer.Option(help="FineWeb-like quality filters (else normalization + dedup)")] = True,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds; each configuration keeps its best")] = 3,
    json: Annotated[Path | None, typer.Option(help="Write results as JSON")] = None,
) -> None:
    """Throughput of prepare (clean + filter + dedup + tokenize + write) against raw encoding."""
    from lmforge.bench_prepare import bench_prepare, print_prepare_table
    from lmforge.fsutil import atomic_write_json

    res = bench_prepare(mbytes=mbytes, vocab_size=vocab_size, workers=[int(w) for w in workers.split(",")],
                        dir=dir, log=typer.echo, filters=filters, repeats=repeats)
    print_prepare_table(res)
    if json:
        atomic_write_json(json, res)
