"""Tasks: the scoring core against plain forward passes, parsing of real LAMBADA/HellaSwag samples,
label wiring (a cheating model scores 100%, a barely trained one scores at chance), bad input."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import DataError
from lmforge.models.transformer import Transformer
from lmforge.tasks import (
    TaskOptions,
    check_records,
    completion,
    hellaswag,
    lambada,
    pick,
    scoring,
    task_module,
    tasks_help,
)
from lmforge.tasks.scoring import ChoiceScore, EvalModel, Group, encode_pair, is_truncated, score_groups
from lmforge.tokenizer import Tokenizer

SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "samples"
LAMBADA = SAMPLES / "lambada_sample.jsonl"
HELLASWAG = SAMPLES / "hellaswag_val_sample.jsonl"
WIKITEXT = SAMPLES / "wikitext2_test_sample.txt"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/data/samples is not here")


def tiny_model(arch: str = "llama", seq_len: int = 64, vocab: int = 300, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=64, seq_len=seq_len,
                                   vocab_size=vocab)).eval()


def naive(model, ctx: list[int], cont: list[int]) -> float:
    """One plain forward per continuation, the context cut on the left: the reference semantics."""
    seq_len = model.cfg.seq_len
    k = min(len(cont), seq_len)
    seq = (ctx + cont)[-(seq_len + 1):]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].float(), -1)
    return lp[-k:].gather(-1, torch.tensor(seq[-k:])[:, None]).sum().item()


def random_groups(n: int, vocab: int = 300, seed: int = 0) -> list[Group]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        k = rng.choice([1, 2, 4])
        out.append(Group(ctx, [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(k)]))
    out.append(Group([1] * 60, [[2, 3, 4, 5, 6, 7, 8, 9]] * 3))  # branches that do not fit: rows
    out.append(Group([5] * 50, [[2, 3, 4, 5, 6, 7, 8, 9]] * 3))  # a tree of 71 tokens, each branch fits
    out.append(Group([1] * 10, [list(range(3, 80))]))  # a continuation longer than the window
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_scores_equal_plain_forward_passes(arch, monkeypatch):
    if arch == "gpt2":  # the output layer in chunks of 128 positions: the same scores
        monkeypatch.setattr(scoring, "LOGITS_PER_CHUNK", 1)
    model = tiny_model(arch)
    groups = random_groups(14)
    ref = [[naive(model, g.context, c) for c in g.continuations] for g in groups]
    for kw in (dict(batch_size=1, share_context=False), dict(batch_size=1), dict(batch_size=8),
               dict(batch_size=8, max_tokens=100)):
        got = score_groups(model, groups, **kw)
        assert [len(r) for r in got] == [len(g.continuations) for g in groups]
        diff = max(abs(a - s.logprob) for r, row in zip(ref, got, strict=True) for a, s in zip(r, row, strict=True))
        assert diff < 1e-4, (kw, diff)
    assert got[-1][0].n_tokens == 64  # the long continuation keeps its last seq_len tokens
    units = scoring._units(groups[-3:-1], 64, share_context=True)
    assert [u.tree for u in units] == [False, False, False, True]  # rows where a branch would be cut


def test_greedy_flag_and_truncation_count():
    model = tiny_model()
    ctx = [5, 6, 7]
    with torch.no_grad():
        first = model(torch.tensor([ctx]))[0, -1].argmax().item()
    [[hit, miss]] = score_groups(model, [Group(ctx, [[first], [(first + 1) % 300]])])
    assert hit.greedy and not miss.greedy and hit.logprob > miss.logprob
    assert not is_truncated(Group([1] * 60, [[1] * 5]), 64)
    assert is_truncated(Group([1] * 60, [[1] * 6]), 64)
    with pytest.raises(ValueError):
        score_groups(model, [Group([], [[1]])])


def test_encode_pair_splits_the_joint_encoding(tiny_tokenizer_dir):
    tok = Tokenizer.load(tiny_tokenizer_dir)
    ctx, cont = encode_pair(tok, "ROMEO: good", " morrow", [tok.bos_id])
    assert ctx[0] == tok.bos_id and tok.decode(ctx[1:]) == "ROMEO: good" and tok.decode(cont) == " morrow"
    assert ctx[1:] + cont == tok.encode("ROMEO: good morrow")


def test_pick_is_a_fixed_subset():
    assert pick(10, None, 1) == list(range(10)) and pick(5, 50, 1) == list(range(5))
    a = pick(1000, 20, 7)
    assert a == pick(1000, 20, 7) and a == sorted(a) and len(set(a)) == 20 and a != pick(1000, 20, 8)


def test_help_lists_every_task_and_where_to_get_it():
    text = tasks_help()
    for name in ("loss", "topk", "lambada", "hellaswag", "completion"):
        assert f"{name}:" in text
    assert "lambada_test.jsonl" in text and "hellaswag_val.jsonl" in text and "wikitext" in text.lower()
    assert all(hasattr(task_module(n), attr) for n in ("loss", "lambada") for attr in ("METRICS", "PRIMARY"))


# ---- parsing, bad input -----------------------------------------------------------------------------
@needs_samples
def test_lambada_and_hellaswag_samples_parse():
    lam = lambada.load(TaskOptions(str(LAMBADA)))
    assert len(lam.items) == 200 and lam.skipped == 0
    first = orjson.loads(LAMBADA.read_bytes().splitlines()[0])["text"]
    assert lam.items[0].context + lam.items[0].target == first.rstrip()
    assert lam.items[0].target.strip() == first.split()[-1]
    hs = hellaswag.load(TaskOptions(str(HELLASWAG)))
    assert len(hs.items) == 200 and hs.skipped == 0
    assert all(len(it.endings) == 4 and 0 <= it.label < 4 for it in hs.items)
    assert hs.items[0].context.startswith("Pole vault: Pole vault is a sport") and "[" not in hs.items[3].context


def test_malformed_records_are_counted_or_fatal_in_strict(tmp_path):
    good = {"text": "one two three"}
    path = tmp_path / "l.jsonl"
    path.write_bytes(b"\n".join([orjson.dumps(good), b"{not json", orjson.dumps({"text": "single"}),
                                 orjson.dumps({"txt": 1}), b"[1, 2]", orjson.dumps(good)]))
    data = lambada.load(TaskOptions(str(path)))
    assert len(data.items) == 2 and data.skipped == 4
    with pytest.raises(DataError, match=r"l\.jsonl:2: malformed"):
        lambada.load(TaskOptions(str(path), strict=True))
    with pytest.raises(DataError, match="no usable records"):
        check_records("x", [{"text": 1}], lambada.parse, False)


def test_missing_file_says_which_and_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl is not a file.*lambada_test\.jsonl"):
        lambada.load(TaskOptions(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"--task-data hellaswag=PATH.*github.com/rowanz/hellaswag"):
        hellaswag.load(TaskOptions(None))


def test_hellaswag_record_checks():
    rec = {"ctx_a": "A man", "ctx_b": "then", "activity_label": "Run", "endings": ["a", "b", "c", "d"], "label": "2"}
    item = hellaswag.parse(rec)
    assert item.context == "Run: A man Then" and item.label == 2
    for bad in ({**rec, "label": 4}, {**rec, "endings": ["a"]}, {**rec, "endings": "abcd"}, {**rec, "label": ""}):
        with pytest.raises((ValueError, TypeError)):
            hellaswag.parse(bad)
    assert hellaswag.preprocess(" [header] How to x [title] Do y. [step] Z") == "How to x. Do y. Z"


# ---- label wiring -------------------------------------------------------------------------------------
class CheatModel(EvalModel):
    """Knows the answers from the raw files: probability 1 for the right continuation, ~0 for others."""

    right: dict[str, str]

    def score(self, groups, progress=None):
        out = []
        for g in groups:
            ctx = self.tokenizer.decode(g.context[1:])
            conts = [self.tokenizer.decode(c).strip() for c in g.continuations]
            out.append([ChoiceScore(0.0 if c == self.right.get(ctx) else -100.0, 1, c == self.right.get(ctx))
                        for c in conts])
        if progress:
            progress(len(groups))
        return out


def cheat(tok_dir: Path, right: dict[str, str]) -> CheatModel:
    em = CheatModel(tiny_model(vocab=512), Tokenizer.load(tok_dir), "cheat")
    em.right = right
    return em


@needs_samples
def test_cheating_model_scores_100_percent(tiny_tokenizer_dir):
    from lmforge.tasks import Progress

    raw = [orjson.loads(line) for line in LAMBADA.read_bytes().splitlines()]
    right = {r["text"].rstrip()[: -len(r["text"].split()[-1])].rstrip(): r["text"].split()[-1] for r in raw}
    res = lambada.run(cheat(tiny_tokenizer_dir, right), lambada.load(TaskOptions(str(LAMBADA))), TaskOptions(),
                      Progress())
    assert res.metrics["acc"] == 1.0 and res.n == 200
    raw = [orjson.loads(line) for line in HELLASWAG.read_bytes().splitlines()]
    right = {hellaswag.parse(r).context: hellaswag.preprocess(r["endings"][r["label"]]) for r in raw}
    res = hellaswag.run(cheat(tiny_tokenizer_dir, right), hellaswag.load(TaskOptions(str(HELLASWAG))),
                        TaskOptions(), Progress())
    assert res.metrics == {"acc": 1.0, "acc_norm": 1.0} and res.n == 200


def few_steps_model(tok_dir: Path, shards_dir: Path, steps: int = 6) -> EvalModel:
    from lmforge.loaders.memmap import MemmapLoader
    from lmforge.objectives import autoregressive_loss

    tok = Tokenizer.load(tok_dir)
    model = tiny_model(vocab=tok.vocab_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _, (x, y) in zip(range(steps), MemmapLoader(shards_dir, "train", 8, 64, seed=1), strict=False):
        autoregressive_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return EvalModel(model.eval(), tok, "few-steps")


@needs_samples
def test_barely_trained_model_scores_at_chance(tiny_tokenizer_dir, tiny_shards_dir):
    from lmforge.tasks import Progress

    em = few_steps_model(tiny_tokenizer_dir, tiny_shards_dir)
    hs = hellaswag.run(em, hellaswag.load(TaskOptions(str(HELLASWAG))), TaskOptions(), Progress())
    assert hs.n == 200 and hs.truncated > 0  # a 64-token context cannot hold most of them
    assert 0.15 <= hs.metrics["acc"] <= 0.37 and 0.15 <= hs.metrics["acc_norm"] <= 0.37, hs.metrics
    lam = lambada.run(em, lambada.load(TaskOptions(str(LAMBADA), limit=50)), TaskOptions(limit=50), Progress())
    assert lam.n == 50 and lam.metrics["acc"] <= 0.1 and lam.metrics["ppl"] > 10


# ---- completion ---------------------------------------------------------------------------------------
def test_completion_split_and_scores(tmp_path):
    words = " ".join(f"w{i}" for i in range(40))
    pair = completion.split_text(words)
    assert pair.prompt == " ".join(f"w{i}" for i in range(20)) and pair.reference.split()[0] == "w20"
    assert completion.split_text("too short") is None
    perfect = completion.scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    assert completion.scores(["dog"], ["the cat sat on the mat"])["rouge1"] == 0.0
    path = tmp_path / "c.jsonl"
    path.write_bytes(orjson.dumps({"prompt": "a", "completion": "b c"}) + b"\n" + orjson.dumps({"prompt": 1}))
    data = completion.load(TaskOptions(str(path)))
    assert data.items == [completion.Pair("a", "b c")] and data.skipped == 1


@needs_samples
def test_completion_runs_a_model(tiny_tokenizer_dir):
    from lmforge.tasks import Progress

    em = EvalModel(tiny_model(vocab=512), Tokenizer.load(tiny_tokenizer_dir), "random")
    res = completion.run(em, completion.load(TaskOptions(str(WIKITEXT))), TaskOptions(limit=3, max_new_tokens=8),
                         Progress())
    assert res.n == 3 and set(res.metrics) == {"bleu", "rouge1", "rouge2", "rougeL"}
    assert all(0.0 <= v <= 100.0 for v in res.metrics.values())


def test_hf_dataset_names_reach_datasets(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"text": "one two three"}, {"text": "four five"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = lambada.load(TaskOptions("hf:EleutherAI/lambada_openai:default:test"))
    assert calls == [("EleutherAI/lambada_openai", "default", "test")] and len(data.items) == 2
    hellaswag_calls = len(calls)
    with pytest.raises(DataError, match="no usable records"):
        hellaswag.load(TaskOptions("hf:Rowan/hellaswag::validation"))
    assert calls[hellaswag_calls] == ("Rowan/hellaswag", None, "validation")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: say what to do
    with pytest.raises(DataError, match="needs the `datasets` package"):
        lambada.load(TaskOptions("hf:x"))
