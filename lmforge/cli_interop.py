"""CLI commands for export, import and Hub upload, registered on the main app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli import app

import_app = typer.Typer(no_args_is_help=True, help="Turn another format's model into an lmforge checkpoint.")
hub_app = typer.Typer(no_args_is_help=True, help="Publish an export dir on the Hugging Face Hub.")
app.add_typer(import_app, name="import")
app.add_typer(hub_app, name="hub")

ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists")]


@app.command()
def export(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint dir or run dir (best, else latest)")],
    out: Annotated[Path, typer.Option("--out", help="Output dir (gguf: a dir, or a *.gguf file)")],
    format: Annotated[str, typer.Option("--format", help="hf | gguf | safetensors")] = "hf",
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (gguf also q8_0)")] = "fp32",
    force: ForceOpt = False,
) -> None:
    """Export a checkpoint for transformers (hf), llama.cpp (gguf) or lmforge itself (safetensors)."""
    from lmforge.export import export_checkpoint

    export_checkpoint(ckpt, out, format, dtype, force=force, log=typer.echo)


@import_app.command("hf")
def import_hf(
    src: Annotated[Path, typer.Argument(help="A Hugging Face Llama or GPT-2 model dir")],
    out: Annotated[Path, typer.Option("--out", help="The checkpoint dir to write")],
    seq_len: Annotated[int | None, typer.Option(min=2, help="Context length (default: the model's)")] = None,
    force: ForceOpt = False,
) -> None:
    """Convert a Hugging Face checkpoint dir into an lmforge checkpoint (to continue training from)."""
    from lmforge.models.hf import import_hf_checkpoint

    import_hf_checkpoint(src, out, force=force, seq_len=seq_len, log=typer.echo)


@hub_app.command("upload")
def hub_upload(
    folder: Annotated[Path, typer.Argument(help="An export dir (lmforge export --out DIR)")],
    repo: Annotated[str, typer.Option("--repo", help="USER/NAME on the Hub")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private")] = False,
) -> None:
    """Upload an export dir to the Hub (token from HF_TOKEN or `hf auth login`)."""
    from lmforge.export import hub_upload as upload

    typer.echo(f"uploaded {folder} -> {upload(folder, repo, private)}")
