"""CLI commands `lmforge eval` and `lmforge bench eval`, registered on the main app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from lmforge.cli import app, bench_app
from lmforge.errors import ConfigError
from lmforge.tasks import DEFAULT_TASKS, PRESETS, TASKS, TaskOptions
from lmforge.tasks import Progress as TaskProgress

TASKS_HELP = ("Comma-separated: " + ", ".join(TASKS) + f" (default: {','.join(DEFAULT_TASKS)} plus every task "
              "given --task-data); what each needs is listed above")
EVAL_HELP = ("Score checkpoints on tasks: one table per task (a column per checkpoint, the best highlighted), a "
             "ranking, and eval/<timestamp>.json + .txt in each run dir.\n\nTasks, and what they need:\n\n"
             + "\n\n".join(escape(f"{s.name}: {s.summary}. Needs {s.needs}.") for s in TASKS.values()))
DataOpt = Annotated[list[str] | None, typer.Option("--task-data", help="TASK=PATH or TASK=hf:NAME[:CONFIG[:SPLIT]] "
                                                   "(repeatable)")]


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        task, sep, value = item.partition("=")
        if not sep or not value or task not in TASKS:
            raise ConfigError(f"{what} {item!r}: expected TASK=VALUE with TASK one of {', '.join(TASKS)}")
        out[task] = value
    return out


def _limits(preset: str, items: list[str] | None) -> dict[str, int | None]:
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    limits, explicit = dict(PRESETS[preset]), set()
    for item in items or []:
        if "=" not in item and item.isdigit():  # one count for every task
            limits = dict.fromkeys(limits, int(item))
            continue
        for task, value in _pairs([item], "--limit").items():
            if not value.isdigit():
                raise ConfigError(f"--limit {item!r}: the count must be a whole number")
            limits[task] = int(value)
            explicit.add(task)
    if "loss" in explicit and "topk" not in explicit:
        limits["topk"] = limits["loss"]  # the same windows, so one pass serves both
    return limits


def _task_list(tasks: str | None, data: dict[str, str]) -> list[str]:
    if tasks:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
    else:
        names = list(dict.fromkeys([*DEFAULT_TASKS, *data]))
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


class _Bars:
    """One progress line per (checkpoint, task) with an ETA, under an overall bar, on stderr."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
        self.overall = self.progress.add_task("all", total=total)
        self.current: int | None = None

    def __call__(self, name: str, task: str) -> TaskProgress:
        if self.current is not None:
            self.progress.advance(self.overall)
        self.current = self.progress.add_task(f"{name} {task}", total=None)
        bars, tid = self.progress, self.current

        class Bar(TaskProgress):
            def start(self, total: int) -> None:
                bars.update(tid, total=total)

            def advance(self, k: int = 1) -> None:
                bars.advance(tid, k)

        return Bar()


@app.command("eval", help=EVAL_HELP)
def eval_cmd(
    ckpts: Annotated[list[str], typer.Argument(help="Checkpoint dirs, run dirs (best, else latest), exported "
                                               "Hugging Face dirs or globs, mixed")],
    tasks: Annotated[str | None, typer.Option("--tasks", help=TASKS_HELP)] = None,
    preset: Annotated[str, typer.Option(help="Examples per task: quick | standard | full")] = "standard",
    limit: Annotated[list[str] | None, typer.Option(help="TASK=N, or N for every task (repeatable)")] = None,
    task_data: DataOpt = None,
    all_checkpoints: Annotated[bool, typer.Option("--all-checkpoints", help="Every step of each run dir")] = False,
    seed: Annotated[int, typer.Option(help="Picks the example subset; keep it to compare runs")] = 1234,
    stride: Annotated[int, typer.Option(min=0, help="loss/topk window step; 0 = half the context")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="completion: tokens to generate")] = 32,
    strict: Annotated[bool, typer.Option("--strict", help="A malformed record is an error, not skipped")] = False,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU) | fp32 | bf16")] = "auto",
    json: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here")] = None,
    out: Annotated[Path | None, typer.Option(help="Write <timestamp>.json/.txt here, not in run dirs")] = None,
) -> None:
    from lmforge.eval_report import print_report, write_outputs
    from lmforge.evaluate import resolve_targets, run_eval
    from lmforge.runtime import resolve_device, resolve_dtype

    data = _pairs(task_data, "--task-data")
    if "loss" in data and "topk" not in data:
        data["topk"] = data["loss"]  # topk follows loss's data: one pass serves both
    names = _task_list(tasks, data)
    limits = _limits(preset, limit)
    options = {t: TaskOptions(data.get(t), limits.get(t), seed, strict, stride, max_new_tokens) for t in names}
    if dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--dtype {dtype!r}: choose auto, fp32 or bf16")
    dev = resolve_device(device)
    targets = resolve_targets(ckpts, all_checkpoints)
    bars = _Bars(len(targets) * len(names))
    with bars.progress:
        run = run_eval(targets, names, options, device=dev, dtype=resolve_dtype(dtype, dev),
                       batch_size=batch_size, progress=bars, log=lambda m: bars.progress.console.print(m))
        bars.progress.advance(bars.overall)
    run.settings = {"tasks": names, "preset": preset, "limits": {t: limits.get(t) for t in names},
                    "task_data": {t: data.get(t) for t in names}, "seed": seed, "stride": stride,
                    "batch_size": batch_size, "device": str(dev), "dtype": str(resolve_dtype(dtype, dev))}
    print_report(run)
    for p in write_outputs(run, out=out, json_path=json, log=typer.echo):
        typer.echo(f"wrote {p}", err=True)


@bench_app.command("eval")
def bench_eval_cmd(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint, run or exported HF dir")],
    data: Annotated[Path, typer.Option("--data", help="HellaSwag JSONL (hellaswag_val.jsonl)")],
    examples: Annotated[int, typer.Option(min=1, help="Examples scored; batches fill better with more "
                                          "(the full validation set has 10,042)")] = 200,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds; each mode keeps its best time")] = 3,
    device: Annotated[str, typer.Option()] = "cpu",
    json: Annotated[Path | None, typer.Option("--json", help="Write results as JSON")] = None,
) -> None:
    """HellaSwag examples/s: unbatched vs shared context vs batched (fp32 on CPU)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from lmforge.bench_tokenizer import machine_info
    from lmforge.evaluate import load_eval_model
    from lmforge.fsutil import atomic_write_json
    from lmforge.runtime import resolve_device, resolve_dtype
    from lmforge.tasks import hellaswag

    dev = resolve_device(device)
    em = load_eval_model(ckpt, dev, resolve_dtype("auto", dev))
    items = hellaswag.load(TaskOptions(str(data)))
    rows = hellaswag.bench(em, items, examples, batch_size, repeats=repeats)
    table = Table(title=f"hellaswag scoring, {em.name} on {dev} ({torch.get_num_threads()} threads), "
                  f"best of {repeats}", title_justify="left")
    for col in ("mode", "batch", "examples/s", "tokens/s", "speedup", "max |Δ logprob|"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(r["name"], str(r["batch_size"]), f"{r['examples_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['speedup']:.2f}x", f"{r['max_abs_diff']:.1e}")
    Console().print(table)
    if json:
        res: dict[str, Any] = {"machine": machine_info(), "settings": {"checkpoint": str(ckpt), "device": str(dev),
                               "examples": examples, "batch_size": batch_size, "repeats": repeats,
                               "threads": torch.get_num_threads()}, "results": rows}
        atomic_write_json(json, res)
