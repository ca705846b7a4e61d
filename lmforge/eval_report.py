"""What `lmforge eval` shows and writes: a table per task (one column per checkpoint, the best value
highlighted), a ranking, and the same as JSON + text in each run's eval/ dir (or --out)."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge.evaluate import EvalRun
from lmforge.fsutil import atomic_write_json, atomic_write_text
from lmforge.tasks import TaskResult, task_module

PER_TOKEN_TASKS = {"topk"}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _best(values: list[float | None], higher: bool) -> float | None:
    ok = [v for v in values if _finite(v)]
    if len(ok) < 2 or min(ok) == max(ok):
        return None  # nothing to tell apart: highlight nothing
    return max(ok) if higher else min(ok)


def _fmt(v: Any) -> str:
    if not _finite(v):
        return "—"
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"


def _notes(run: EvalRun, task: str) -> list[str]:
    res = [run.results.get((m["name"], task)) for m in run.models]
    notes = []
    if task in ("loss", "topk") and len({m["tokenizer"] for m in run.models}) > 1:
        notes.append("checkpoints use different tokenizers: loss, perplexity and top-k are per token of "
                     "each one's own tokenizer and do not compare; bits per byte does")
    if task in ("loss", "topk") and len({r.data for r in res if r and not r.error}) > 1:
        notes.append("checkpoints were scored on different data (each run's own validation shards)")
    for m, r in zip(run.models, res, strict=True):
        if r and r.error:
            notes.append(f"{m['name']}: {r.error}")
    skipped = max((r.skipped for r in res if r), default=0)
    if skipped:
        notes.append(f"{skipped} malformed records skipped (--strict makes them an error)")
    trunc = {m["name"]: r.truncated for m, r in zip(run.models, res, strict=True) if r and r.truncated}
    if trunc:
        notes.append("contexts cut on the left to fit the model: "
                     + ", ".join(f"{k} {v}" for k, v in trunc.items()))
    return notes


def task_table(run: EvalRun, task: str) -> Table:
    mod = task_module(task)
    table = Table(title=f"{task}", title_justify="left")
    table.add_column("metric")
    for m in run.models:
        table.add_column(m["name"], justify="right")
    results = [run.results.get((m["name"], task)) or TaskResult() for m in run.models]
    for metric, higher in mod.METRICS.items():
        values = [r.metrics.get(metric) for r in results]
        best = _best(values, higher)
        cells = [f"[bold green]{_fmt(v)}[/]" if best is not None and v == best else _fmt(v) for v in values]
        table.add_row(f"{metric} {'↑' if higher else '↓'}", *cells)
    table.add_row("examples", *[str(r.n) if not r.error else "—" for r in results], style="dim")
    return table


def _ranked_tasks(run: EvalRun) -> list[str]:
    """Tasks whose primary metric compares across these checkpoints: top-1 is per token, so it is left
    out when the tokenizers differ (loss ranks by bits per byte, which compares)."""
    mixed = len({m["tokenizer"] for m in run.models}) > 1
    return [t for t in run.tasks if not (mixed and t in PER_TOKEN_TASKS)]


def ranking(run: EvalRun) -> list[dict[str, Any]]:
    """Checkpoints by mean rank over the tasks' primary metrics (1 = best; ties share a rank)."""
    ranks: dict[str, list[float]] = {m["name"]: [] for m in run.models}
    for task in _ranked_tasks(run):
        mod = task_module(task)
        higher = mod.METRICS[mod.PRIMARY]
        vals = {m["name"]: (run.results.get((m["name"], task)) or TaskResult()).metrics.get(mod.PRIMARY)
                for m in run.models}
        vals = {k: v for k, v in vals.items() if _finite(v)}
        for name, v in vals.items():
            ranks[name].append(1 + sum((w > v) if higher else (w < v) for w in vals.values()))
    rows = [{"checkpoint": k, "mean_rank": sum(r) / len(r), "tasks": len(r)} for k, r in ranks.items() if r]
    return sorted(rows, key=lambda r: r["mean_rank"])


def ranking_table(run: EvalRun) -> Table:
    prim = ", ".join(f"{t}:{task_module(t).PRIMARY}" for t in _ranked_tasks(run))
    table = Table(title=f"ranking (mean rank over {prim})", title_justify="left")
    for col in ("#", "checkpoint", "mean rank", "tasks"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for i, r in enumerate(ranking(run), 1):
        table.add_row(str(i), r["checkpoint"], f"{r['mean_rank']:.2f}", str(r["tasks"]))
    return table


def print_report(run: EvalRun, console: Console | None = None) -> None:
    console = console or Console()
    for task in run.tasks:
        console.print(task_table(run, task))
        for note in _notes(run, task):
            console.print(f"  note: {note}", style="dim", highlight=False)
    if len(run.models) > 1:
        console.print(ranking_table(run))


def report_text(run: EvalRun) -> str:
    buf = io.StringIO()
    print_report(run, Console(file=buf, width=160, color_system=None, force_terminal=False))
    return buf.getvalue()


def to_json(run: EvalRun) -> dict[str, Any]:
    from lmforge.bench_tokenizer import machine_info

    return {
        "format": "lmforge-eval", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": run.settings, "machine": machine_info(), "checkpoints": run.models,
        "results": [{"checkpoint": name, "task": task, **res.to_json()}
                    for (name, task), res in run.results.items()],
        "ranking": ranking(run),
        "notes": {t: n for t in run.tasks if (n := _notes(run, t))},
    }


def write_outputs(run: EvalRun, *, out: Path | None = None, json_path: Path | None = None,
                  log: Callable[[str], Any] = print) -> list[Path]:
    """`--json PATH`, and eval/<timestamp>.json + .txt in each run dir (or in `out` instead)."""
    data, text = to_json(run), report_text(run)
    written: list[Path] = []
    if json_path is not None:
        atomic_write_json(json_path, data)
        written.append(Path(json_path))
    dirs = [Path(out)] if out else list(dict.fromkeys(Path(m["run_dir"]) / "eval" for m in run.models
                                                       if m.get("run_dir")))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for d in dirs:
        atomic_write_json(d / f"{stamp}.json", data)
        atomic_write_text(d / f"{stamp}.txt", text)
        written += [d / f"{stamp}.json", d / f"{stamp}.txt"]
    if not dirs and json_path is None:
        log("no run dir among the checkpoints: results were not saved (use --out DIR or --json PATH)")
    return written
