"""Choosing the next token, and turning chosen tokens into text safely while they stream.

`SamplingParams` is one request's settings; `RowSampler` applies them to one batch row with the
row's own random generator, so a seeded request draws the same numbers whatever else is batched
with it. `TextStream` turns token ids into text deltas that never split a UTF-8 character and never
show the beginning of a stop string that may still complete.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 0.8
    """0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1 = all."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 = off."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already in the context; 1 = off."""

    def __post_init__(self) -> None:
        self.stop = tuple(s for s in (self.stop or ()) if s)
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.repetition_penalty == 1.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits (B, V) outside the top-k and outside the top-p nucleus with -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) → next ids (B,) with one generator for the whole batch. Temperature 0 is greedy."""
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / p.temperature, p.top_k, p.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class RowSampler:
    """One request's sampling state: its parameters, its generator, the tokens it has seen."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device,
                 context: Sequence[int] = ()) -> None:
        self.params = params
        self.gen: torch.Generator | None = None
        if params.seed is not None and params.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(params.seed)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if context:
                self.seen[torch.tensor(list(context), device=device)] = True

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) → the next id."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.temperature <= 0:
            return int(logits.argmax())
        # shift first: the top logit becomes 0, so a tiny temperature gives -inf, never inf - inf = nan
        logits = (logits - logits.max()) / p.temperature
        ids = None
        if p.top_k and p.top_k < logits.shape[-1]:
            logits, ids = torch.topk(logits, p.top_k)  # sorted, so top_p needs no second sort
        elif p.top_p < 1.0:
            logits, ids = torch.sort(logits, descending=True)
        probs = logits.softmax(-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False  # the top token always stays, even when top_p rounds to 0 in float32
            probs = probs.masked_fill(drop, 0.0)
        if not bool(torch.isfinite(probs).all()):  # non-finite logits from the model: fall back to greedy
            return int(ids[0]) if ids is not None else int(torch.nan_to_num(logits, nan=-1e30).argmax())
        choice = int(torch.multinomial(probs, 1, generator=self.gen))
        return int(ids[choice]) if ids is not None else choice


class TextStream:
    """Token ids in, text deltas out: whole UTF-8 characters only, stop strings cut and held back.

    Text is decoded from each token's bytes with an incremental UTF-8 decoder, so a character whose
    bytes span two tokens appears once both have arrived, and the concatenated deltas always equal
    the final `text`.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._tok.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: flush the decoder and whatever was held back."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        pending = self._pending
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = pending[:cut], ""
        else:
            keep = 0 if final else self._held_back(pending)
            out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out

    def _held_back(self, pending: str) -> int:
        """Length of the longest tail of `pending` that is the start of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:n]):
                    best = n
                    break
        return best
