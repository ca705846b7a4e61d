"""The masked-diffusion objective: masking, loss, ELBO, sampler, and its place in the training loop."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
import tomllib
import torch
from torch import nn

from lmforge.config import ModelConfig, Recipe, TokenizerConfig, load_recipe
from lmforge.diffusion import (
    MASK_GLYPH,
    MASK_TOKEN,
    commit_counts,
    denoise,
    denoiser_logits,
    diffusion_generate,
    diffusion_loss,
    diffusion_stream,
    evaluate_elbo,
    is_diffusion,
    mask_id_of,
    mask_tokens,
    masked_cross_entropy,
    sample_t,
)
from lmforge.errors import ConfigError
from lmforge.evaluate import evaluate_loss
from lmforge.models.transformer import Transformer
from lmforge.objectives import autoregressive_loss, evaluator_for, loss_for
from lmforge.tokenizer import train_tokenizer

CPU = torch.device("cpu")
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", MASK_TOKEN]


def quiet(*_a):
    pass


@pytest.fixture(scope="module")
def byte_tok():
    return train_tokenizer(TokenizerConfig(kind="byte", special_tokens=SPECIALS), [])


def tiny_model(vocab: int, seq_len: int = 32, seed: int = 0, n_embd: int = 32, n_layer: int = 2) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=4, seq_len=seq_len,
                      objective="diffusion")
    return Transformer(cfg)


class Recorder(nn.Module):
    """Wraps a model, keeping each call's input and keyword arguments."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.cfg, self.calls = inner, inner.cfg, []

    def forward(self, idx, **kw):
        self.calls.append((idx.clone(), kw))
        return self.inner(idx, **kw)


class Unigram(nn.Module):
    """Context-free logits: the same distribution at every position, whatever the input."""

    def __init__(self, logits: torch.Tensor, seq_len: int = 64) -> None:
        super().__init__()
        self.cfg = ModelConfig(vocab_size=logits.numel(), n_embd=8, n_head=1, seq_len=seq_len)
        self.logits = nn.Parameter(logits.clone())

    def forward(self, idx, **kw):
        return self.logits.expand(*idx.shape, -1)


# ---- forward process and loss -----------------------------------------------------------------------
def test_sample_t_covers_eps_to_one():
    torch.manual_seed(0)
    t = torch.cat([sample_t(16, eps=0.01) for _ in range(2000)])
    assert t.min() > 0.01 and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.505, abs=0.01)
    assert torch.histc(t, bins=10, min=0.01, max=1.0).div(t.numel()).sub(0.1).abs().max() < 0.01


@pytest.mark.parametrize("level", [0.05, 0.3, 0.7, 1.0])
def test_masking_rate_matches_t_in_expectation(level):
    torch.manual_seed(1)
    x = torch.randint(0, 50, (64, 512))
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[:, :8] = True
    z, masked = mask_tokens(x, torch.full((64,), level), 99, keep=keep)
    rate = masked[:, 8:].float().mean().item()
    assert rate == pytest.approx(level, abs=0.01)
    assert not masked[:, :8].any()
    assert torch.equal(z == 99, masked) and torch.equal(z[~masked], x[~masked])


def test_loss_ignores_unmasked_positions():
    torch.manual_seed(2)
    logits = torch.randn(3, 10, 20, requires_grad=True)
    targets = torch.randint(0, 19, (3, 10))
    masked = torch.rand(3, 10) < 0.5
    weight = torch.rand(3, 10) + 0.5
    loss = masked_cross_entropy(logits, targets, masked, weight, mask_id=19)
    loss.backward()
    assert logits.grad[~masked].abs().max() == 0 and logits.grad[masked].abs().max() > 0
    assert logits.grad[..., 19].abs().max() == 0  # the mask token is never a prediction
    other = logits.detach().clone()
    other[~masked] = torch.randn_like(other[~masked]) * 10
    other_targets = torch.where(masked, targets, (targets + 1) % 19)
    assert masked_cross_entropy(other, other_targets, masked, weight, 19).item() == pytest.approx(loss.item())


def test_loss_is_the_elbo_in_nats_per_token():
    """A uniform model over the V-1 real tokens costs log(V-1) per masked token; the 1/t weighting and
    the division by the length make the expected loss exactly log(V-1) per token, as an AR loss."""
    vocab = 33
    model = Unigram(torch.zeros(vocab))
    torch.manual_seed(3)
    y = torch.randint(0, vocab - 1, (8, 64))
    losses = [diffusion_loss(model, y, y, mask_id=vocab - 1).item() for _ in range(400)]
    assert sum(losses) / len(losses) == pytest.approx(math.log(vocab - 1), rel=0.02)


def test_loss_uses_bidirectional_attention_and_only_y():
    vocab = 20
    rec = Recorder(tiny_model(vocab))
    x, y = torch.randint(0, 19, (2, 16)), torch.randint(0, 19, (2, 16))
    loss = diffusion_loss(rec, x, y, mask_id=19)
    assert loss.requires_grad and math.isfinite(loss.item())
    (z, kw), = rec.calls
    assert kw == {"causal": False}
    assert torch.equal(z[z != 19], y[z != 19])


def test_attention_is_bidirectional():
    """A later token changes an earlier position's output in the denoiser, never in the causal model."""
    model = tiny_model(50).eval()
    a = torch.randint(0, 49, (1, 12))
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % 49
    with torch.no_grad():
        assert not torch.allclose(denoiser_logits(model, a)[0, 0], denoiser_logits(model, b)[0, 0])
        assert torch.allclose(model(a)[0, 0], model(b)[0, 0])


@pytest.mark.parametrize("probs", [[1.0], [0.6, 0.3, 0.1]], ids=["one-token", "three-tokens"])
def test_t1_learns_the_optimal_prediction(probs):
    """At t = 1 every token is masked, so the best prediction at each position is the data's marginal:
    one token with certainty (loss -> 0), or the unigram distribution (loss -> its entropy)."""
    vocab = len(probs) + 2  # the data's tokens, one never seen, and the mask
    mask_id = vocab - 1
    model = tiny_model(vocab, seq_len=8, n_embd=16, n_layer=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    p = torch.tensor(probs)
    gen = torch.Generator().manual_seed(4)
    for _ in range(250):
        y = torch.multinomial(p, 64 * 8, replacement=True, generator=gen).view(64, 8)
        loss = diffusion_loss(model, y, y, mask_id=mask_id, eps=1.0)  # eps = 1: t is always 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = denoiser_logits(model, torch.full((1, 8), mask_id))[0, :, :mask_id].softmax(-1)
    entropy = -(p * p.log()).sum().item()
    assert pred[:, :len(probs)] == pytest.approx(p.expand(8, -1), abs=0.04)
    assert loss.item() == pytest.approx(entropy, abs=0.06)


# ---- ELBO evaluation --------------------------------------------------------------------------------
def test_elbo_is_exact_for_a_context_free_model():
    """Masking changes nothing for a unigram model, so its ELBO is its NLL: the bound is tight."""
    torch.manual_seed(5)
    vocab = 30
    logits = torch.randn(vocab)
    logits[-1] = -1e4  # the mask token: no probability, as the diffusion parameterisation has it
    model = Unigram(logits)
    ys = [torch.multinomial(logits.softmax(-1), 8 * 64, replacement=True).view(8, 64) for _ in range(3)]
    batches = [(y, y) for y in ys]
    tb = torch.ones(vocab, dtype=torch.int64)
    tb[:3] = 0  # some special tokens: out of bits per byte on both sides
    ar = evaluate_loss(model, batches, tb, device=CPU)
    elbo = evaluate_elbo(model, batches, tb, mask_id=vocab - 1, device=CPU, samples=64)
    assert elbo["tokens"] == ar["tokens"] and elbo["bytes"] == ar["bytes"]
    assert elbo["loss"] == pytest.approx(ar["loss"], rel=0.02)
    assert elbo["bpb"] == pytest.approx(ar["bpb"], rel=0.02)
    assert elbo["elbo"] == elbo["loss"] and elbo["perplexity"] == pytest.approx(math.exp(elbo["loss"]))


def test_elbo_is_reproducible_and_scores_only_counted_targets():
    model = Recorder(tiny_model(40, seq_len=16))
    torch.manual_seed(6)
    y = torch.randint(0, 39, (4, 16))
    counted = torch.zeros(4, 16, dtype=torch.bool)
    counted[:, 10:] = True
    counted[3] = False  # a row with nothing to score
    tb = torch.ones(40, dtype=torch.int64)
    first = evaluate_elbo(model, [(y, y, counted)], tb, mask_id=39, device=CPU, samples=3, seed=7)
    assert first == evaluate_elbo(model, [(y, y, counted)], tb, mask_id=39, device=CPU, samples=3, seed=7)
    assert first["tokens"] == 3 * 6 and first["elbo_samples"] == 3 and math.isfinite(first["loss"])
    for z, kw in model.calls:
        assert kw == {"causal": False}
        assert torch.equal(z[:, :10], y[:, :10]) and torch.equal(z[3], y[3])  # context: never masked
        assert ((z[:3, 10:] == 39).sum(1) >= 1).all()  # l >= 1 masked in every scored row
    again = evaluate_elbo(model, [(y, y, counted)], tb, mask_id=39, device=CPU, samples=3, seed=8)
    assert again["loss"] != first["loss"]


def test_dispatchers(byte_tok):
    ar, diff = ModelConfig(), ModelConfig(objective="diffusion")
    assert loss_for(ar, byte_tok) is autoregressive_loss and evaluator_for(ar, byte_tok) is evaluate_loss
    assert loss_for(diff, byte_tok).keywords["mask_id"] == byte_tok.special_tokens[MASK_TOKEN]
    assert evaluator_for(diff, byte_tok).keywords["mask_id"] == mask_id_of(byte_tok)
    plain = train_tokenizer(TokenizerConfig(kind="byte"), [])
    with pytest.raises(ConfigError, match=r"<\|mask\|>.*tokenizer.special_tokens"):
        loss_for(diff, plain)
    assert is_diffusion(diff) and not is_diffusion(ar) and is_diffusion(tiny_model(300))


# ---- sampling ---------------------------------------------------------------------------------------
def test_commit_counts_follow_an_even_schedule():
    assert commit_counts(10, 4) == [3, 3, 2, 2]
    assert commit_counts(5, 128) == [1] * 5
    assert sum(commit_counts(97, 8)) == 97 and max(commit_counts(97, 8)) - min(commit_counts(97, 8)) <= 1


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_generate_runs_k_steps_and_is_reproducible(byte_tok, remasking):
    rec = Recorder(tiny_model(byte_tok.vocab_size, seq_len=64))
    kw = dict(max_new_tokens=20, steps=5, temperature=1.0, top_k=20, top_p=0.9, remasking=remasking, seed=3)
    text = diffusion_generate(rec, byte_tok, "To be", **kw)
    assert len(rec.calls) == 5 and all(c[1] == {"causal": False} for c in rec.calls)
    prompt_ids = [byte_tok.bos_id, *byte_tok.encode("To be")]
    assert all(c[0][0, :6].tolist() == prompt_ids for c in rec.calls)  # the prompt is never touched
    assert text == diffusion_generate(rec, byte_tok, "To be", **kw)
    assert MASK_GLYPH not in text and MASK_TOKEN not in text


def test_stream_shows_the_canvas_filling_in(byte_tok):
    model = tiny_model(byte_tok.vocab_size, seq_len=64)
    kw = dict(max_new_tokens=12, steps=4, temperature=0.0, seed=0)
    canvases = list(diffusion_stream(model, byte_tok, "ab", **kw))
    assert len(canvases) == 4
    shown = [c.count(MASK_GLYPH) for c in canvases]
    assert shown[0] <= 9 and shown == sorted(shown, reverse=True) and shown[-1] == 0
    assert canvases[-1] == diffusion_generate(model, byte_tok, "ab", **kw) and MASK_GLYPH not in canvases[-1]


def test_low_confidence_commits_the_surest_first():
    """A model whose confidence grows with the position: one commit per step goes right to left."""
    vocab, mask_id = 8, 7

    class Peaked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cfg = ModelConfig(vocab_size=vocab, n_embd=8, n_head=1, seq_len=16)
            self.anchor = nn.Parameter(torch.zeros(1))

        def forward(self, idx, **kw):
            T = idx.shape[1]
            logits = torch.zeros(1, T, vocab)
            logits[0, :, 3] = torch.arange(T, dtype=torch.float32)  # later positions: surer of token 3
            return logits

    steps = list(denoise(Peaked(), [1, 2], 4, mask_id=mask_id, steps=4, temperature=0.0,
                         gen=torch.Generator()))
    assert steps == [[7, 7, 7, 3], [7, 7, 3, 3], [7, 3, 3, 3], [3, 3, 3, 3]]


def test_long_outputs_are_made_block_by_block(byte_tok):
    """More new tokens than the context holds: blocks, each conditioned on the text before it."""
    rec = Recorder(tiny_model(byte_tok.vocab_size, seq_len=16))
    prompt = byte_tok.encode("a long prompt, longer than the context")
    out = list(denoise(rec, prompt, 40, mask_id=mask_id_of(byte_tok), steps=10, temperature=0.8,
                       gen=torch.Generator().manual_seed(0)))
    assert len(out[-1]) == 40 and mask_id_of(byte_tok) not in out[-1]
    assert all(c[0].shape[1] <= 16 for c in rec.calls) and 10 <= len(rec.calls) <= 12


def test_sampler_needs_a_mask_token():
    plain = train_tokenizer(TokenizerConfig(kind="byte"), [])
    with pytest.raises(ConfigError, match="<|mask|>"):
        diffusion_generate(tiny_model(plain.vocab_size), plain, "x", max_new_tokens=2, steps=1)


# ---- recipe, training loop, checkpoints, export -----------------------------------------------------
def test_recipe_is_the_demo_with_the_diffusion_objective():
    root = Path(__file__).resolve().parents[2]
    raw = tomllib.loads((root / "recipes" / "diffusion-demo.toml").read_text())
    recipe, demo = load_recipe(root / "recipes" / "diffusion-demo.toml"), Recipe()
    assert recipe.model.objective == "diffusion" and MASK_TOKEN in recipe.tokenizer.special_tokens
    assert recipe.model.model_copy(update={"objective": "autoregressive"}) == demo.model
    assert recipe.train.model_copy(update={"run_dir": demo.train.run_dir}) == demo.train
    assert all(str(v).startswith("runs/diffusion-demo") for v in
               (recipe.data.shards_dir, recipe.tokenizer.dir, recipe.train.run_dir, recipe.prepare.out_dir))
    assert set(raw) == {"name", "data", "tokenizer", "prepare", "model", "train"}
    with pytest.raises(ConfigError, match="needs"):
        load_recipe(root / "recipes" / "diffusion-demo.toml", ['tokenizer.special_tokens=["<|bos|>"]'])


@pytest.fixture(scope="module")
def diffusion_data(tiny_root, tmp_path_factory) -> dict:
    """The tiny corpus with a tokenizer that has <|mask|>, and its shards (built once)."""
    from lmforge.shards import ensure_shards
    from lmforge.tokenizer import ensure_tokenizer

    out = tmp_path_factory.mktemp("diffusion")
    raw = {"name": "tiny-diffusion",
           "data": {"source": str(tiny_root / "corpus.txt"), "shards_dir": str(out / "shards"),
                    "shard_tokens": 16384, "workers": 1},
           "tokenizer": {"dir": str(out / "tokenizer"), "vocab_size": 512, "special_tokens": SPECIALS},
           "model": {"preset": "tiny", "objective": "diffusion"},
           "train": {"max_steps": 40, "log_every": 1, "eval_every": 20, "save_every": 40, "micro_batch_size": 8,
                     "warmup_steps": 2, "sample_at_eval": False, "dtype": "fp32", "lr": 3e-3},
           "eval": {"batches": 2}, "sample": {"max_new_tokens": 24, "prompts": ["ROMEO:"]}}
    recipe = Recipe.model_validate(raw)
    ensure_shards(recipe, ensure_tokenizer(recipe, log=quiet), log=quiet)
    return raw


def test_training_loop_trains_validates_and_samples(diffusion_data, tmp_path):
    from lmforge.export import export_checkpoint
    from lmforge.generate import load_for_inference
    from lmforge.models.hf import InteropError
    from lmforge.pipeline import final_eval, write_samples
    from lmforge.train import run_loop, setup

    recipe = Recipe.model_validate({**diffusion_data, "train": {**diffusion_data["train"],
                                                               "run_dir": str(tmp_path / "run")}})
    tr = setup(recipe, log=quiet)
    try:
        summary = run_loop(tr)
        final = final_eval(tr)
        samples = write_samples(tr, tr.raw)
    finally:
        tr.close()
    rows = [orjson.loads(line) for line in (tr.run_dir / "metrics.jsonl").read_bytes().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    # an untrained model scores log(511) nats per token (511 real tokens); the 1/t weighting makes single
    # steps noisy, so the training loss is averaged, while validation (fixed windows and masks) is steady
    assert sum(losses[-10:]) / 10 < math.log(511) - 0.5, losses
    vals = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] < math.log(511) - 0.5
    assert summary["val"]["elbo_samples"] > 0 and final["elbo"] == final["loss"] and final["tokens"] > 1000
    assert samples[0][0] == "ROMEO:" and MASK_GLYPH not in samples[0][1]
    model, tok, state = load_for_inference(tr.run_dir)
    assert state["model_config"]["objective"] == "diffusion" and is_diffusion(model)
    assert isinstance(diffusion_generate(model, tok, "ROMEO:", max_new_tokens=8, steps=2, seed=0), str)
    for fmt in ("hf", "gguf"):
        with pytest.raises(InteropError, match=rf"objective='diffusion': {fmt} has no such architecture"):
            export_checkpoint(tr.run_dir, tmp_path / fmt, fmt, log=quiet)
        assert not (tmp_path / fmt).exists()
    export_checkpoint(tr.run_dir, tmp_path / "native", "safetensors", log=quiet)
    back, _, _ = load_for_inference(tmp_path / "native")
    assert is_diffusion(back)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
