"""Serving a masked-diffusion model: the settled-text semantics, and the OpenAI endpoints in process."""

from __future__ import annotations

import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from lmforge.config import ModelConfig, TokenizerConfig
from lmforge.diffusion import MASK_TOKEN, SettledText, diffusion_generate, diffusion_progress, mask_id_of
from lmforge.generate import encode_prompt
from lmforge.models.transformer import Transformer
from lmforge.serve import ServeConfig, create_app
from lmforge.tokenizer import train_tokenizer

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", MASK_TOKEN]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TokenizerConfig(kind="byte", special_tokens=SPECIALS), [])


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, seq_len=64,
                      objective="diffusion")
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def client(model, tok):
    cfg = ServeConfig(model_name="d", max_tokens_cap=24, diffusion_steps=4)
    with TestClient(create_app(model, tok, cfg)) as c:
        yield c


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text)  # the byte tokenizer: one id per byte


# ---- the settled text ---------------------------------------------------------------------------------
def test_only_the_tokens_left_of_the_first_mask_settle(tok):
    m = mask_id_of(tok)
    a, b, c, d = ids_of(tok, "abcd")
    s = SettledText(tok, m, total=4)
    assert s.update([a, m, c, m]) == "a" and s.finish_reason is None
    assert s.update([a, b, c, m]) == "bc" and s.tokens == [a, b, c]
    assert s.update([a, b, c, d]) == "d" and s.finish_reason == "length" and s.text == "abcd"


def test_eos_and_stop_strings_end_the_text(tok):
    m = mask_id_of(tok)
    a, b, c = ids_of(tok, "abc")
    eos = SettledText(tok, m, total=4)
    assert eos.update([a, tok.eos_id, m, m]) == "a" and eos.finish_reason == "stop" and eos.tokens == [a]
    stop = SettledText(tok, m, total=4, stop=("bc",))
    assert stop.update([a, b, m, m]) == "a"  # "b" may begin the stop string: held back
    assert stop.update([a, b, c, m]) == "" and stop.finish_reason == "stop" and stop.text == "a"
    ignored = SettledText(tok, m, total=3, stop_ids=())  # ignore_eos: the token is text like any other
    assert ignored.update([a, tok.eos_id, b]) == "a<|eos|>b" and ignored.finish_reason == "length"


def test_the_unfinished_canvas_ends_at_the_rows_own_stop_tokens(tok):
    from lmforge.diffusion import MASK_GLYPH, _render

    m = mask_id_of(tok)
    a, b, c = ids_of(tok, "abc")
    assert _render(tok, [a, m, tok.eos_id, c], m, ()) == "a" + MASK_GLYPH
    assert _render(tok, [a, m, b, c], m, (), stop_ids={b}) == "a" + MASK_GLYPH  # e.g. a chat end-of-turn
    assert _render(tok, [a, tok.eos_id, b], m, (), stop_ids=()) == "a<|eos|>b"


def test_a_character_split_between_tokens_waits_for_its_last_byte(tok):
    m = mask_id_of(tok)
    first, second = ids_of(tok, "é")
    s = SettledText(tok, m, total=2)
    assert s.update([first, m]) == ""
    assert s.update([first, second]) == "é" and s.text == "é"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_settled_text_only_grows_and_ends_as_generate(model, tok, seed):
    kw = dict(max_new_tokens=20, steps=5, temperature=1.0, seed=seed)
    texts = [settled.text for _, settled in diffusion_progress(model, tok, "To be", **kw)]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    assert texts[-1] == diffusion_generate(model, tok, "To be", **kw)


# ---- the endpoints ------------------------------------------------------------------------------------
def sse(r) -> list[dict]:
    lines = [ln for ln in r.text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]", r.text
    return [orjson.loads(ln[6:]) for ln in lines[:-1]]


def expected(model, tok, prompt_ids, **kw) -> tuple[str, int, str]:
    *_, (_, settled) = diffusion_progress(model, tok, prompt_ids, **kw)
    return settled.text, len(settled.tokens), settled.finish_reason


def test_completions_are_generates_text_and_stream_the_same(client, model, tok):
    # one token per step: the text settles over several steps, so the stream has several deltas
    body = {"prompt": "To be", "max_tokens": 16, "temperature": 1.0, "top_k": 40, "seed": 5, "steps": 16}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    ids = encode_prompt(tok, "To be")
    kw = dict(max_new_tokens=16, steps=16, temperature=1.0, top_k=40, seed=5)
    text, n, finish = expected(model, tok, ids, **kw)
    assert text == diffusion_generate(model, tok, ids, **kw)
    got = r.json()
    assert got["choices"][0]["text"] == text and got["choices"][0]["finish_reason"] == finish
    assert got["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}))
    deltas = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(deltas) == text and len([d for d in deltas if d]) > 1
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == finish
    assert chunks[-1]["usage"] == got["usage"]


def test_steps_per_request_and_n_choices(client, model, tok):
    ids = encode_prompt(tok, "Hi")
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 12, "seed": 3, "n": 2, "steps": 1,
                                             "temperature": 0.7})
    assert r.status_code == 200, r.text
    want = [diffusion_generate(model, tok, ids, max_new_tokens=12, steps=1, temperature=0.7, seed=s) for s in (3, 4)]
    assert [c["text"] for c in r.json()["choices"]] == want


def test_a_stop_string_ends_the_text_early_as_generate_cuts_it(client, model, tok):
    kw = dict(max_new_tokens=24, steps=4, temperature=1.0, seed=11)
    ids = encode_prompt(tok, "Hark")
    free = diffusion_generate(model, tok, ids, **kw)
    assert len(free) >= 8, free  # room for a stop string in the middle
    stop = free[4:6]
    cut = diffusion_generate(model, tok, ids, stop=(stop,), **kw)
    assert cut == free[:free.find(stop)]
    body = {"prompt": "Hark", "max_tokens": 24, "temperature": 1.0, "seed": 11, "stop": [stop]}
    r = client.post("/v1/completions", json=body)
    assert r.json()["choices"][0]["text"] == cut and r.json()["choices"][0]["finish_reason"] == "stop"
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut


def test_chat_completions_stream_and_not(client):
    body = {"messages": [{"role": "user", "content": "Who art thou?"}], "max_tokens": 10, "seed": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["x-lmforge-chat-format"] == "plain"
    msg = r.json()["choices"][0]["message"]
    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "min_p": 0.1}, "min_p"),
    ({"prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"prompt": "x", "max_tokens": 25}, "max_tokens"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "word " * 80}, "prompt"),
])
def test_limits_and_unsupported_settings_are_400(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_models_and_health_say_it_is_a_diffusion_model(client):
    assert client.get("/v1/models").json()["data"][0]["objective"] == "diffusion"
    health = client.get("/health").json()
    assert health["objective"] == "diffusion" and health["running"] == 0 and health["finished"] >= 1


# ---- the runner ---------------------------------------------------------------------------------------
def test_a_full_queue_is_429_and_cancelled_requests_stop(model, tok):
    import asyncio

    from lmforge.sampling import SamplingParams
    from lmforge.serve_api import ApiError
    from lmforge.serve_diffusion import DiffusionRunner

    runner = DiffusionRunner(model, tok, max_queue=1, steps=40, step_delay_s=0.05)  # 40 steps: about 2 s
    job = (encode_prompt(tok, "Hi"), SamplingParams(max_new_tokens=40, temperature=1.0), None)

    async def until(cond) -> None:
        for _ in range(400):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")

    async def main() -> None:
        first = runner.submit([job], stream=True)
        await until(lambda: runner.running is first.rows[0])
        second = runner.submit([job])
        with pytest.raises(ApiError) as err:
            runner.submit([job])
        assert err.value.status == 429 and err.value.code == "queue_full"
        runner.cancel(second)  # a cancelled waiting request frees its place at once
        assert runner.counts()["waiting"] == 0 and second.rows[0].finish_reason == "cancelled"
        third = runner.submit([job])
        runner.cancel(first)
        runner.cancel(third)
        await until(lambda: runner.counts() == {"running": 0, "waiting": 0, "finished": 0, "cancelled": 3})
        assert [r.finish_reason for r in first.rows + second.rows + third.rows] == ["cancelled"] * 3

    runner.start()
    try:
        asyncio.run(main())
    finally:
        runner.stop()


def test_a_failed_request_answers_500_and_the_server_goes_on(model, tok):
    healthy = model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    with TestClient(create_app(model, tok, ServeConfig(model_name="d", diffusion_steps=2))) as c:
        model.forward = broken
        try:
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        finally:
            model.forward = healthy
        assert r.status_code == 500 and "simulated failure" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
