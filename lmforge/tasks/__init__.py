"""Evaluation tasks: a registry saying what each one measures and needs, and what they share.

Each task is a module here with `METRICS` ({name: higher_is_better}), `PRIMARY` (the metric the
ranking uses), `load(opts)` (read and check the data once, before any model is loaded) and
`run(em, data, opts, progress) -> TaskResult` (score one model).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson

from lmforge.errors import DataError

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    needs: str


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("loss", "validation loss, perplexity and bits per byte over sliding windows",
             "nothing for a run (its own validation shards); else a text file, a JSONL file "
             "({\"text\": ...} per line) or a dataset, e.g. WikiText-103 test: wiki.test.raw from "
             "wikitext-103-raw-v1.zip, or --task-data loss=hf:Salesforce/wikitext:wikitext-103-raw-v1:test"),
    TaskSpec("topk", "next-token top-1/5/10 accuracy on the same data as loss",
             "the same as loss (--task-data topk=... or it follows loss's data)"),
    TaskSpec("lambada", "last-word accuracy (greedy, every token of the word) and target perplexity",
             "OpenAI's lambada_test.jsonl ({\"text\": ...} per line), from "
             "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl, or "
             "--task-data lambada=hf:EleutherAI/lambada_openai:default:test"),
    TaskSpec("hellaswag", "4-way multiple choice by log-likelihood: acc (summed) and acc_norm (per char)",
             "the official hellaswag_val.jsonl, from https://github.com/rowanz/hellaswag (data/), or "
             "--task-data hellaswag=hf:Rowan/hellaswag::validation"),
    TaskSpec("completion", "greedy completions of held-out prompts: BLEU and ROUGE-1/2/L",
             "a held-out JSONL ({\"prompt\", \"completion\"} per line) or text file (paragraphs are cut "
             "into prompt and reference); any file the model was not trained on"),
)}
DEFAULT_TASKS = ("loss", "topk")
# examples per task for each preset (None = all); loss/topk count windows
PRESETS: dict[str, dict[str, int | None]] = {
    "quick": {"loss": 50, "topk": 50, "lambada": 20, "hellaswag": 10, "completion": 10},
    "standard": {"loss": 100, "topk": 100, "lambada": 50, "hellaswag": 20, "completion": 20},
    "full": {"loss": None, "topk": None, "lambada": None, "hellaswag": None, "completion": None},
}


@dataclass
class TaskOptions:
    data: str | None = None
    """A local path or hf:NAME[:CONFIG[:SPLIT]]; None = the task's default (if it has one)."""
    limit: int | None = None
    seed: int = 1234
    strict: bool = False
    stride: int = 0
    """Sliding-window step for loss/topk; 0 = half the model's context."""
    max_new_tokens: int = 32


@dataclass
class TaskResult:
    metrics: dict[str, float] = field(default_factory=dict)
    n: int = 0
    skipped: int = 0
    truncated: int = 0
    seconds: float = 0.0
    data: str = ""
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"metrics": self.metrics, "n": self.n, "skipped": self.skipped, "truncated": self.truncated,
               "seconds": round(self.seconds, 3), "data": self.data}
        if self.n and self.seconds > 0:
            out["examples_per_s"] = round(self.n / self.seconds, 3)
        if self.notes:
            out["notes"] = self.notes
        if self.error:
            out["error"] = self.error
        return out


class Progress:
    """What tasks report progress to; the CLI passes one that draws a bar."""

    def start(self, total: int) -> None:
        pass

    def advance(self, k: int = 1) -> None:
        pass


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"lmforge.tasks.{name}")


def tasks_help() -> str:
    return "\n".join(f"{s.name}: {s.summary}. Needs: {s.needs}." for s in TASKS.values())


def missing_data(task: str) -> DataError:
    return DataError(f"task {task} needs data: pass --task-data {task}=PATH. Where to get it: "
                     f"{TASKS[task].needs}")


def pick(n_total: int, limit: int | None, seed: int) -> list[int]:
    """A fixed-seed subset of indices, in file order, so every checkpoint sees the same examples."""
    if limit is None or limit >= n_total:
        return list(range(n_total))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_total, size=max(0, limit), replace=False).tolist())


def hf_rows(spec: str) -> Iterator[dict]:
    """Rows of a Hugging Face dataset named `hf:NAME[:CONFIG[:SPLIT]]` (split default: test)."""
    parts = spec[len(HF_PREFIX):].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs the `datasets` package "
                        "(pip install datasets), or download the file and pass its path") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network, unknown name or split: the library raises many types
        raise DataError(f"{spec}: cannot load the dataset ({type(err).__name__}: {err})") from None
    yield from ds


def read_records(task: str, spec: str | None, strict: bool) -> tuple[list[dict], int]:
    """JSON objects from a JSONL file (or an hf: dataset) and the number of unreadable lines skipped."""
    if spec is None:
        raise missing_data(task)
    if spec.startswith(HF_PREFIX):
        return [dict(r) for r in hf_rows(spec)], 0
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"task {task}: {path} is not a file. Where to get it: {TASKS[task].needs}")
    records, skipped = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if strict:
                    raise DataError(f"{path}:{lineno}: malformed record ({err})") from None
                skipped += 1
                continue
            obj["_line"] = lineno
            records.append(obj)
    return records, skipped


def check_records(path: str, records: list[dict], parse: Callable[[dict], Any], strict: bool
                  ) -> tuple[list[Any], int]:
    """Parse each record; a record `parse` rejects (ValueError/KeyError/TypeError) is skipped or fatal."""
    out, skipped = [], 0
    for r in records:
        try:
            out.append(parse(r))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if strict:
                where = f"{path}:{r.get('_line', '?')}"
                raise DataError(f"{where}: malformed record ({type(err).__name__}: {err})") from None
            skipped += 1
    if not out:
        raise DataError(f"{path}: no usable records ({skipped} malformed)")
    return out, skipped
