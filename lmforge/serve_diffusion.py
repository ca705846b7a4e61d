"""The server's runner for masked-diffusion models: one worker thread fills one canvas at a time.

A diffusion model has no KV cache and no next token: each request is K denoising steps over its whole
canvas. Requests are served one at a time in arrival order on a single thread (the model is not
thread-safe); a full waiting queue answers 429 and a client that goes away cancels its request at the
next step, as with the autoregressive `Runner`. `n` choices are run one after another, seeds
`seed + i`.

Streaming (`stream: true`) sends text as it settles, never text that may still change: after each
step, the committed tokens left of the first still-masked position are final (a committed token is
never masked again), so their text goes out as a delta, in whole UTF-8 characters and holding back what
may be the start of a stop string (`diffusion.SettledText`). The request ends as soon as the settled
text reaches `<|eos|>` or a stop string, or when the canvas is full. With low-confidence remasking the
left end may settle late, so much of the text can arrive in the last few chunks. The deltas always
concatenate to the non-stream text for the same seed, which is `diffusion_generate`'s text.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from torch import nn

from lmforge.diffusion import SettledText, diffusion_progress, mask_id_of
from lmforge.engine import Event
from lmforge.sampling import SamplingParams
from lmforge.serve import Failure, Handle, ModelThread, deliver
from lmforge.serve_api import ApiError

log = logging.getLogger("lmforge.serve")


@dataclass(eq=False)
class DiffusionRow:
    """One choice of one request; the attributes the HTTP side reads are those of `engine.Row`."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] | None
    steps: int
    user: Handle
    settled: SettledText | None = None
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False

    @property
    def text(self) -> str:
        return self.settled.text if self.settled else ""

    @property
    def tokens(self) -> list[int]:
        return self.settled.tokens if self.settled else []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_params(params: SamplingParams) -> None:
    """400 for the settings the diffusion sampler has no use for, rather than ignoring them."""
    for name, off in (("min_p", 0.0), ("repetition_penalty", 1.0)):
        if getattr(params, name) != off:
            raise ApiError(400, f"{name} is not supported for diffusion models", param=name)


class DiffusionRunner(ModelThread):
    """Owns the model and the thread that denoises the waiting requests, one at a time."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_queue: int, steps: int,
                 step_delay_s: float = 0.0) -> None:
        super().__init__("lmforge-diffusion", max_queue, step_delay_s)
        self.model, self.tokenizer, self.steps = model, tokenizer, steps
        mask_id_of(tokenizer)  # a tokenizer without <|mask|> fails at start-up, not in every request
        self.waiting: deque[DiffusionRow] = deque()
        self.running: DiffusionRow | None = None
        self.n_finished = self.n_cancelled = 0
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        return {"running": int(self.running is not None), "waiting": len(self.waiting),
                "finished": self.n_finished, "cancelled": self.n_cancelled}

    def submit(self, jobs: list[tuple[list[int], SamplingParams, frozenset[int] | None]], stream: bool = False,
               steps: int | None = None) -> Handle:
        """Queue one row per job; `steps` (the request's own) overrides the server's --steps."""
        for _, params, _ in jobs:
            check_params(params)
        handle = Handle(asyncio.get_running_loop(), stream)
        with self._lock:
            self._check_room(len(self.waiting), len(jobs))
            for ids, params, stop_ids in jobs:
                handle.rows.append(DiffusionRow(ids, params, stop_ids, steps or self.steps, handle))
            self.waiting.extend(handle.rows)
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        """A waiting row leaves the queue now (its place is free at once); a running one stops at its next step."""
        with self._lock:
            for row in handle.rows:
                row.cancelled = True
            queued = len(self.waiting)
            self.waiting = deque(r for r in self.waiting if r.user is not handle)
            for row in handle.rows:
                if row is not self.running and row.finish_reason is None:
                    row.finish_reason = "cancelled"
            self.n_cancelled += queued - len(self.waiting)

    def _loop(self) -> None:
        while not self._stopping:
            row = self._next_row()
            if row is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._run(row)
            except Exception as err:  # a failed request must not leave its client waiting forever
                log.exception("diffusion sampling failed")
                row.error, row.finish_reason = f"generation failed: {err}", "error"
                try:
                    _send(row, Failure(row, row.error))
                except Exception:  # e.g. the client's event loop is closed: the runner must live on
                    log.exception("could not report the failure")
            finally:
                self.running = None

    def _next_row(self) -> DiffusionRow | None:
        with self._lock:
            while self.waiting:
                row = self.waiting.popleft()
                if not row.cancelled:
                    self.running = row
                    return row
                row.finish_reason = "cancelled"
                self.n_cancelled += 1
        return None

    def _run(self, row: DiffusionRow) -> None:
        p, sent = row.params, 0
        for _, settled in diffusion_progress(
                self.model, self.tokenizer, row.prompt_ids, max_new_tokens=p.max_new_tokens, steps=row.steps,
                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed, stop=p.stop,
                stop_ids=row.stop_ids):
            if row.cancelled or self._stopping:
                row.finish_reason = "cancelled"
                self.n_cancelled += 1
                return
            row.settled = settled
            delta, sent = settled.text[sent:], len(settled.text)
            done = settled.finish_reason is not None
            if done:
                row.finish_reason = settled.finish_reason
                self.n_finished += 1
            if done or (delta and row.user.stream):
                _send(row, Event(row, None, delta, done))
            if done:  # the text is final: the steps left would only fill positions past its end
                return
            if self.step_delay_s:
                time.sleep(self.step_delay_s)


def _send(row: DiffusionRow, event: Event | Failure) -> None:
    row.user.loop.call_soon_threadsafe(deliver, [event])
