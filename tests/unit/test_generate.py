import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.engine import Engine
from lmforge.generate import (
    SamplingParams,
    generate_batch,
    generate_ids,
    generate_text,
    load_for_inference,
    quantize_int8,
    render_messages,
    stream_text,
)
from lmforge.models.transformer import Transformer
from lmforge.sampling import RowSampler, TextStream
from lmforge.tokenizer import Tokenizer

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.load(tiny_tokenizer_dir)


def tiny_model(arch: str, vocab: int = 512, seed: int = 0, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, seq_len=64)
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights: peaked logits, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4)
    return model.to(dtype).eval()


def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


class Scripted(nn.Module):
    """A stand-in model: at absolute position p it predicts script[p + 1], whatever the tokens."""

    def __init__(self, script: list[int], vocab: int = 512) -> None:
        super().__init__()
        self.cfg = ModelConfig(arch="llama", vocab_size=vocab, n_embd=8, n_layer=1, n_head=1, seq_len=128)
        self.script = torch.tensor(script + [script[-1]] * 128)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, idx, kv_cache=None, start_pos=0, causal=True, attn_mask=None, positions=None):
        B, T = idx.shape
        pos = (positions.reshape(B, 1) if positions is not None
               else torch.arange(start_pos, start_pos + T).expand(B, T))
        logits = torch.full((B, T, self.cfg.vocab_size), -10.0)
        return logits.scatter(-1, self.script[pos + 1].unsqueeze(-1), 10.0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_cached_equals_uncached(arch, tok):
    model = tiny_model(arch)
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed", "O", "What, ho! apothecary!"]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (12, 5, 20, 9)]
    # max_batch 2 < 4 prompts: later prompts join while others are still decoding
    for max_batch in (4, 2):
        outs = generate_batch(model, tok, ids, params, max_batch=max_batch)
        for i, out in enumerate(outs):
            want = uncached_greedy(model, ids[i], params[i].max_new_tokens)
            cut = want.index(tok.eos_id) if tok.eos_id in want else len(want)
            assert out.token_ids == want[:cut], (max_batch, i)


def test_load_checkpoint_and_generate(tmp_path, tok, tiny_tokenizer_dir):
    model = tiny_model("llama")
    state = {"model_config": model.cfg.model_dump(mode="json"), "tokenizer_fingerprint": tok.fingerprint}
    save_checkpoint(tmp_path / "ckpt", 10, model, state, tokenizer_dir=tiny_tokenizer_dir)
    loaded, tok2, st_ = load_for_inference(tmp_path / "ckpt")
    assert st_["step"] == 10 and tok2.fingerprint == tok.fingerprint
    p = SamplingParams(max_new_tokens=8, temperature=0)
    want = generate_text(model, tok, "To be", p)
    assert generate_text(loaded, tok2, "To be", p) == want
    # an exported Hugging Face dir loads too, to the same model
    from lmforge.export import export_checkpoint

    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", "hf")
    hf_model, hf_tok, _ = load_for_inference(tmp_path / "hf")
    assert generate_text(hf_model, hf_tok, "To be", p) == want


def test_eos_ends_each_row_on_its_own():
    eos = 7
    script = [1, 2, 3, 4, 5, 6, eos, 9, 10, 11, eos, 12, 13]
    tok = _ByteTok(eos_id=eos)
    # prompts of length 2, 4 and 8 meet an eos after 4, 2 and 2 new tokens
    outs = generate_batch(Scripted(script), tok, [script[:2], script[:4], script[:8]],
                          SamplingParams(max_new_tokens=50, temperature=0))
    assert [o.token_ids for o in outs] == [[3, 4, 5, 6], [5, 6], [10, 11]]
    assert all(o.finish_reason == "stop" for o in outs)
    out = generate_batch(Scripted(script), tok, [script[:2]], SamplingParams(max_new_tokens=3, temperature=0))
    assert out[0].token_ids == [3, 4, 5] and out[0].finish_reason == "length"


def test_stop_strings_cut_and_never_leak(tok):
    text = "Hello there, good sir. The END is near; more text follows."
    prompt = [tok.bos_id]
    model = Scripted(prompt + tok.encode(text) + [tok.eos_id])
    for stop, want in [(("END",), "Hello there, good sir. The "), (("sir", "good"), "Hello there, "),
                       (("nothing",), text)]:
        p = SamplingParams(max_new_tokens=len(text), temperature=0, stop=stop)
        deltas = list(stream_text(model, tok, prompt, p))
        assert "".join(deltas) == want
        assert generate_batch(model, tok, [prompt], p)[0].text == want


def test_streaming_multibyte_text_is_never_broken(tok):
    text = "héllo wörld — 日本語 🎉 ok"
    prompt = [tok.bos_id]
    model = Scripted(prompt + tok.encode(text) + [tok.eos_id])
    deltas = list(stream_text(model, tok, prompt, SamplingParams(max_new_tokens=60, temperature=0)))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) > 5  # it did stream


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=0, max_size=40), stops=st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_text_stream_property(text, stops):
    tok = _ByteTok()
    stream = TextStream(tok, stops)
    deltas = [stream.push(b) for b in text.encode("utf-8")] + [stream.finish()]
    assert "".join(deltas) == stream.text == _cut_at_first_stop(text, stops)


def _cut_at_first_stop(text: str, stops: list[str]) -> str:
    """What a generator that stops once a stop string has appeared returns: the text before the
    first stop to complete (a longer one that began earlier never gets the chance to finish)."""
    for end in range(1, len(text) + 1):
        starts = [text[:end].find(s) for s in stops if s in text[:end]]
        if starts:
            return text[:min(starts)]
    return text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_text_equals_final_text(arch, tok):
    model = tiny_model(arch, seed=3)
    p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=11)
    assert "".join(stream_text(model, tok, "KING:", p)) == generate_text(model, tok, "KING:", p)


def test_seed_determinism(tok):
    model = tiny_model("llama", seed=1)
    p = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01,
                       repetition_penalty=1.1, seed=1234)
    a = generate_batch(model, tok, ["Hark"], p)[0].token_ids
    assert generate_batch(model, tok, ["Hark"], p)[0].token_ids == a
    # the same seeded request twice in one batch, beside a greedy row: same draws
    both = generate_batch(model, tok, ["Hark", "Hark", "Nay"], [p, p, GREEDY])
    assert both[0].token_ids == both[1].token_ids == a
    other = generate_batch(model, tok, ["Hark"], SamplingParams(**{**p.__dict__, "seed": 99}))[0]
    assert other.token_ids != a


def test_row_sampler_filters():
    logits = torch.tensor([2.0, 1.5, 0.0, -1.0, -5.0])
    probs = logits.softmax(-1)
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2, seed=0), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=float(probs[1] / probs[0]) - 1e-3, seed=0), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=float(probs[0]) + 1e-3, seed=0), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.01, seed=0), {0}),
        (SamplingParams(temperature=1.0, top_p=5e-324, seed=0), {0}),  # rounds to 0 in float32
        (SamplingParams(temperature=1e-300, seed=0), {0}),  # logits / T overflows
    ]:
        s = RowSampler(params, 5, torch.device("cpu"))
        assert {s(logits) for _ in range(200)} == allowed
    penal = RowSampler(SamplingParams(temperature=0, repetition_penalty=2.0), 5, torch.device("cpu"), [0])
    assert penal(logits) == 1  # token 0 was seen: 2.0 / 2 < 1.5
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_generate_ids_slides_past_the_context(tok):
    model = tiny_model("llama")
    out = list(generate_ids(model, [tok.bos_id], SamplingParams(max_new_tokens=150, temperature=0)))
    assert len(out) == 150  # 150 > seq_len 64: the context slid


def test_prompt_longer_than_context_is_refused():
    model = tiny_model("llama")
    engine = Engine(model, _ByteTok(), max_batch=1)
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(list(range(65)), GREEDY)


def test_cancel_frees_the_slot(tok):
    model = tiny_model("llama")
    engine = Engine(model, tok, max_batch=1)
    a = engine.submit([tok.bos_id, 5], SamplingParams(max_new_tokens=40, temperature=0))
    b = engine.submit([tok.bos_id, 6], SamplingParams(max_new_tokens=3, temperature=0))
    engine.step()
    engine.cancel(a)
    engine.run()
    assert a.finish_reason == "cancelled" and len(a.tokens) < 40
    assert b.finish_reason in ("length", "stop") and b.tokens == uncached_greedy(model, [tok.bos_id, 6], 3)


def test_bf16_generation_runs(tok):
    model = tiny_model("gpt2", dtype=torch.bfloat16)
    out = generate_batch(model, tok, ["A", "Good morrow"], GREEDY)
    assert all(o.finish_reason in ("length", "stop") and o.token_ids for o in out)
    # the first token comes from the prefill, which must match the plain forward pass
    first = uncached_greedy(model, [tok.bos_id] + tok.encode("A"), 1)
    assert out[0].token_ids[0] == first[0]


def test_int8_quantized_model_stays_close(tok):
    model = tiny_model("llama")
    q = quantize_int8(model)
    idx = torch.tensor([[tok.bos_id] + tok.encode("Now is the winter")])
    with torch.no_grad():
        a, b = model(idx), q(idx)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert generate_batch(q, tok, ["Now"], GREEDY)[0].token_ids


def test_render_messages_plain_and_templated(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    plain = render_messages(tok, msgs)
    assert not plain.templated and tok.decode(plain.ids[1:]) == "Be brief.\n\nUser: Hi\nAssistant:"
    assert plain.stop == ("\nUser:",) and tok.eos_id in plain.stop_ids

    class Templated:
        eos_id, bos_id, chat_template = 2, 1, "{{ messages }}"
        special_tokens = {"<|im_end|>": 3}

        def apply_chat_template(self, messages, add_generation_prompt):
            return [1, 10, 11], [0, 0, 0]

    t = render_messages(Templated(), msgs)
    assert t.templated and t.ids == [1, 10, 11] and t.stop_ids == {2, 3}


class _ByteTok:
    """One token per byte; no special tokens unless given."""

    bos_id = None

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(ids)


def test_bench_generate_smoke(tmp_path, tok, tiny_tokenizer_dir, tiny_shards_dir):
    from lmforge.bench_generate import BenchOptions, bench_generate

    model = tiny_model("llama")
    state = {"model_config": model.cfg.model_dump(mode="json"), "tokenizer_fingerprint": tok.fingerprint}
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, model, state, tokenizer_dir=tiny_tokenizer_dir)
    res = bench_generate(BenchOptions(ckpt=str(ckpt), batches=[1, 2], prompt_len=4, new_tokens=6, threads=0,
                                      quantize=True, server=True, val_shards=str(tiny_shards_dir)),
                         log=lambda _m: None)
    names = [r["name"] for r in res["results"]]
    assert names == ["lmforge b1", "transformers b1", "lmforge b2", "transformers b2", "lmforge int8 b1",
                     "lmforge int8 b2"]
    assert all(r["tokens_per_s"] > 0 for r in res["results"])
    s = res["summary"]
    assert s["speedup_b1"] > 0 and abs(s["int8_val_loss"]["change"]) < 1.0
    assert s["dynamic_batching_gain"] > 0 and "server_overhead" in s
    b = s["step_breakdown_b1"]
    assert min(b["decode_step_ms"], b["other_ops_ms"]) > 0 and b["matmul_ms"] == b["decode_step_ms"] - b["other_ops_ms"]


@pytest.mark.slow
def test_compiled_engine_matches_eager(tok):
    model = tiny_model("llama")
    ids = [[tok.bos_id] + tok.encode(p) for p in ("ROMEO:", "To be, or not to be")]
    eager = generate_batch(model, tok, ids, GREEDY)
    compiled = generate_batch(model, tok, ids, GREEDY, compile=True)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_decode_step_times_each_way_then_keeps_one_and_every_way_matches_the_model(arch, dtype):
    from lmforge.decode_step import ROW_BLOCK, TRIALS, DecodeStep, k_splits
    from lmforge.kv_cache import KVCache

    torch.manual_seed(0)
    # a vocabulary of two row blocks: the output layer gets every way (as is, oneDNN, (in, out) copy,
    # its input splits, row blocks)
    model = Transformer(ModelConfig(arch=arch, vocab_size=2 * ROW_BLOCK, n_embd=64, n_layer=2, n_head=4,
                                    n_kv_head=2, seq_len=64)).eval().to(dtype)
    step = DecodeStep(model)
    assert step.cpu  # on the CPU the other ways are candidates (bf16 layers: fp32 copies)
    B, ctx = 3, 5
    n_ways = 3 + len(k_splits(64)) + (dtype == torch.float32)  # row blocks (views) in fp32 only
    tuning = n_ways * TRIALS
    x = torch.randint(0, 2 * ROW_BLOCK, (B, ctx + tuning + n_ways))
    cache = KVCache(model.cfg, B, x.shape[1], torch.device("cpu"), dtype)
    with torch.no_grad():
        model(x[:, :ctx], kv_cache=cache)
        full = model(x)  # (B, T, vocab): what every decode step must reproduce
        for t in range(ctx, x.shape[1]):
            if t == ctx + tuning:  # every layer has now timed each of its ways TRIALS times
                tuned = {m for m, ways in step._ways.items() if ways is not None}
                assert {m for m, _ in step._choice} == tuned and all(b == B for _, b in step._choice)
                assert len(step._ways[model.lm_head]) == n_ways
                down = model.blocks[0].mlp.down
                assert len(step._ways[down]) == 3 + len(k_splits(down.in_features))  # no row blocks
            if t >= ctx + tuning:  # and then each way in turn, for every layer: all exact
                step._choice = {k: (t - ctx) % len(step._ways[k[0]]) for k in step._choice}
            out = step(x[:, t], [t] * B, cache)
            tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16: fp32 copies round less than the model
            torch.testing.assert_close(out, full[:, t], atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_step_input_splits_follow_the_threads_and_equal_the_linear(threads):
    from lmforge.decode_step import _split_inputs, k_splits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        splits = k_splits(96)
        assert k_splits(40) == {1: [], 2: [2], 3: []}[threads]  # 40/2 = 20 >= 16; 40/4 = 10 too few
    finally:
        torch.set_num_threads(before)
    assert splits == {1: [], 2: [2, 4], 3: [3, 6]}[threads]
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    x = torch.randn(5, 96)
    wt = lin.weight.detach().t().contiguous()
    for p in (2, 4, 6):
        torch.testing.assert_close(_split_inputs(wt.view(p, -1, 200), lin.bias, x), lin(x), atol=1e-5, rtol=1e-5)
