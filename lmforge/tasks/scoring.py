"""The scoring core of cloze and multiple-choice tasks: log-likelihood of continuations given contexts.

A request is a `Group`: one context and one or more continuations, as token ids. A group with several
continuations is packed as a tree, in one row: the context once, then each continuation, with an
attention mask that lets a continuation see the context and itself but no other continuation, and
positions that restart after the context for each one. The context then costs one forward pass for
all choices instead of one each. A group with one continuation is a plain causal row (no mask).
Rows are right-padded; a batch holds rows of similar length.

Too long for the model's context: the context loses tokens on the left until context + continuation
fit `seq_len + 1` tokens (the last token is a target only); a tree that does not fit is scored as
separate rows, so the numbers never depend on the packing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lmforge.runtime import autocast_ctx


@dataclass
class Group:
    context: list[int]
    continuations: list[list[int]]


class ChoiceScore(NamedTuple):
    logprob: float
    """Summed log-probability of the continuation's tokens, in nats."""
    n_tokens: int
    greedy: bool
    """Every continuation token was the model's top choice (greedy decoding reproduces it)."""


@dataclass
class EvalModel:
    """A loaded model with what the tasks need to know about it."""

    model: nn.Module
    tokenizer: Any
    name: str
    path: str = ""
    step: int | None = None
    fmt: str = "lmforge"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    run_dir: Path | None = None
    shards_dir: str | None = None
    batch_size: int = 16
    max_tokens: int = 0
    """Tokens per forward pass; 0 = 1024 on a CPU (measured fastest: activations stay in cache), 16384
    on a GPU."""
    share_context: bool = True
    cache: dict = field(default_factory=dict)
    """Results tasks share, e.g. loss and topk come from one pass over the same windows."""

    @property
    def seq_len(self) -> int:
        return int(self.model.cfg.seq_len)

    @property
    def fingerprint(self) -> str:
        return str(getattr(self.tokenizer, "fingerprint", ""))

    def prefix(self) -> list[int]:
        """What every document starts with in training: <|bos|> when the tokenizer has one."""
        tok = self.tokenizer
        if tok.bos_id is not None:
            return [tok.bos_id]
        return [tok.eos_id] if tok.eos_id is not None else []

    def score(self, groups: Sequence[Group], progress: Callable[[int], Any] | None = None
              ) -> list[list[ChoiceScore]]:
        return score_groups(self.model, groups, device=self.device, dtype=self.dtype,
                            batch_size=self.batch_size,
                            max_tokens=self.max_tokens or (1024 if self.device.type == "cpu" else 16384),
                            share_context=self.share_context, progress=progress)


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix: Sequence[int] = ()
                ) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split where the joint encoding splits.

    Encoding the two texts apart can differ from encoding them together at the seam (a merge across
    it); the joint encoding is what the model saw in training, so it wins whenever the context's own
    ids are a prefix of it.
    """
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    joint = whole[:len(ctx)] == ctx and len(whole) > len(ctx)
    cont = whole[len(ctx):] if joint else tokenizer.encode(continuation)
    return list(prefix) + ctx, cont


def is_truncated(group: Group, seq_len: int) -> bool:
    """True when some continuation, scored on its own row, loses context tokens to the window."""
    return any(len(group.context) + len(c) - 1 > seq_len for c in group.continuations)


def _fit_row(context: list[int], cont: list[int], seq_len: int) -> Group:
    full = (context + cont)[-(seq_len + 1):]
    k = min(len(cont), seq_len)  # a continuation longer than the window: its end is scored
    return Group(full[:-k], [full[-k:]])


@dataclass
class _Unit:
    """One packed row: a group (tree) or one of its continuations, and where its scores go."""

    group: Group
    index: int
    first_choice: int

    @property
    def tree(self) -> bool:
        return len(self.group.continuations) > 1

    @property
    def length(self) -> int:
        """Input tokens: the context, then every continuation but its last token (a target only)."""
        return len(self.group.context) + sum(len(c) - 1 for c in self.group.continuations)


def _units(groups: Sequence[Group], seq_len: int, share_context: bool) -> list[_Unit]:
    units = []
    for i, g in enumerate(groups):
        if not g.context or not g.continuations or not all(g.continuations):
            raise ValueError(f"request {i}: the context and every continuation need at least one token")
        tree = _Unit(g, i, 0)
        if share_context and tree.tree and not is_truncated(g, seq_len):  # every branch fits its positions
            units.append(tree)
        else:
            units += [_Unit(_fit_row(g.context, c, seq_len), i, j) for j, c in enumerate(g.continuations)]
    return units


def _plan(units: list[_Unit], batch_size: int, max_tokens: int) -> list[list[_Unit]]:
    """Batches, longest rows first so rows of a batch have similar lengths; trees apart from plain rows
    (those need no mask, and SDPA is faster without one)."""
    batches: list[list[_Unit]] = []
    for u in sorted(units, key=lambda u: (u.tree, u.length), reverse=True):
        cur = batches[-1] if batches else None
        if cur and cur[0].tree == u.tree and len(cur) < batch_size and \
                cur[0].length * (len(cur) + 1) <= max_tokens:
            cur.append(u)
        else:
            batches.append([u])
    return batches


def _pack(units: list[_Unit]) -> tuple[torch.Tensor, dict]:
    """Rows [context | continuation 1 | ... | continuation n | right padding]; for trees, the mask lets
    each continuation see the context and itself only, and positions restart after the context."""
    B, T = len(units), max(u.length for u in units)
    x = torch.zeros(B, T, dtype=torch.long)
    region = torch.full((B, T), -1, dtype=torch.long)  # -1 padding, 0 context, j + 1 continuation j
    pos = torch.zeros(B, T, dtype=torch.long)
    pred, tgt = [], []
    for i, u in enumerate(units):
        ctx, C = u.group.context, len(u.group.context)
        x[i, :C], region[i, :C], pos[i, :C] = torch.tensor(ctx), 0, torch.arange(C)
        s, rows = C, []
        for j, cont in enumerate(u.group.continuations):
            w = len(cont) - 1
            x[i, s:s + w] = torch.tensor(cont[:-1], dtype=torch.long)
            region[i, s:s + w], pos[i, s:s + w] = j + 1, C + torch.arange(w)
            rows.append([C - 1] + [s + t for t in range(w)])  # token t is predicted at the position before it
            s += w
        pred.append(rows)
        tgt.append(u.group.continuations)
    if not units[0].tree:
        return x, {"pred": pred, "tgt": tgt}  # plain causal rows: the model's own causal path
    idx = torch.arange(T)
    rq, rk = region[:, :, None], region[:, None, :]  # (B, T, 1) queries, (B, 1, T) keys
    mask = (idx[None, None, :] <= idx[None, :, None]) & (rk >= 0) & ((rk == 0) | (rk == rq))  # (B, T, T)
    mask |= torch.eye(T, dtype=torch.bool)  # a padded query sees itself: SDPA gives NaN for empty rows
    return x, {"pred": pred, "tgt": tgt, "attn_mask": mask[:, None], "positions": pos}


@contextlib.contextmanager
def _headless(model: nn.Module) -> Iterator[nn.Module | None]:
    """The model returning its final hidden states; the caller applies the output layer (yielded) to
    the scored positions only. Context positions need no logits: that skips a quarter of a small
    model's work and the (B, T, vocab) tensor a large vocabulary would fill memory with."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        yield None  # some other module: it returns logits, use them as they are
        return
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


LOGITS_PER_CHUNK = 1 << 23
"""The most logits scoring holds at once (32 MB in fp32), whatever the vocabulary."""


def _gather_scores(out: torch.Tensor, head: nn.Module | None, pred: list, tgt: list) -> list[list[ChoiceScore]]:
    """Sum the log-probs of the targets at the predicting positions; one list per row.

    Only the real (row, position) pairs are scored: padding rows to the longest would waste a third
    of the output layer's work. Chunks of LOGITS_PER_CHUNK bound the memory a large vocabulary
    takes. A target counts as the top choice when its logit is the largest (amax is ten times
    cheaper than argmax on a CPU; the two differ only on exact ties)."""
    B, T = out.shape[:2]
    flat = out.reshape(B * T, out.shape[-1])
    where = torch.tensor([i * T + p for i, r in enumerate(pred) for rows in r for p in rows], device=out.device)
    want = torch.tensor([t for r in tgt for c in r for t in c], device=out.device)[:, None]
    lps, tops = [], []
    vocab = head.out_features if isinstance(head, nn.Linear) else out.shape[-1]
    chunk = max(128, LOGITS_PER_CHUNK // vocab)
    for a in range(0, len(where), chunk):
        sel = flat[where[a:a + chunk]]
        logits = (head(sel) if head is not None else sel).float()  # (chunk, vocab)
        t = want[a:a + chunk]
        lps.append(torch.log_softmax(logits, dim=-1).gather(-1, t)[:, 0])
        tops.append(logits.gather(-1, t)[:, 0] >= logits.amax(-1))
    lp = torch.cat(lps).double().cpu().tolist()
    top = torch.cat(tops).cpu().tolist()
    scores, k = [], 0
    for r in tgt:
        row = []
        for c in r:
            row.append(ChoiceScore(sum(lp[k:k + len(c)]), len(c), all(top[k:k + len(c)])))
            k += len(c)
        scores.append(row)
    return scores


@torch.inference_mode()
def score_groups(model: nn.Module, groups: Sequence[Group], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16, max_tokens: int = 8192,
                 share_context: bool = True, progress: Callable[[int], Any] | None = None
                 ) -> list[list[ChoiceScore]]:
    """Per group, one ChoiceScore per continuation, in order. `progress(k)`: k more groups done."""
    device = torch.device(device)
    units = _units(groups, int(model.cfg.seq_len), share_context)
    results: list[list[ChoiceScore | None]] = [[None] * len(g.continuations) for g in groups]
    left = [len(g.continuations) for g in groups]
    # fp32: masks in additive form, made once per batch (SDPA converts a boolean one in every layer)
    additive = dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    was_training = model.training
    model.eval()
    with _headless(model) as head:
        for batch in _plan(units, max(1, batch_size), max_tokens):
            x, extra = _pack(batch)
            kwargs = {k: v.to(device) for k, v in extra.items() if k in ("attn_mask", "positions")}
            if "attn_mask" in kwargs and additive:
                kwargs["attn_mask"] = torch.zeros(kwargs["attn_mask"].shape, device=device).masked_fill_(
                    ~kwargs["attn_mask"], float("-inf"))
            with autocast_ctx(device, dtype):
                out = model(x.to(device), **kwargs)
                scored = _gather_scores(out, head, extra["pred"], extra["tgt"])
            done = 0
            for u, scores in zip(batch, scored, strict=True):
                results[u.index][u.first_choice:u.first_choice + len(scores)] = scores
                left[u.index] -= len(scores)
                done += left[u.index] == 0
            if progress is not None and done:
                progress(done)
    model.train(was_training)
    return results  # type: ignore[return-value]
