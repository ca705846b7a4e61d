"""SFT: packing with per-example attention, the loader's masks and resume, vocabulary extension, bad
input, inheritance from the base run, and whole runs in-process (resume mid-epoch is exact)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import torch

from lmforge.checkpoint import read_state, resolve_checkpoint, save_checkpoint
from lmforge.config import ModelConfig, Recipe, SFTConfig
from lmforge.errors import ConfigError, DataError, Interrupted, TrainingError
from lmforge.loaders.sft import SFTLoader, SFTSplit, build_splits, doc_attention, read_records, sft_loss
from lmforge.models.transformer import Transformer
from lmforge.sft import extend_embeddings, plan_sft, run_sft
from lmforge.tokenizer import Tokenizer

LINES = ["To be, or not", "that is the question", "Whether 'tis nobler", "The slings and arrows",
         "Or to take arms", "against a sea", "And by opposing", "To die, to sleep", "No more", "Ay, there's the rub"]
LIMA = Path(__file__).resolve().parents[3] / "shared" / "data" / "samples" / "lima_sample.json"


def quiet(*_a):
    pass


def conversation(i: int) -> dict:
    turns = [{"role": "user", "content": LINES[i % 10]}, {"role": "assistant", "content": LINES[(i * 3 + 1) % 10]}]
    if i % 3 == 0:  # some multi-turn, some with a system prompt
        turns += [{"role": "user", "content": LINES[(i + 5) % 10]}, {"role": "assistant", "content": LINES[i % 7]}]
    if i % 4 == 0:
        turns.insert(0, {"role": "system", "content": "Answer in verse."})
    return {"messages": turns}


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir).with_chat_tokens()


@pytest.fixture(scope="module")
def split(chat_tok) -> SFTSplit:
    return SFTSplit.build([chat_tok.render_chat(conversation(i)["messages"]) for i in range(20)])


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """A tiny base checkpoint (random weights, a base recipe to inherit from) and 40 conversations."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "chats.jsonl"
    data.write_bytes(b"\n".join(orjson.dumps(conversation(i)) for i in range(40)) + b"\n")
    tok = Tokenizer.load(tiny_tokenizer_dir)
    base = Recipe.model_validate({"model": {"preset": "tiny", "vocab_size": tok.vocab_size},
                                  "train": {"micro_batch_size": 4, "weight_decay": 0.05, "lr": 1e-3}})
    torch.manual_seed(0)
    state = {"model_config": base.model.model_dump(mode="json"), "recipe": base.model_dump(mode="json"),
             "tokenizer_fingerprint": tok.fingerprint}
    ckpt = save_checkpoint(root / "base" / "checkpoints", 7, Transformer(base.model), state,
                           tokenizer_dir=tiny_tokenizer_dir)
    return {"data": data, "base": ckpt.parent.parent}


def sft_recipe(files: dict[str, Path], run_dir: Path, **sft) -> Recipe:
    return Recipe.model_validate({
        "name": "sft-test", "sft": {"base": str(files["base"]), "source": str(files["data"]), "epochs": 2, **sft},
        "train": {"run_dir": str(run_dir), "lr": 3e-3, "log_every": 1},
        "sample": {"max_new_tokens": 4}})


# ---- attention and positions ---------------------------------------------------------------------------
def test_doc_attention_is_block_diagonal_and_causal():
    mask, pos = doc_attention(torch.tensor([[0, 0, 0, 1, 1, -1]]))
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for block in ([0, 1, 2], [3, 4], [5]):
        for q in block:
            for k in block:
                want[q, k] = k <= q
    assert torch.equal(mask[0, 0], want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_examples_score_as_if_alone(arch):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", arch=arch, vocab_size=64, seq_len=24)).eval()
    a, b = torch.randint(0, 64, (7,)), torch.randint(0, 64, (9,))
    row = torch.cat([a, b, torch.zeros(24 - 16, dtype=torch.long)])[None]
    doc = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 8])
    mask, pos = doc_attention(doc)
    with torch.no_grad():
        packed = model(row, attn_mask=mask, positions=pos)
        alone_a, alone_b = model(a[None]), model(b[None])
        leaky = model(row)
    torch.testing.assert_close(packed[0, :7], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 7:16], alone_b[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[0, 7:16], alone_b[0], atol=1e-3)  # the check can see a leak


# ---- the loader ----------------------------------------------------------------------------------------
def test_packed_batches_train_exactly_the_supervised_tokens(split):
    loader = SFTLoader(split, 3, 64, pad_id=0, seed=1)
    rows = loader.rows(0)
    assert sorted(i for r in rows for i in r) == list(range(len(split)))  # each example once per epoch
    assert len(rows) < len(split)  # several examples share a row
    picked = rows[:3]
    x, y, doc = loader.collate(picked)
    for r, row in enumerate(picked):
        at = 0
        for k, i in enumerate(row):
            ids, sup = split.example(i)
            n = len(ids)
            assert x[r, at:at + n].tolist() == ids.tolist()[: 64 - at] and set(doc[r, at:at + n].tolist()) == {k}
            want = [int(t) if s else -1 for t, s in zip(ids[1:], sup[1:], strict=True)]
            assert y[r, at:at + n - 1].tolist() == want
            at += n
        assert (y[r, at - 1:] == -1).all() and (doc[r, at:] == -1).all()
    frac = loader.supervised_fraction()
    assert frac == pytest.approx(split.supervised_fraction()) and 0 < frac < 1


def test_padded_rows_hold_one_example(split, chat_tok):
    loader = SFTLoader(split, 4, 64, pad_id=chat_tok.pad_id, packing=False, shuffle=False)
    x, y = next(iter(loader))
    n = len(split.example(0)[0])
    assert x[0, :n].tolist() == split.example(0)[0].tolist() and (x[0, n:] == chat_tok.pad_id).all()
    assert (y[0, n - 1:] == -1).all()
    loss = sft_loss(Transformer(ModelConfig(preset="tiny", vocab_size=chat_tok.vocab_size)), x, y)
    assert torch.isfinite(loss)


def test_validation_covers_each_example_once(split):
    val = SFTLoader(split, 8, 64, pad_id=0, packing=False, shuffle=False, loop=False)
    batches = list(val)
    assert len(batches) == val.steps_in_epoch(0) == 3 and batches[-1][0].shape[0] == 4
    supervised = sum(int((b[1] >= 0).sum()) for b in batches)
    assert supervised == int(split.supervised.sum())  # the first token (<|bos|>) is never supervised
    assert len(list(val)) == 0  # one pass: validation restores the start state before each use


def test_loader_resumes_mid_epoch_exactly(split):
    a = SFTLoader(split, 3, 64, pad_id=0, seed=5)
    it = iter(a)
    steps = a.steps_in_epoch(0)
    for _ in range(steps + 1):  # into the second epoch
        next(it)
    state = a.state_dict()
    expected = [next(it) for _ in range(steps)]
    b = SFTLoader(split, 3, 64, pad_id=0, seed=5)
    b.load_state_dict(state)
    got = [batch for batch, _ in zip(b, range(steps), strict=False)]
    assert all(torch.equal(p, q) for e, g in zip(expected, got, strict=True) for p, q in zip(e, g, strict=True))
    other = SFTLoader(SFTSplit.build([(list(range(5)), [False, True, True, True, True])]), 3, 64, pad_id=0, seed=5)
    with pytest.raises(DataError, match="data_fingerprint"):
        other.load_state_dict(state)


# ---- vocabulary extension ------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_vocabulary_extension_keeps_old_rows(tie):
    torch.manual_seed(0)
    old = Transformer(ModelConfig(preset="tiny", vocab_size=100, tie_embeddings=tie)).eval()
    weights = {k: v for k, v in old.state_dict().items() if not (tie and k == "lm_head.weight")}
    grown = extend_embeddings(weights, old_tokens=100, new_tokens=104, rows=104)
    new = Transformer(ModelConfig(preset="tiny", vocab_size=104, tie_embeddings=tie)).eval()
    new.load_state_dict(grown, strict=not tie)
    emb = new.tok_emb.weight.detach()
    assert torch.equal(emb[:100], old.tok_emb.weight) and torch.allclose(emb[100:], old.tok_emb.weight.mean(0))
    head = new.lm_head.weight.detach()
    assert torch.equal(head[:100], old.lm_head.weight)
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():  # old tokens in, old tokens out: the same logits
        assert torch.equal(new(x)[..., :100], old(x))
    assert extend_embeddings(weights, 100, 100, 100)["tok_emb.weight"] is weights["tok_emb.weight"]


# ---- reading and bad input -----------------------------------------------------------------------------
def write_jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else orjson.dumps(r) for r in records) + b"\n")
    return path


def test_odd_conversations_are_skipped_and_counted(tmp_path, chat_tok):
    good = conversation(1)
    bad = [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                         {"role": "assistant", "content": "c"}]},
           {"conversations": ["question", ""]},
           {"messages": [{"role": "user", "content": "a"}, {"role": "oracle", "content": "c"}]},
           b"{not json"]
    src = write_jsonl(tmp_path / "mixed.jsonl", [good] * 4 + bad)
    logs = []
    data = build_splits(SFTConfig(source=str(src), val_fraction=0.25), chat_tok, 65, logs.append)
    assert data.meta["records"] == 8 and data.meta["skipped"] == {
        "two user turns in a row": 1, "empty content": 1, "unknown role": 1, "malformed record": 1}
    assert len(data.train) == 3 and len(data.val) == 1 and any("skipped 4" in line for line in logs)
    with pytest.raises(DataError, match=r"mixed.jsonl:5: two user turns in a row \(sft.strict"):
        build_splits(SFTConfig(source=str(src), strict=True), chat_tok, 65, quiet)


def test_length_handling_drops_or_truncates_and_says_so(tmp_path, chat_tok):
    long = {"conversations": ["short question", " ".join(LINES * 5)]}
    src = write_jsonl(tmp_path / "long.jsonl", [conversation(1)] * 3 + [long])
    logs = []
    kept = build_splits(SFTConfig(source=str(src), val_fraction=0), chat_tok, 40, logs.append)
    assert len(kept.train) == 3 and "3/4 kept at 40 tokens; 1 too long, dropped" in logs[0]
    cut = build_splits(SFTConfig(source=str(src), val_fraction=0, too_long="truncate"), chat_tok, 40, quiet)
    assert len(cut.train) == 4 and cut.meta["train"]["truncated"] == 1 and cut.train.lengths.max() == 40
    only_long = write_jsonl(tmp_path / "only_long.jsonl", [long])
    with pytest.raises(DataError, match="no training conversation fits the model's context"):
        build_splits(SFTConfig(source=str(only_long), val_fraction=0), chat_tok, 40, quiet)


def test_sources_json_arrays_globs_and_missing(tmp_path):
    (tmp_path / "a.json").write_bytes(orjson.dumps([{"instruction": "Q", "input": "", "output": "A"}] * 2))
    write_jsonl(tmp_path / "b.jsonl", [conversation(2)])
    assert [w for w, _ in read_records(str(tmp_path / "*.js*"))] == [
        f"{tmp_path}/a.json[0]", f"{tmp_path}/a.json[1]", f"{tmp_path}/b.jsonl:1"]
    assert len(list(read_records(str(tmp_path / "a.json"), limit=1))) == 1
    with pytest.raises(DataError, match="no such file"):
        list(read_records(str(tmp_path / "missing.jsonl")))


def test_hf_dataset_names_are_read_through_datasets(monkeypatch):
    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return [conversation(0), conversation(1)]

    monkeypatch.setattr("datasets.load_dataset", fake)
    got = list(read_records("hf:GAIR/lima", hf_split="train"))
    assert calls == [("GAIR/lima", None, "train")] and [w for w, _ in got] == ["hf:GAIR/lima[0]", "hf:GAIR/lima[1]"]


@pytest.mark.skipif(not LIMA.is_file(), reason="the LIMA sample (../shared/data/samples) is not here")
def test_lima_sample_reads_as_single_turn_chats(chat_tok):
    data = build_splits(SFTConfig(source=str(LIMA), too_long="truncate"), chat_tok, 257, quiet)
    assert data.meta["records"] == 200 and not data.meta["skipped"]
    assert 0.3 < data.train.supervised_fraction() < 0.95 and len(data.prompts) == 3


# ---- the recipe ----------------------------------------------------------------------------------------
def test_unset_keys_come_from_the_base_and_the_table_says_so(sft_files, tmp_path):
    logs = []
    plan = plan_sft(sft_recipe(sft_files, tmp_path / "run"), log=logs.append)
    src = {k: s for k, _, s in plan.table}
    r = plan.recipe
    assert r.train.lr == 3e-3 and src["train.lr"].startswith("recipe (base: 0.001")
    assert r.train.weight_decay == 0.05 and src["train.weight_decay"] == "base run"
    assert r.train.micro_batch_size == 4 and r.model.n_layer == 2 and r.model.vocab_size == 516
    assert r.eval.final == "batches" and src["train.max_steps"].startswith("sft")
    assert r.train.max_steps == sum(-(-len(plan.loaders(r, _Dist(), "cpu")[0].rows(e)) // 4) for e in range(2))
    assert r.sample.prompts and r.train.init_from.endswith("sft_base")
    assert any("supervised tokens" in line for line in logs) and 0 < plan.supervised_fraction < 1
    with pytest.raises(ConfigError, match=r"model.n_layer = 3 \(the base has 2\)"):
        plan_sft(Recipe.model_validate({**sft_recipe(sft_files, tmp_path / "r2").model_dump(
            exclude={"model"}), "model": {"n_layer": 3}}), log=quiet)


class _Dist:
    rank, world_size = 0, 1


def test_a_dropped_loss_mask_stops_the_run(sft_files, tmp_path, monkeypatch):
    from lmforge.chat_template import render

    def maskless(tok, messages, **kw):  # the bug this guards against: every target trained
        ids, _ = render(tok, messages, **kw)
        return ids, [True] * len(ids)

    monkeypatch.setattr("lmforge.loaders.sft.render", maskless)
    with pytest.raises(TrainingError, match="loss mask is missing"):
        plan_sft(sft_recipe(sft_files, tmp_path / "run"), log=quiet)


# ---- whole runs ----------------------------------------------------------------------------------------
def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(resolve_checkpoint(run_dir, prefer="latest") / "model.safetensors"))


def test_sft_run_resumes_mid_epoch_exactly(sft_files, tmp_path):
    straight = run_sft(sft_recipe(sft_files, tmp_path / "a"), log=quiet)
    steps = straight["train"]["steps"]
    with pytest.raises(Interrupted):
        run_sft(sft_recipe(sft_files, tmp_path / "b"), log=quiet, stop_at=steps // 2 - 1)
    resumed = run_sft(sft_recipe(sft_files, tmp_path / "b"), log=quiet, resume=True)
    assert resumed["train"]["steps"] == steps
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["eval"]["loss"] == resumed["eval"]["loss"]
    ckpt = resolve_checkpoint(tmp_path / "a")
    tok = Tokenizer.load(ckpt)
    assert tok.chat_template and tok.meta["sft"]["base_checkpoint"].endswith("step_000007")
    assert read_state(ckpt)["recipe"]["sft"]["base"] == str(sft_files["base"])
    assert (tmp_path / "a" / "sft_lineage.json").is_file() and (tmp_path / "a" / "chats.txt").is_file()
    assert len(straight["chats"]) == 3


def test_an_exported_hf_dir_is_a_base_too(sft_files, tmp_path):
    from lmforge.export import export_checkpoint
    from lmforge.sft import _start_files

    hf = export_checkpoint(sft_files["base"], tmp_path / "hf", "hf", log=quiet)
    recipe = sft_recipe(sft_files, tmp_path / "run")
    recipe.sft.base = str(hf)
    plan = plan_sft(recipe, log=quiet)
    assert plan.base.hf and plan.recipe.model.n_layer == 2 and plan.recipe.model.vocab_size == 516
    assert plan.recipe.train.weight_decay == 0.1  # an HF dir has no run to inherit from: defaults
    _start_files(plan, resume=False, fresh=False)
    start = read_state(Path(plan.recipe.train.init_from))
    assert start["model_config"]["vocab_size"] == 516 and start["sft"]["base_checkpoint"] == str(hf.resolve())


def test_the_lima_recipe_is_valid():
    from lmforge.config import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "sft-lima.toml")
    assert r.sft.base == "runs/demo" and r.sft.source.endswith("lima_sample.json") and r.train.run_dir != "runs/demo"
