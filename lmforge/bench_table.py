"""The table every `lmforge bench` prints: the name column first, then right-aligned figures."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

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
