"""CLI command `lmforge bench loader`, registered on the main app's bench group."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli import bench_app

ALL = "naive,workers,ring,memmap"


@bench_app.command("loader")
def bench_loader_cmd(
    mbytes: Annotated[float, typer.Option(help="Size of the JSONL corpus generated from the bundled text")] = 64.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    seq_len: Annotated[int, typer.Option(min=1)] = 1024,
    batches: Annotated[int, typer.Option(min=1, help="Timed batches per streaming loader")] = 500,
    memmap_batches: Annotated[int, typer.Option(min=1, help="Timed batches for the memmap loader")] = 5000,
    vocab_size: Annotated[int, typer.Option(min=257)] = 16384,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes of the workers/ring loaders")] = 2,
    slots: Annotated[int, typer.Option(min=1, help="Ring slots (queue depth) per worker")] = 4,
    step_ms: Annotated[float, typer.Option(min=0.0, help="Simulated training step for the wait test")] = 50.0,
    wait_batches: Annotated[int, typer.Option(min=0, help="Batches of the wait test (0 = skip it)")] = 40,
    loaders: Annotated[str, typer.Option(help="Comma-separated subset of naive,workers,ring,memmap")] = ALL,
    dir: Annotated[Path | None, typer.Option(help="Keep the corpus, tokenizer and shards here (reused)")] = None,
    json: Annotated[Path | None, typer.Option(help="Write results as JSON")] = None,
) -> None:
    """Tokens/s of the naive, workers and ring streaming loaders and the memmap loader (+ nanoGPT's get_batch)."""
    from lmforge.bench_loader import bench_loader, print_loader_table
    from lmforge.errors import ConfigError
    from lmforge.fsutil import atomic_write_json

    chosen = tuple(x.strip() for x in loaders.split(",") if x.strip())
    unknown = set(chosen) - {"naive", "workers", "ring", "memmap"}
    if unknown:
        raise ConfigError(f"--loaders: unknown {', '.join(sorted(unknown))}; choose from naive,workers,ring,memmap")
    res = bench_loader(mbytes=mbytes, batch_size=batch_size, seq_len=seq_len, batches=batches,
                       memmap_batches=memmap_batches, vocab_size=vocab_size, workers=workers, slots=slots,
                       step_ms=step_ms, wait_batches=wait_batches, loaders=chosen, work_dir=dir,
                       log=lambda msg: typer.echo(msg, err=True))
    print_loader_table(res)
    if json:
        atomic_write_json(json, res)
