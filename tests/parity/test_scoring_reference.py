"""The scoring core against an independent reference: per-choice log-likelihoods from lmforge (packed,
batched, truncated) equal those computed with `transformers` directly on the exported model (1e-4, fp32)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.evaluate import load_eval_model
from lmforge.export import export_checkpoint
from lmforge.models.transformer import Transformer
from lmforge.tasks import TaskOptions, hellaswag
from lmforge.tasks.scoring import Group

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "samples" / "hellaswag_val_sample.jsonl"
CONFIGS = {
    "llama-gqa-untied": dict(arch="llama", n_kv_head=2, tie_embeddings=False),
    "gpt2-tied-bias": dict(arch="gpt2", tie_embeddings=True, bias=True),
}


def make_checkpoint(root: Path, tok_dir: Path, **kw) -> Path:
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, seq_len=96, vocab_size=512, **kw)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or swapped tensor shows
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (name.endswith("weight")) if p.dim() == 1
                    else torch.randn_like(p) * 0.08)
    return save_checkpoint(root, 1, model, {"model_config": cfg.model_dump(mode="json")}, tokenizer_dir=tok_dir)


def reference(hf, ctx: list[int], cont: list[int], seq_len: int) -> float:
    """transformers alone: one sequence, the last seq_len + 1 tokens, summed log-softmax of the targets."""
    seq = (ctx + cont)[-(seq_len + 1):]
    k = min(len(cont), seq_len)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([seq[:-1]])).logits[0].float(), dim=-1)
    return logp[-k:].gather(-1, torch.tensor(seq[-k:])[:, None]).sum().item()


def requests(em) -> list[Group]:
    rng = random.Random(0)
    groups = [Group([em.tokenizer.bos_id] + [rng.randrange(500) for _ in range(rng.randint(1, 20))],
                    [[rng.randrange(500) for _ in range(rng.randint(1, 9))] for _ in range(4)]) for _ in range(6)]
    if SAMPLE.is_file():  # real text: long WikiHow contexts overflow the 96-token window and get cut
        items = hellaswag.load(TaskOptions(str(SAMPLE))).items[:6]
        groups += hellaswag.groups_for(em, items)
    return groups


@pytest.mark.parametrize("name", list(CONFIGS))
def test_choice_loglikelihoods_match_transformers(name, tmp_path, tiny_tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer_dir, **CONFIGS[name])
    out = export_checkpoint(ckpt, tmp_path / "hf", "hf", log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_eval_model(ckpt)
    groups = requests(ours)
    ref = [[reference(hf, g.context, c, 96) for c in g.continuations] for g in groups]
    assert any(len(g.context) + len(c) > 97 for g in groups for c in g.continuations) or not SAMPLE.is_file()
    for em in (ours, load_eval_model(out)):  # our checkpoint, and the HF dir read back by lmforge
        for batch_size in (1, 8):
            em.batch_size = batch_size
            got = em.score(groups)
            diff = max(abs(r - s.logprob) for rr, ss in zip(ref, got, strict=True)
                       for r, s in zip(rr, ss, strict=True))
            print(f"{name} {em.fmt} batch {batch_size}: max |Δ loglik| = {diff:.2e}")
            assert diff < TOL
    assert load_eval_model(out).fmt == "hf"
