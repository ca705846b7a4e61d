"""The table every `lmforge bench` prints (the name column first, then right-aligned figures), and
the rounds that benches with several configurations time them in."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

from rich.console import Console
from rich.table import Table


def show_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Console:
    """Print the table; returns the console so that a bench can add lines under it."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    # a pipe or a log file gets the whole table rather than 80 columns of wrapped cells
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    return console


def fastest_rounds(jobs: Sequence[Callable[[], dict]], repeats: int,
                   log: Callable[[int, dict], object] | None = None) -> list[dict]:
    """Every job once per round, `repeats` rounds; per job, the row (a dict with "seconds") of its
    fastest round, with all its rounds' seconds under "round_seconds". Rounds interleave so every
    job meets the same machine, and the fastest counts because another tenant's load only ever
    slows a run down. `log(round, row)` after each run."""
    best: list[dict | None] = [None] * len(jobs)
    rounds: list[list[float]] = [[] for _ in jobs]
    for k in range(max(1, repeats)):
        for j, job in enumerate(jobs):
            row = job()
            rounds[j].append(row["seconds"])
            if best[j] is None or row["seconds"] < best[j]["seconds"]:
                best[j] = row
            if log is not None:
                log(k + 1, row)
    return [{**row, "round_seconds": r} for row, r in zip(best, rounds, strict=True)]  # type: ignore[dict-item]
