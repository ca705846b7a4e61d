"""The real server in a subprocess on a free loopback port, driven by the official `openai` client and by
raw HTTP for the error cases."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from lmforge.checkpoint import save_checkpoint
from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.tokenizer import Tokenizer

KEY = "test-key-123"
CONTEXT = 256


def make_checkpoint(root: Path, tokenizer_dir: Path, seq_len: int = CONTEXT) -> Path:
    """A tiny random Llama with the test tokenizer, saved as run/checkpoints/step_000001."""
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_kv_head=2,
                      seq_len=seq_len)
    model = Transformer(cfg)
    with torch.no_grad():  # peaked logits: greedy output does not hinge on rounding
        for p in model.parameters():
            p.mul_(4)
    state = {"model_config": cfg.model_dump(mode="json"), "tokenizer_fingerprint": tok.fingerprint}
    return save_checkpoint(root / "run" / "checkpoints", 1, model, state, tokenizer_dir=tokenizer_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lmforge", "serve", str(ckpt), "--host", "127.0.0.1", "--port",
               str(self.port), "--device", "cpu", "--model-name", "tiny", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # a file, not a pipe: nobody reads the server's output while it runs, and a full pipe would block it
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("server did not start in 90 s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out = self.output()
        self.log.close()
        if "Traceback" in out:
            print(out)  # shown by pytest when a test fails

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def server(ckpt):
    srv = Server(ckpt, "--api-key", KEY, "--max-tokens", "200", "--max-batch", "16")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_health_and_models(server, client):
    assert server.health()["status"] == "ok" and server.health()["objective"] == "autoregressive"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completions_plain_and_streamed(client, tiny_tokenizer_dir):
    tok = Tokenizer.load(tiny_tokenizer_dir)
    full = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert full.usage.prompt_tokens == 1 + len(tok.encode("ROMEO:"))
    assert 0 < full.usage.completion_tokens <= 30
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    two = client.completions.create(model="tiny", prompt=["A", "B"], max_tokens=5, temperature=0)
    assert len(two.choices) == 2 and two.choices[1].index == 1


def test_chat_plain_rendering_is_flagged(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=msgs, max_tokens=20,
                                                          temperature=0)
    assert raw.headers["x-lmforge-chat-format"] == "plain"
    resp = raw.parse()
    assert resp.model_extra["chat_format"] == "plain"
    assert resp.choices[0].message.role == "assistant" and resp.usage.completion_tokens <= 20
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", prompt="KING:", max_tokens=25, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b


def test_sse_wire_format(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("headers,body,status,param", [
    ({}, {"prompt": "x"}, 401, None),
    ({"Authorization": "Bearer wrong"}, {"prompt": "x"}, 401, None),
    (None, {"prompt": "word " * 400}, 400, "prompt"),
    (None, {"prompt": "x", "max_tokens": 201}, 400, "max_tokens"),
    (None, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (None, {"prompt": "x", "top_p": 2}, 400, "top_p"),
    (None, {"max_tokens": 3}, 400, "prompt"),
    (None, {"prompt": [999999]}, 400, "prompt"),
    (None, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_errors_use_openai_format(server, headers, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param


def test_invalid_json_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{nope", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_32_concurrent_streams_all_complete(server, client):
    prompts = [f"Citizen {i}:" for i in range(32)]
    want = [client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0).choices[0]
            for p in prompts]

    async def one(ac: openai.AsyncOpenAI, p: str) -> tuple[str, str | None]:
        text, finish = "", None
        async for chunk in await ac.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0,
                                                       stream=True):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(ac, p) for p in prompts))
        finally:
            await ac.close()

    got = asyncio.run(main())
    assert [g[0] for g in got] == [w.text for w in want]
    assert [g[1] for g in got] == [w.finish_reason for w in want]


def test_queue_full_and_disconnect(ckpt):
    """One slot, one waiting place: a third request gets 429; leaving mid-stream frees the slot."""
    srv = Server(ckpt, "--max-batch", "1", "--max-queue", "1", "--step-delay", "0.05")
    url = srv.url + "/v1/completions"
    body = {"model": "tiny", "prompt": "Now", "max_tokens": 250}
    try:
        done: list[httpx.Response] = []
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()  # kept: a dropped iterator would close the stream at once
            next(lines)  # the first request holds the only slot now
            waiter = threading.Thread(target=lambda: done.append(httpx.post(url, json={**body, "max_tokens": 3},
                                                                            timeout=60)))
            waiter.start()
            _wait_for(lambda: srv.health()["waiting"] == 1)
            full = httpx.post(url, json={**body, "max_tokens": 3}, timeout=30)
            assert full.status_code == 429, full.text
            assert full.headers["retry-after"] and full.json()["error"]["code"] == "queue_full"
        # the stream was closed after one chunk: its generation stops and the waiting request runs
        _wait_for(lambda: srv.health()["cancelled"] == 1)
        waiter.join(60)
        assert done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] <= 3
        _wait_for(lambda: srv.health()["running"] == 0)
    finally:
        srv.close()


def _wait_for(cond, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_openapi_schema(server):
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(schema["paths"])
    assert "400" in schema["paths"]["/v1/completions"]["post"]["responses"]


def test_fuzz_finds_no_server_errors(server):
    """Schemathesis cases (valid and invalid bodies) for every operation: never a 5xx."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    mode = schemathesis.GenerationMode
    for result in schema.get_all_operations():
        op = result.ok()
        for gen_mode in (mode.POSITIVE, mode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=gen_mode))
            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error],
                                       timeout=60)

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid: an operation without parameters
                assert gen_mode == mode.NEGATIVE


def test_a_failed_step_answers_500_and_the_server_goes_on(tiny_tokenizer_dir):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    tok = Tokenizer.load(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="gpt2", vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2,
                                    seq_len=64)).eval()
    healthy = model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    with TestClient(create_app(model, tok, ServeConfig(model_name="t"))) as c:
        model.forward = broken
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 500 and "simulated failure" in r.json()["error"]["message"]
        model.forward = healthy
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


def test_chat_template_is_used_for_sft_tokenizers(tiny_tokenizer_dir):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    tok = Tokenizer.load(tiny_tokenizer_dir).with_chat_tokens()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2,
                                    seq_len=64)).eval()
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with TestClient(create_app(model, tok, ServeConfig(model_name="t"))) as c:
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5})
        assert r.status_code == 200 and r.headers["x-lmforge-chat-format"] == "template"
        assert r.json()["chat_format"] == "template"
        assert r.json()["usage"]["prompt_tokens"] == len(tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, msgs[1]], add_generation_prompt=True))
        bad = c.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}] * 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
