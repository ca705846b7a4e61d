"""HellaSwag: pick the right ending of four (the official JSONL: ctx_a, ctx_b, activity_label, endings,
label). Context and endings are cleaned as lm-evaluation-harness does; each ending is scored by the
log-likelihood of " " + ending given the context. `acc` takes the highest summed log-likelihood,
`acc_norm` the highest per character of the ending (which removes the bias towards short endings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.tasks import Progress, TaskOptions, TaskResult, check_records, pick, read_records
from lmforge.tasks.scoring import ChoiceScore, EvalModel, Group, encode_pair, is_truncated

METRICS = {"acc": True, "acc_norm": True}
PRIMARY = "acc_norm"


@dataclass
class Item:
    context: str
    endings: list[str]
    label: int


@dataclass
class HellaswagData:
    label: str
    items: list[Item]
    skipped: int


def preprocess(text: str) -> str:
    """WikiHow contexts carry markup like "[title]" and "[step]"; the harness turns it into prose.
    The final strip is ours: without it an ending that began with markup starts with a space."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def parse(record: dict) -> Item:
    if isinstance(record.get("ctx_a"), str) and isinstance(record.get("ctx_b"), str):
        ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    else:
        ctx = record["ctx"]
    endings = record["endings"]
    if not isinstance(ctx, str) or not isinstance(endings, list) or len(endings) < 2 \
            or not all(isinstance(e, str) and e.strip() for e in endings):
        raise ValueError("ctx must be a string and endings a list of non-empty strings")
    label = int(record["label"])  # the Hub copy stores labels as strings
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} is not an index into {len(endings)} endings")
    activity = record.get("activity_label") or ""
    query = preprocess(f"{activity}: {ctx}" if activity else ctx)
    return Item(query, [preprocess(e) for e in endings], label)


def load(opts: TaskOptions) -> HellaswagData:
    records, bad = read_records("hellaswag", opts.data, opts.strict)
    items, skipped = check_records(str(opts.data), records, parse, opts.strict)
    return HellaswagData(str(opts.data), items, bad + skipped)


def groups_for(em: EvalModel, items: list[Item]) -> list[Group]:
    out = []
    for it in items:
        pairs = [encode_pair(em.tokenizer, it.context, " " + e, em.prefix()) for e in it.endings]
        out.append(Group(pairs[0][0], [c for _, c in pairs]))
    return out


def choose(scores: list[ChoiceScore], endings: list[str]) -> tuple[int, int]:
    """(argmax of summed log-likelihood, argmax per character); ties go to the first ending."""
    raw = max(range(len(scores)), key=lambda j: (scores[j].logprob, -j))
    norm = max(range(len(scores)), key=lambda j: (scores[j].logprob / max(1, len(endings[j])), -j))
    return raw, norm


def run(em: EvalModel, data: HellaswagData, opts: TaskOptions, progress: Progress) -> TaskResult:
    chosen = [data.items[i] for i in pick(len(data.items), opts.limit, opts.seed)]
    groups = groups_for(em, chosen)
    progress.start(len(groups))
    scored = em.score(groups, progress.advance)
    hits = [choose(s, it.endings) for s, it in zip(scored, chosen, strict=True)]
    n = len(hits)
    acc = sum(raw == it.label for (raw, _), it in zip(hits, chosen, strict=True)) / n
    acc_norm = sum(norm == it.label for (_, norm), it in zip(hits, chosen, strict=True)) / n
    truncated = sum(is_truncated(g, em.seq_len) for g in groups)
    return TaskResult({"acc": acc, "acc_norm": acc_norm}, n, data.skipped, truncated, data=data.label)


def bench(em: EvalModel, data: HellaswagData, n: int, batch_size: int, seed: int = 1234,
          repeats: int = 3) -> list[dict]:
    """Examples/s of three ways to score the same n examples: one forward per ending (unbatched), the
    context shared by the endings, and shared contexts batched, in `repeats` interleaved rounds that
    each keep their fastest (`bench_table.fastest_rounds`). The scores of every mode must agree."""
    import time

    from lmforge.bench_table import fastest_rounds

    chosen = [data.items[i] for i in pick(len(data.items), n, seed)]
    groups = groups_for(em, chosen)
    tokens = sum(len(g.context) * len(g.continuations) + sum(map(len, g.continuations)) for g in groups)
    modes = [("unbatched", 1, False), ("shared context", 1, True), ("batched", batch_size, True)]

    def timed(bs: int, share: bool) -> dict:
        em.batch_size, em.share_context = bs, share
        em.score(groups[:2])  # warm-up: first-call allocations stay out of the timing
        t0 = time.perf_counter()
        scores = em.score(groups)
        return {"seconds": time.perf_counter() - t0, "logprobs": [s.logprob for row in scores for s in row]}

    rows = fastest_rounds([lambda bs=bs, share=share: timed(bs, share) for _, bs, share in modes], repeats)
    out = []
    for (name, bs, share), row in zip(modes, rows, strict=True):
        t = row["seconds"]
        diff = max(abs(a - b) for a, b in zip(row["logprobs"], rows[0]["logprobs"], strict=True))
        out.append({"name": name, "batch_size": bs, "share_context": share, "examples": len(groups),
                    "seconds": t, "examples_per_s": len(groups) / t, "tokens_per_s": tokens / t,
                    "max_abs_diff": diff, "speedup": rows[0]["seconds"] / t})
    return out
