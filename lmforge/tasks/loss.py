"""Validation loss, perplexity and bits per byte over sliding windows, on a run's own validation shards
or on any text file, JSONL file or Hugging Face dataset (each model tokenizes it with its own tokenizer).

Windows step by `stride` tokens; each target is scored once, by the first window that holds it past
the overlap, so apart from the stream's first tokens every target sees at least seq_len - stride
tokens of context. One pass also counts top-k accuracy, which the `topk` task reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.tasks import HF_PREFIX, Progress, TaskOptions, TaskResult, hf_rows, pick
from lmforge.tasks.scoring import EvalModel

METRICS = {"loss": False, "perplexity": False, "bpb": False}
PRIMARY = "bpb"


@dataclass
class LMData:
    label: str
    docs: list[str] | None = None
    """None: the model's own validation shards."""
    jsonl: bool = False


def load(opts: TaskOptions, task: str = "loss") -> LMData:
    spec = opts.data
    if spec is None:
        return LMData("validation shards")
    if spec.startswith(HF_PREFIX):
        # a dataset of lines (WikiText) or of documents: one stream, rows joined by newlines
        rows = [str(r.get("text", "")) for r in hf_rows(spec)]
        return LMData(spec, ["".join(t if t.endswith("\n") else t + "\n" for t in rows)])
    from lmforge.config import DataConfig
    from lmforge.errors import DataError
    from lmforge.sources import iter_documents

    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"task {task}: {path} is not a file; pass a text file, a JSONL file or "
                        "hf:NAME[:CONFIG[:SPLIT]] (e.g. hf:Salesforce/wikitext:wikitext-103-raw-v1:test)")
    docs = [d.text for d in iter_documents(DataConfig(source=str(path), doc_split="file"))]
    jsonl = ".jsonl" in path.name
    if not any(docs):
        raise DataError(f"{path}: no text")
    return LMData(str(path), docs, jsonl)


def plan_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, first_new): targets start+1 .. start+length; those at offset >= first_new count."""
    t = min(seq_len, n_tokens - 1)
    starts = list(range(0, n_tokens - 1 - t + 1, stride))
    if starts[-1] + t < n_tokens - 1:
        starts.append(n_tokens - 1 - t)  # flush with the end, so the last tokens are scored too
    rows, scored = [], 0
    for s in starts:
        rows.append((s, t, max(scored - s, 0)))
        scored = s + t
    return rows


def windows(read: Callable[[int, int], np.ndarray], plan: list[tuple[int, int, int]], batch_size: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for i in range(0, len(plan), batch_size):
        rows = plan[i:i + batch_size]
        buf = torch.from_numpy(np.stack([read(s, t + 1) for s, t, _ in rows]).astype(np.int64))
        first = torch.tensor([f for _, _, f in rows])[:, None]
        mask = torch.arange(rows[0][1])[None, :] >= first  # (B, T)
        yield buf[:, :-1], buf[:, 1:], mask


def _stream_reader(parts: list[np.ndarray]) -> tuple[Callable[[int, int], np.ndarray], int]:
    """Read [start, start + length) of several arrays seen as one stream (shards are many files)."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])

    def read(start: int, length: int) -> np.ndarray:
        out, pos = [], start
        while pos < start + length:
            i = int(np.searchsorted(offsets, pos, side="right")) - 1
            take = min(int(sizes[i] - (pos - offsets[i])), start + length - pos)
            out.append(np.asarray(parts[i][pos - offsets[i]:pos - offsets[i] + take]))
            pos += take
        return np.concatenate(out)

    return read, int(offsets[-1])


def _token_stream(em: EvalModel, data: LMData) -> tuple[list[np.ndarray], str]:
    if data.docs is None:
        from lmforge.errors import DataError
        from lmforge.shards import check_tokenizer, open_split

        if not em.shards_dir:
            raise DataError("no validation shards for this model (not a training run); pass "
                            "--task-data loss=FILE")
        check_tokenizer(em.shards_dir, em.tokenizer)
        return list(open_split(em.shards_dir, "val")), f"{em.shards_dir} (val)"
    tok, eos = em.tokenizer, em.tokenizer.eos_id
    if data.jsonl:  # documents, framed as in training: <|bos|> text <|eos|>
        ids = [em.prefix() + tok.encode(d) + ([eos] if eos is not None else []) for d in data.docs]
    else:
        ids = [em.prefix() + tok.encode("".join(data.docs))]
    return [np.array(i, dtype=np.int64) for i in ids if i], data.label


def lm_stats(em: EvalModel, data: LMData, opts: TaskOptions, progress: Progress) -> dict:
    """Loss, bpb and top-k of `em` on `data`, computed once per model and data and shared by tasks."""
    from lmforge.evaluate import evaluate_lm

    key = ("lm", data.label, opts.stride, opts.limit, opts.seed)
    if key in em.cache:
        progress.start(em.cache[key]["windows"])
        progress.advance(em.cache[key]["windows"])
        return em.cache[key]
    parts, label = _token_stream(em, data)
    read, n = _stream_reader(parts)
    if n < 2:
        from lmforge.errors import DataError

        raise DataError(f"{label}: {n} tokens; need at least 2")
    stride = opts.stride or max(1, em.seq_len // 2)
    plan = plan_windows(n, em.seq_len, min(stride, em.seq_len))
    plan = [plan[i] for i in pick(len(plan), opts.limit, opts.seed)]
    progress.start(len(plan))
    token_bytes = torch.as_tensor(em.tokenizer.token_bytes(), dtype=torch.int64)
    res = evaluate_lm(em.model, windows(read, plan, em.batch_size), token_bytes, device=em.device,
                      dtype=em.dtype, progress=progress.advance)
    em.cache[key] = {**res, "windows": len(plan), "data": label, "stride": stride}
    return em.cache[key]


def run(em: EvalModel, data: LMData, opts: TaskOptions, progress: Progress) -> TaskResult:
    return result_for(em, data, opts, progress, [*METRICS, "tokens", "bytes"])


def result_for(em: EvalModel, data: LMData, opts: TaskOptions, progress: Progress, keys: list[str]
               ) -> TaskResult:
    try:
        s = lm_stats(em, data, opts, progress)
    except LmforgeError as err:  # this model cannot be scored on this data; the others still are
        return TaskResult(error=str(err), data=data.label)
    notes = [f"stride {s['stride']}, {s['tokens']:,} tokens, {s['bytes']:,} bytes"]
    return TaskResult({k: s[k] for k in keys}, s["windows"], data=s["data"], notes=notes)
