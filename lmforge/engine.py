"""The generation engine: a preallocated KV cache shared by a changing batch of requests.

Each `step()` admits waiting requests (their prompts are prefilled in one forward pass, which also
yields their first token), then decodes one token for every running request in one forward pass.
A request that finishes frees its cache slot at the next step and a waiting one takes it, so
requests join a running batch without waiting for it to drain (dynamic batching). Live requests
always occupy slots [0, n) so the decode step reads the cache without gathering rows.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.decode_step import DecodeStep, supports
from lmforge.kv_cache import KVCache
from lmforge.sampling import RowSampler, SamplingParams, TextStream


@dataclass(eq=False)
class Row:
    """One request moving through the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    sampler: RowSampler
    stream: TextStream
    stop_ids: frozenset[int]
    user: Any = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    """Why the row failed, when finish_reason is "error"."""
    cancelled: bool = False
    slot: int = -1
    pos: int = 0
    """Tokens of this row held in the cache (its next write position)."""
    pending: int | None = None
    """The last sampled token, fed to the model at the next decode step."""
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_end: float | None = None

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one step did for one row: the token it added (None for a stop token) and new text."""

    row: Row
    token: int | None
    delta: str
    finished: bool


def require_autoregressive(cfg: Any) -> None:
    """The engine decodes next-token models only: a masked-diffusion model is refused in one line
    (chat and serve route those to the diffusion sampler before they get here)."""
    if getattr(cfg, "objective", "autoregressive") != "autoregressive":
        from lmforge.errors import ConfigError

        raise ConfigError(f"this is a {cfg.objective} model: the generation engine (and bench generate) decodes "
                          "autoregressive models only; sample it with `lmforge generate CKPT --steps K`, "
                          "`lmforge chat` or `lmforge serve`")


class Engine:
    """Batched, cached decoding for one model; see the module docstring.

    slide: when a row fills the context, keep its last half and prefill that again (unbounded
    generation) instead of finishing it with reason "length".
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_len: int = 0,
                 slide: bool = False, compile: bool = False) -> None:
        cfg = model.cfg
        require_autoregressive(cfg)
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.max_len = min(max_len or cfg.seq_len, cfg.seq_len)
        self.max_batch, self.slide = max_batch, slide
        p = next(model.parameters())
        self.device = p.device
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.cache = KVCache(cfg, max_batch, self.max_len, self.device, dtype)
        self.vocab_size = cfg.vocab_size
        self.active: list[Row] = []
        self.waiting: deque[Row] = deque()
        self.n_finished = 0
        self.n_cancelled = 0
        self._arange = torch.arange(self.max_len, device=self.device)
        self._forward = model
        self._step = DecodeStep(model) if supports(model) and not compile else None
        if compile:
            # dynamic: the batch size and the cached length change from step to step
            self._forward = torch.compile(model, dynamic=True)
        eos = getattr(tokenizer, "eos_id", None)
        self.default_stop_ids = frozenset() if eos is None else frozenset([eos])

    # ---- requests ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, stop_ids: Iterable[int] | None = None,
               user: Any = None) -> Row:
        """Queue a request; it joins the batch at the next step with a free slot."""
        ids = list(prompt_ids)
        if not ids:
            raise ValueError("the prompt has no tokens")
        if len(ids) > self.max_len:
            if not self.slide:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds the context of {self.max_len}")
            ids = ids[-self.max_len:]
        row = Row(ids, params, RowSampler(params, self.vocab_size, self.device, ids),
                  TextStream(self.tokenizer, params.stop),
                  self.default_stop_ids if stop_ids is None else frozenset(stop_ids), user)
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop a request (the client went away); its slot is freed at the next step."""
        row.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    # ---- stepping ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting rows, then decode one token for the rows that were already running."""
        self._retire()
        running = len(self.active)
        events = self._admit()
        if running:
            events += self._decode(self.active[:running])
        return events

    def run(self) -> list[Event]:
        """Step until every submitted request has finished; all events in order."""
        events = []
        while self.busy:
            events += self.step()
        return events

    def _retire(self) -> None:
        """Drop finished and cancelled rows, moving the survivors down so slots stay contiguous."""
        keep = [r for r in self.active if not r.finished and not r.cancelled]
        for r in self.active:
            if r.cancelled and not r.finished:
                r.finish_reason, r.t_end = "cancelled", time.perf_counter()
                self.n_cancelled += 1
        for i, r in enumerate(keep):
            if r.slot != i:
                self.cache.move_row(r.slot, i, r.pos)
                r.slot = i
        self.active = keep

    def _admit(self) -> list[Event]:
        new: list[Row] = []
        while self.waiting and len(self.active) + len(new) < self.max_batch:
            row = self.waiting.popleft()
            if row.cancelled:
                row.finish_reason, row.t_end = "cancelled", time.perf_counter()
                self.n_cancelled += 1
                continue
            row.slot = len(self.active) + len(new)
            new.append(row)
        if not new:
            return []
        self.active.extend(new)
        return self._sample_and_emit(new, self._prefill(new))

    def _prefill(self, rows: list[Row]) -> torch.Tensor:
        """Prompts → their last logits (B, V). Right padding: a causal mask is all a row needs, and its
        padded cache positions are overwritten before any later step reads them."""
        lens = [len(r.prompt_ids) for r in rows]
        if sum(lens) * 3 < max(lens) * len(rows) * 2:
            # lengths differ a lot: padding would cost more than separate passes
            return torch.cat([self._prefill(rows[i:i + 1]) for i in range(len(rows))])
        T = max(lens)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :lens[i]] = torch.tensor(r.prompt_ids)
            r.pos = lens[i]
        self.cache.select(rows[0].slot, rows[-1].slot + 1)
        last = torch.tensor(lens, device=self.device) - 1
        return self._last_logits(ids.to(self.device), last)

    def _last_logits(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The forward pass over whole prompts, keeping only each row's logits at index `last` (B, V).

        The output layer is the costliest matmul of a prefill (vocab x width per position), and only
        one position per row is needed: a hook on the final norm drops the others before it.
        """
        rows = torch.arange(ids.shape[0], device=ids.device)
        norm = getattr(self.model, "norm", None) if self._step is not None else None
        if norm is None:
            return self._forward(ids, kv_cache=self.cache, start_pos=0)[rows, last]  # (B, T, V) → (B, V)
        hook = norm.register_forward_hook(lambda _m, _i, out: out[rows, last].unsqueeze(1))
        try:
            return self._forward(ids, kv_cache=self.cache, start_pos=0)[:, 0]
        finally:
            hook.remove()

    def _decode(self, rows: list[Row]) -> list[Event]:
        events = []
        if self.slide:
            for r in rows:
                if r.pos >= self.max_len and not r.finished:
                    events += self._slide(r)
        rows = [r for r in rows if not r.finished]
        if not rows or len(rows) != rows[-1].slot + 1:
            return events + ([] if not rows else self._decode_each(rows))
        tokens = torch.tensor([r.pending for r in rows], device=self.device)  # (B,)
        pos = [r.pos for r in rows]
        if self._step is not None:
            logits = self._step(tokens, pos, self.cache)
        elif min(pos) == max(pos):  # one shared position: the model's own, mask-free path
            self.cache.select(0, len(rows))
            logits = self._forward(tokens[:, None], kv_cache=self.cache, start_pos=pos[0])[:, -1]
        else:
            logits = self._decode_ragged(tokens[:, None], pos)[:, -1]
        for r in rows:
            r.pos += 1
        return events + self._sample_and_emit(rows, logits)

    def _decode_ragged(self, tokens: torch.Tensor, pos: list[int]) -> torch.Tensor:
        """Rows at different positions: per-row writes, rotary/learned positions and a key mask."""
        B = len(pos)
        pos_t = torch.tensor(pos, device=self.device)
        kv_len = max(pos) + 1
        mask = (self._arange[:kv_len] <= pos_t[:, None]).view(B, 1, 1, kv_len)
        self.cache.select(0, B, pos_t, kv_len)
        # (B, 1): rotary tables become (B, 1, head_dim) and broadcast over heads; learned position
        # embeddings become (B, 1, n_embd) to add to the (B, 1, n_embd) token embeddings
        positions = pos_t.view(B, 1)
        return self._forward(tokens, kv_cache=self.cache, positions=positions, attn_mask=mask)

    def _decode_each(self, rows: list[Row]) -> list[Event]:
        """Fallback when live rows are not the slots [0, n) (never after `_retire`): one by one."""
        events = []
        for r in rows:
            self.cache.select(r.slot, r.slot + 1)
            logits = self._forward(torch.tensor([[r.pending]], device=self.device), kv_cache=self.cache,
                                   start_pos=r.pos)
            r.pos += 1
            events += self._sample_and_emit([r], logits[:, -1])
        return events

    def _slide(self, r: Row) -> list[Event]:
        """Context full: prefill the last half of (prompt + output) again and sample from it."""
        window = (r.prompt_ids + r.tokens)[-(self.max_len // 2):]
        self.cache.select(r.slot, r.slot + 1)
        ids = torch.tensor([window], device=self.device)
        r.pos = len(window)
        return self._sample_and_emit([r], self._last_logits(ids, torch.tensor([len(window) - 1], device=self.device)))

    def _sample_and_emit(self, rows: list[Row], logits: torch.Tensor) -> list[Event]:
        if all(r.params.greedy for r in rows):
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = [r.sampler(logits[i]) for i, r in enumerate(rows)]
        now = time.perf_counter()
        return [self._accept(r, tok, now) for r, tok in zip(rows, chosen, strict=True)]

    def _accept(self, r: Row, tok: int, now: float) -> Event:
        if r.t_first is None:
            r.t_first = now
        if tok in r.stop_ids:
            return self._finish(r, "stop", None, r.stream.finish(), now)
        r.tokens.append(tok)
        r.sampler.observe(tok)
        delta = r.stream.push(tok)
        if r.stream.stopped:
            return self._finish(r, "stop", tok, delta, now)
        if len(r.tokens) >= r.params.max_new_tokens or (r.pos >= self.max_len and not self.slide):
            return self._finish(r, "length", tok, delta + r.stream.finish(), now)
        r.pending = tok
        return Event(r, tok, delta, False)

    def _finish(self, r: Row, reason: str, tok: int | None, delta: str, now: float) -> Event:
        r.finish_reason, r.pending, r.t_end = reason, None, now
        self.n_finished += 1
        return Event(r, tok, delta, True)
