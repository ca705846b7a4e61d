"""Completion: the model continues held-out prompts greedily; BLEU (sacrebleu) and ROUGE-1/2/L F1
(rouge-score, with stemming) against the true continuation, both on a 0-100 scale.

Data: JSONL records with "prompt" and "completion" (or "reference"), or plain text / JSONL "text"
documents, whose paragraphs of at least 16 words are cut into a prompt (up to 32 words, at most half)
and a reference (the next up to 32 words). Each completion stops at a blank line and is cut to the
reference's number of words, so the scores measure what was said rather than how long it ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import DataError
from lmforge.tasks import HF_PREFIX, Progress, TaskOptions, TaskResult, check_records, hf_rows, pick
from lmforge.tasks import read_records as _read_jsonl
from lmforge.tasks.scoring import EvalModel

METRICS = {"bleu": True, "rouge1": True, "rouge2": True, "rougeL": True}
PRIMARY = "rougeL"
WORD = re.compile(r"\S+")
MIN_WORDS, PROMPT_WORDS, REF_WORDS = 16, 32, 32


@dataclass
class Pair:
    prompt: str
    reference: str


@dataclass
class CompletionData:
    label: str
    items: list[Pair]
    skipped: int


def split_text(text: str) -> Pair | None:
    """A paragraph → (its first words, the words after them); None when it is too short."""
    spans = [m.span() for m in WORD.finditer(text)]
    if len(spans) < MIN_WORDS:
        return None
    k = min(len(spans) // 2, PROMPT_WORDS)
    cut, end = spans[k - 1][1], spans[min(len(spans), k + REF_WORDS) - 1][1]
    return Pair(text[:cut].strip(), text[cut:end].strip())


def parse(record: dict) -> list[Pair]:
    if "prompt" in record:
        ref = record.get("completion", record.get("reference"))
        if not isinstance(record["prompt"], str) or not isinstance(ref, str) or not ref.strip():
            raise ValueError("prompt and completion must be strings, the completion non-empty")
        return [Pair(record["prompt"], ref.strip())]
    text = record["text"]
    if not isinstance(text, str):
        raise TypeError("text is not a string")
    return [p for para in re.split(r"\n\s*\n", text) if (p := split_text(para))]


def load(opts: TaskOptions) -> CompletionData:
    spec = opts.data
    if spec is not None and not spec.startswith(HF_PREFIX) and ".jsonl" not in Path(spec).name:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"task completion: {path} is not a file")
        records, bad = [{"text": path.read_text(encoding="utf-8", errors="replace")}], 0
    elif spec is not None and spec.startswith(HF_PREFIX):
        records, bad = [dict(r) for r in hf_rows(spec)], 0
    else:
        records, bad = _read_jsonl("completion", spec, opts.strict)
    nested, skipped = check_records(str(spec), records, parse, opts.strict)
    items = [p for pairs in nested for p in pairs]
    if not items:
        raise DataError(f"{spec}: no prompt/reference pairs (paragraphs need {MIN_WORDS}+ words)")
    return CompletionData(str(spec), items, bad + skipped)


def scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h) for h, r in zip(hyps, refs, strict=True)]
    out = {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}
    for k in ("rouge1", "rouge2", "rougeL"):
        out[k] = 100.0 * sum(r[k].fmeasure for r in rouge) / len(rouge)
    return out


def run(em: EvalModel, data: CompletionData, opts: TaskOptions, progress: Progress) -> TaskResult:
    from lmforge.generate import SamplingParams, generate_batch

    chosen = [data.items[i] for i in pick(len(data.items), opts.limit, opts.seed)]
    max_new = max(1, min(opts.max_new_tokens, em.seq_len // 2))
    keep = em.seq_len - max_new
    prompts, truncated = [], 0
    for p in chosen:
        ids = em.prefix() + em.tokenizer.encode(p.prompt)
        truncated += len(ids) > keep
        prompts.append(ids[-keep:])
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=("\n\n",))
    progress.start(len(prompts))
    hyps: list[str] = []
    for i in range(0, len(prompts), em.batch_size):
        outs = generate_batch(em.model, em.tokenizer, prompts[i:i + em.batch_size], params,
                              max_batch=em.batch_size)
        hyps += [c.text for c in outs]
        progress.advance(len(outs))
    refs = [" ".join(p.reference.split()) for p in chosen]
    hyps = [" ".join(h.split()[:len(r.split())]) for h, r in zip(hyps, refs, strict=True)]
    return TaskResult(scores(hyps, refs), len(chosen), data.skipped, truncated, data=data.label)
