"""Masked diffusion language modelling: the noise schedule, the loss, the ELBO, iterative unmasking.

The objective follows MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
Models", arXiv:2406.07524) and LLaDA (Nie et al. 2025, "Large Language Diffusion Models",
arXiv:2502.09992); the code is written here, on lmforge's own Transformer.

Forward process: at masking level t in (0, 1] every token of a clean sequence x is replaced by
`<|mask|>` independently with probability t (the linear schedule alpha_t = 1 - t). The same
Transformer, run with bidirectional attention and no time input, predicts the clean token at every
masked position; unmasked tokens are copied, so they carry no loss, and the mask token itself is never
predicted (MDLM's "SUBS" parameterisation). With L tokens per sequence the negative log-likelihood is
bounded by the continuous-time ELBO

    -log p(x) <= E_{t ~ U(0, 1]} [ (1/t) * sum_{i masked in z_t} -log p(x_i | z_t) ].

Training draws t ~ U(eps, 1] (low-discrepancy across the batch) and divides by L: the loss is in nats
per token, like the autoregressive loss. Validation integrates t out per number of masked tokens l
(LLaDA's equivalent form): l ~ U{1..L}, exactly l random positions masked, weight L/l. Summed over l,
the integral of (1/t) Binomial(l; L, t) dt is 1/l, so both estimate the same bound, and this one needs
no eps and has lower variance. A fixed number of stratified levels and a fixed seed make successive
validations comparable.

Sampling starts from the prompt followed by N masks and runs K steps; each step predicts every masked
position and commits an even share of them (the linear schedule's expected count), the most confident
first (LLaDA's low-confidence remasking) or at random. Outputs longer than the context are made block
by block, each block conditioned on the text before it (LLaDA's semi-autoregressive sampling).
A committed token is never masked again, so the text left of the first mask is final: `SettledText`
reads it as it settles, which is what the server streams and where it stops once the text has ended.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.runtime import autocast_ctx
from lmforge.sampling import TextStream, filter_logits

MASK_TOKEN = "<|mask|>"
EPS = 1e-3
"""Lowest training masking level: 1/t stays below 1000."""
ELBO_SAMPLES = 4
"""Masking levels per validation sequence (stratified over U{1..L})."""
ELBO_SEED = 0
SAMPLE_STEPS = 64
"""Denoising steps for the samples written during training."""
MASK_GLYPH = "░"
"""How a still-masked token shows in a streamed canvas."""

Remasking = Literal["low_confidence", "random"]


def mask_id_of(tokenizer: Any) -> int:
    """The id of `<|mask|>`, or a ConfigError naming the remedy."""
    mask_id = (getattr(tokenizer, "special_tokens", None) or {}).get(MASK_TOKEN)
    if mask_id is None:
        raise ConfigError(f"the diffusion objective needs a {MASK_TOKEN} special token: add it to "
                          "tokenizer.special_tokens and rebuild the tokenizer and shards")
    return int(mask_id)


def is_diffusion(model_or_cfg: Any) -> bool:
    """True for a diffusion model (or its ModelConfig): sample it with `diffusion_generate`."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    return getattr(cfg, "objective", "autoregressive") == "diffusion"


# ---- forward process --------------------------------------------------------------------------------
def sample_t(batch: int, *, eps: float = EPS, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Masking levels (batch,) in (eps, 1], each U(eps, 1]; spread evenly over the batch (one shared
    random offset, as MDLM does) so that a small batch still covers the range: lower-variance loss."""
    u = torch.rand((), device=device, generator=generator)
    frac = (u + torch.arange(batch, device=device) / batch) % 1.0  # [0, 1)
    return 1.0 - (1.0 - eps) * frac


def mask_tokens(x: torch.Tensor, t: torch.Tensor, mask_id: int, *, keep: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token of x (B, T) by `mask_id` with probability t (B,); `keep` (B, T) positions
    never are. Returns (z, masked)."""
    masked = torch.rand(x.shape, device=x.device, generator=generator) < t[:, None]
    if keep is not None:
        masked &= ~keep
    return x.masked_fill(masked, mask_id), masked


def denoiser_logits(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) for noisy tokens z (B, T): every position sees every other one."""
    return model(z, causal=False)


def _forbid_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    # the clean data holds no mask tokens: give them no probability (out of place: autograd-safe)
    return logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                         weight: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Sum over masked positions of weight * -log p(target); (B, T, V), (B, T), (B, T), (B, T)."""
    ce = F.cross_entropy(_forbid_mask(logits[masked], mask_id), targets[masked], reduction="none")
    return (ce * weight[masked]).sum()


def diffusion_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mask_id: int,
                   eps: float = EPS) -> torch.Tensor:
    """The training loss on a loader batch: the ELBO's (1/t)-weighted masked cross-entropy, in nats per
    token. The clean sequence is y, the tokens the autoregressive loss scores; y < 0 (no target) stays
    unmasked and uncounted. x is unused: a diffusion model sees the whole window, not its prefix."""
    valid = y >= 0
    clean = y.clamp_min(0)
    t = sample_t(y.shape[0], eps=eps, device=y.device)
    z, masked = mask_tokens(clean, t, mask_id, keep=~valid)
    logits = denoiser_logits(model, z)
    weight = (1.0 / t)[:, None].expand_as(masked)
    return masked_cross_entropy(logits, clean, masked, weight, mask_id) / valid.sum().clamp_min(1)


# ---- evaluation -------------------------------------------------------------------------------------
def _mask_exactly(counted: torch.Tensor, n_mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """n_mask[b] positions of row b chosen uniformly among its counted ones (B, T) → bool (B, T)."""
    scores = torch.rand(counted.shape, device=counted.device, generator=gen).masked_fill(~counted, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < n_mask[:, None]) & counted


def _elbo_terms(model: nn.Module, clean: torch.Tensor, counted: torch.Tensor, samples: int,
                gen: torch.Generator, mask_id: int) -> torch.Tensor:
    """Per-position ELBO contributions (B, T) in nats; their row sum estimates the row's bound."""
    n = counted.sum(1)  # (B,) positions scored in each row; the others are context, never masked
    terms = torch.zeros(clean.shape, dtype=torch.float64, device=clean.device)
    for k in range(samples):
        u = (k + torch.rand(n.shape, device=clean.device, generator=gen)) / samples  # stratified
        level = (u * n).long().clamp(max=(n - 1).clamp_min(0)) + 1  # l in U{1..L}
        masked = _mask_exactly(counted, level, gen)
        logits = denoiser_logits(model, clean.masked_fill(masked, mask_id))
        ce = F.cross_entropy(_forbid_mask(logits[masked], mask_id), clean[masked], reduction="none")
        weight = (n / level).double()[:, None].expand_as(masked)[masked]
        terms[masked] += ce.double() * weight / samples
    return terms


@torch.no_grad()
def evaluate_elbo(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    token_bytes: torch.Tensor,
    *,
    mask_id: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_batches: int | None = None,
    samples: int = ELBO_SAMPLES,
    seed: int = ELBO_SEED,
) -> dict[str, float]:
    """`evaluate_loss` for a diffusion model: the ELBO of (x, y[, mask]) batches as an upper bound on
    the NLL of the targets y (the tokens the autoregressive evaluation scores), so loss/perplexity/bpb
    compare with an autoregressive model's on the same data. Positions outside `mask` are unmasked
    context. Bits per byte counts text positions only, as `evaluate_loss` does."""
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("nll", "count", "text_nll", "bytes")}
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        y = batch[1].to(device, non_blocking=True)
        counted = batch[2].to(device) if len(batch) > 2 else torch.ones_like(y, dtype=torch.bool)
        counted = counted & (y >= 0)
        clean = y.clamp_min(0)
        with autocast_ctx(device, dtype):
            terms = _elbo_terms(model, clean, counted, samples, gen, mask_id)
        nbytes = token_bytes[clean].double() * counted
        sums["nll"] += terms.sum()
        sums["count"] += counted.sum()
        sums["text_nll"] += (terms * (nbytes > 0)).sum()
        sums["bytes"] += nbytes.sum()
    model.train(was_training)
    return _elbo_metrics({k: v.item() for k, v in sums.items()}, samples)


def _elbo_metrics(s: dict[str, float], samples: int) -> dict[str, float]:
    n, nb = s["count"], s["bytes"]
    loss = s["nll"] / n if n else float("nan")
    bpb = s["text_nll"] / (math.log(2) * nb) if nb else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if n else float("nan"), "bpb": bpb,
            "tokens": int(n), "bytes": int(nb), "elbo": loss, "elbo_bpb": bpb, "elbo_samples": samples}


def elbo_evaluator(tokenizer: Any, **kw: Any) -> Callable[..., dict[str, float]]:
    """`evaluate_elbo` with the tokenizer's mask id bound: a drop-in for `evaluate_loss`."""
    return functools.partial(evaluate_elbo, mask_id=mask_id_of(tokenizer), **kw)


# ---- sampling ---------------------------------------------------------------------------------------
def commit_counts(n: int, steps: int) -> list[int]:
    """How many of n masked tokens each of `steps` steps commits: the linear schedule unmasks an equal
    expected share per step. More steps than tokens would commit nothing: they are dropped."""
    steps = max(1, min(steps, n))
    base, extra = divmod(n, steps)
    return [base + 1] * extra + [base] * (steps - extra)


def _blocks(prompt_len: int, n_new: int, seq_len: int, steps: int) -> list[tuple[int, int]]:
    """(block length, steps) pairs: one block when prompt and output fit in the context, else blocks of
    at most half the context, the steps shared between them in proportion to their length."""
    if prompt_len + n_new <= seq_len:
        return [(n_new, steps)]
    size = max(1, min(n_new, seq_len // 2))
    sizes = [size] * (n_new // size) + ([n_new % size] if n_new % size else [])
    return [(s, max(1, round(steps * s / n_new))) for s in sizes]


def _choose(logits: torch.Tensor, k: int, *, temperature: float, top_k: int, top_p: float,
            remasking: Remasking, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """From logits (m, V) at m masked positions: (which k of them to commit, their tokens (k,))."""
    if temperature <= 0:
        probs = logits.softmax(-1)
        tokens = probs.argmax(-1)
    else:
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    if remasking == "low_confidence":  # keep the surest predictions; the rest are masked again
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
        pick = confidence.topk(k).indices
    elif remasking == "random":
        pick = torch.randperm(logits.shape[0], generator=gen, device=gen.device)[:k].to(logits.device)
    else:
        raise ConfigError(f"remasking {remasking!r}: choose low_confidence or random")
    return pick, tokens[pick]


@torch.no_grad()
def denoise(model: nn.Module, prompt_ids: Sequence[int], n_new: int, *, mask_id: int, steps: int,
            temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
            remasking: Remasking = "low_confidence", gen: torch.Generator) -> Iterator[list[int]]:
    """Iterative unmasking of n_new tokens after `prompt_ids`: yields the new tokens (mask_id where still
    masked) after every step; the last yield has no masks left."""
    model.eval()
    device = next(model.parameters()).device
    done: list[int] = []
    for size, block_steps in _blocks(len(prompt_ids), n_new, model.cfg.seq_len, steps):
        context = (list(prompt_ids) + done)[-(model.cfg.seq_len - size):]
        canvas = torch.tensor(context + [mask_id] * size, device=device)
        new = canvas[len(context):]  # a view: commits below land in the canvas
        for k in commit_counts(size, block_steps):
            where = (new == mask_id).nonzero().squeeze(-1)
            logits = _forbid_mask(denoiser_logits(model, canvas[None])[0, len(context):][where], mask_id)
            pick, tokens = _choose(logits, k, temperature=temperature, top_k=top_k, top_p=top_p,
                                   remasking=remasking, gen=gen)
            new[where[pick]] = tokens
            yield done + new.tolist()
        done += new.tolist()


def _render(tokenizer: Any, ids: list[int], mask_id: int, stop: Sequence[str],
            stop_ids: Iterable[int] | None = None) -> str:
    """Canvas ids → text: cut at the first stop token (default `<|eos|>`) and stop string, masks shown
    as a glyph."""
    if stop_ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        stop_ids = () if eos is None else (eos,)
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    if end is not None:
        ids = ids[:end]
    parts, run = [], []
    for i in [*ids, None]:
        if i is None or i == mask_id:
            parts.append(tokenizer.decode(run) if run else "")
            run = []
            if i is not None:
                parts.append(MASK_GLYPH)
        else:
            run.append(i)
    text = "".join(parts)
    cut = min((j for j in (text.find(s) for s in stop if s) if j >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


def _start(model: nn.Module, tokenizer: Any, prompt: str | list[int], max_new_tokens: int, steps: int,
           remasking: str, seed: int | None, add_bos: bool) -> tuple[list[int], int, torch.Generator]:
    """Checked arguments → (prompt ids, mask id, the sampling generator)."""
    from lmforge.generate import encode_prompt

    if max_new_tokens < 1 or steps < 1:
        raise ConfigError("max_new_tokens and steps must be at least 1")
    if remasking not in ("low_confidence", "random"):
        raise ConfigError(f"remasking {remasking!r}: choose low_confidence or random")
    mask_id = mask_id_of(tokenizer)
    ids = prompt if isinstance(prompt, list) else encode_prompt(tokenizer, prompt, add_bos)
    gen = torch.Generator(device=next(model.parameters()).device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return ids, mask_id, gen


class SettledText:
    """A completion's text as its canvas settles, read left to right. Committed tokens are never masked
    again, so the tokens before the first mask are final and their text can be shown before the canvas
    is full. Text ends at the first stop token (default `<|eos|>`, not counted) or stop string, with
    whole UTF-8 characters only: the autoregressive engine's rules (`TextStream`), so streamed deltas
    concatenate to `text`."""

    def __init__(self, tokenizer: Any, mask_id: int, total: int, stop: Sequence[str] = (),
                 stop_ids: Iterable[int] | None = None) -> None:
        eos = getattr(tokenizer, "eos_id", None)
        default = () if eos is None else (eos,)
        self.stop_ids = frozenset(default if stop_ids is None else stop_ids)
        self.mask_id, self.total = mask_id, total
        self._stream = TextStream(tokenizer, stop)
        self.tokens: list[int] = []
        """The completion's tokens: those the text is made of (a stop token is not one)."""
        self.finish_reason: str | None = None
        """None while the text may still grow; "stop" (stop token or string) or "length" once final."""
        self._read = 0

    @property
    def text(self) -> str:
        return self._stream.text

    def update(self, canvas: Sequence[int]) -> str:
        """Read a canvas (the new tokens, mask_id where still masked); return the newly settled text."""
        out = []
        while self.finish_reason is None and self._read < len(canvas) and canvas[self._read] != self.mask_id:
            tok = canvas[self._read]
            self._read += 1
            if tok in self.stop_ids:
                self.finish_reason = "stop"
                out.append(self._stream.finish())
                break
            self.tokens.append(tok)
            out.append(self._stream.push(tok))
            if self._stream.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and self._read >= self.total:
            self.finish_reason = "length"
            out.append(self._stream.finish())
        return "".join(out)


def diffusion_progress(model: nn.Module, tokenizer: Any, prompt: str | list[int], *, max_new_tokens: int = 100,
                       steps: int = 32, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                       remasking: Remasking = "low_confidence", seed: int | None = None, stop: Sequence[str] = (),
                       stop_ids: Iterable[int] | None = None,
                       add_bos: bool = True) -> Iterator[tuple[str, SettledText]]:
    """After each denoising step: (the canvas as text, masks shown as MASK_GLYPH; the settled text so far).
    Once `settled.finish_reason` is set its text is final (the canvas shown is then that text too), and
    a caller may stop early: later steps only fill positions past the end of the text."""
    ids, mask_id, gen = _start(model, tokenizer, prompt, max_new_tokens, steps, remasking, seed, add_bos)
    settled = SettledText(tokenizer, mask_id, max_new_tokens, stop, stop_ids)
    for canvas in denoise(model, ids, max_new_tokens, mask_id=mask_id, steps=steps, temperature=temperature,
                          top_k=top_k, top_p=top_p, remasking=remasking, gen=gen):
        settled.update(canvas)
        shown = settled.text if settled.finish_reason else _render(tokenizer, canvas, mask_id, stop, settled.stop_ids)
        yield shown, settled


def diffusion_stream(model: nn.Module, tokenizer: Any, prompt: str | list[int], **kw: Any) -> Iterator[str]:
    """Yield the completion canvas (without the prompt) as text after each denoising step: masked
    tokens show as MASK_GLYPH, text ends at the first `<|eos|>` or stop string. The last yield is the
    finished completion, the text `diffusion_generate` returns with the same arguments (those of
    `diffusion_progress`)."""
    for shown, _ in diffusion_progress(model, tokenizer, prompt, **kw):
        yield shown


def diffusion_generate(model: nn.Module, tokenizer: Any, prompt: str | list[int], *, max_new_tokens: int = 100,
                       steps: int = 32, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                       remasking: Remasking = "low_confidence", seed: int | None = None,
                       stop: Sequence[str] = (), add_bos: bool = True) -> str:
    """The completion of `prompt` (without the prompt) after `steps` denoising steps: more steps, better
    text, slower (each step is one forward pass over prompt + canvas; at most one step per token)."""
    settled = None
    for _, settled in diffusion_progress(model, tokenizer, prompt, max_new_tokens=max_new_tokens,  # noqa: B007
                                         steps=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                                         remasking=remasking, seed=seed, stop=stop, add_bos=add_bos):
        pass  # every step runs, as many as asked: the settled text after the last one is the answer
    return settled.text if settled is not None else ""
