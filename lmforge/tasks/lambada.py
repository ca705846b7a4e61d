"""LAMBADA: predict the last word of a passage (OpenAI's `lambada_test.jsonl`, {"text": ...} per line).

The target is the last whitespace-separated word, with the whitespace before it. `acc` counts passages
whose every target token is the model's top choice, i.e. greedy decoding writes the whole word; `ppl`
is exp of the mean negative log-likelihood of the target word per passage (lm-evaluation-harness's
definition, so it is per word, not per token).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lmforge.tasks import Progress, TaskOptions, TaskResult, check_records, pick, read_records
from lmforge.tasks.scoring import EvalModel, Group, encode_pair, is_truncated

METRICS = {"acc": True, "ppl": False}
PRIMARY = "acc"
LAST_WORD = re.compile(r"^(.*\S)(\s+\S+)\s*$", re.DOTALL)


@dataclass
class Passage:
    context: str
    target: str
    """The last word with the whitespace before it."""


@dataclass
class LambadaData:
    label: str
    items: list[Passage]
    skipped: int


def parse(record: dict) -> Passage:
    text = record["text"]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    m = LAST_WORD.match(text)
    if not m:
        raise ValueError("text has fewer than two words")
    return Passage(m.group(1), m.group(2))


def load(opts: TaskOptions) -> LambadaData:
    records, bad = read_records("lambada", opts.data, opts.strict)
    items, skipped = check_records(str(opts.data), records, parse, opts.strict)
    return LambadaData(str(opts.data), items, bad + skipped)


def run(em: EvalModel, data: LambadaData, opts: TaskOptions, progress: Progress) -> TaskResult:
    chosen = [data.items[i] for i in pick(len(data.items), opts.limit, opts.seed)]
    groups = []
    for p in chosen:
        ctx, target = encode_pair(em.tokenizer, p.context, p.target, em.prefix())
        groups.append(Group(ctx, [target]))
    progress.start(len(groups))
    scores = [s[0] for s in em.score(groups, progress.advance)]
    n = len(scores)
    acc = sum(s.greedy for s in scores) / n
    ppl = math.exp(min(-sum(s.logprob for s in scores) / n, 700.0))
    truncated = sum(is_truncated(g, em.seq_len) for g in groups)
    return TaskResult({"acc": acc, "ppl": ppl}, n, data.skipped, truncated, data=data.label)
