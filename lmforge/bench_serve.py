"""Server measurements for `lmforge bench generate --server`: what HTTP and the queue add to one
completion, and what dynamic batching gives several concurrent clients over one-at-a-time service.

The server runs in this process (uvicorn in a thread) on a free loopback port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from lmforge.engine import Engine
from lmforge.sampling import SamplingParams


class _Letters:
    """A stand-in tokenizer for a random model: each token is the letter "a"."""

    eos_id = bos_id = pad_id = None
    special_tokens: dict = {}

    def encode(self, text: str) -> list[int]:
        return [1] * max(1, len(text))

    def decode(self, ids) -> str:
        return "a" * len(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return b"a" * len(list(ids))


@contextmanager
def running_server(model, tokenizer, max_batch: int):
    """Serve `model` on a free 127.0.0.1 port for the duration of the block; yields the base URL."""
    import uvicorn

    from lmforge.serve import ServeConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, tokenizer, ServeConfig(model_name="bench", max_batch=max_batch, max_queue=256))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    app.state.handles = []  # every request's Handle, for the engine-side timings of its rows
    submit = app.state.runner.submit

    def recorded(*args, **kwargs):
        app.state.handles.append(submit(*args, **kwargs))
        return app.state.handles[-1]

    app.state.runner.submit = recorded
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.handles
    finally:
        server.should_exit = True
        thread.join(15)


def _direct(engine: Engine, prompt: list[int], n: int) -> float:
    row = engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0), stop_ids=())
    t0 = time.perf_counter()
    engine.run()
    assert len(row.tokens) == n
    return time.perf_counter() - t0


def _request(client, url: str, prompt: list[int], n: int) -> float:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = client.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    assert r.json()["usage"]["completion_tokens"] == n
    return time.perf_counter() - t0


def _concurrent(url: str, prompts: list[list[int]], n: int) -> float:
    import httpx

    def one(p: list[int]) -> float:
        with httpx.Client() as c:
            return _request(c, url, p, n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, prompts))
    return time.perf_counter() - t0


@torch.inference_mode()
def bench_server(model, tokenizer, new_tokens: int = 256, clients: int = 8, repeats: int = 3,
                 log: Callable[[str], object] = print) -> dict:
    """{"server_overhead": fraction, "dynamic_batching_gain": ratio, ...}."""
    import httpx

    tok = tokenizer or _Letters()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.cfg.vocab_size, (16,), generator=g).tolist() for _ in range(clients)]
    n = min(new_tokens, model.cfg.seq_len - 16)
    # one long-lived engine, as the server has: both have timed their layouts before the timed runs
    engine = Engine(model, tok, max_batch=1, max_len=16 + n)
    _direct(engine, prompts[0], n)
    with (running_server(model, tok, max_batch=clients) as (url, handles),
          running_server(model, tok, max_batch=1) as (serial_url, _), httpx.Client() as c):
        _request(c, url, prompts[0], n)
        # alternate the two so that load from elsewhere on the machine hits both alike
        pairs, outside = [], []
        for _ in range(repeats):
            pairs.append((_direct(engine, prompts[0], n), _request(c, url, prompts[0], n)))
            row = handles[-1].rows[0]
            outside.append(pairs[-1][1] - (row.t_end - row.t_submit))
        # a server that has run a while has timed its layouts for each batch size: one short round
        # first, then interleaved rounds, each server keeping its fastest
        _concurrent(url, prompts, n // 4)
        _concurrent(serial_url, prompts[:1], n // 4)
        batched = serial = float("inf")
        for _ in range(min(repeats, 2)):
            batched = min(batched, _concurrent(url, prompts, n))
            serial = min(serial, _concurrent(serial_url, prompts, n))
    direct, http = min(d for d, _ in pairs), min(h for _, h in pairs)
    # HTTP + queue: the request's time less its row's time inside the engine, both from the same
    # request, so the machine's noise (which moves `http - direct` by +-10% here) cancels out
    outside_s = sorted(outside)[len(outside) // 2]
    out = {"direct_s": direct, "http_s": http, "http_vs_direct": http / direct - 1,
           "outside_engine_s": outside_s, "server_overhead": outside_s / (http - outside_s),
           "concurrent_clients": clients, "batched_tokens_per_s": clients * n / batched,
           "one_at_a_time_tokens_per_s": clients * n / serial, "dynamic_batching_gain": serial / batched}
    log(f"server: one {n}-token completion {http:.3f} s over HTTP vs {direct:.3f} s direct "
        f"({100 * out['http_vs_direct']:+.1f}%); HTTP + queue {1000 * outside_s:.1f} ms per request "
        f"(overhead {100 * out['server_overhead']:.1f}% of its generation)")
    log(f"server: {clients} concurrent clients {out['batched_tokens_per_s']:.0f} tokens/s with dynamic batching "
        f"vs {out['one_at_a_time_tokens_per_s']:.0f} one at a time ({out['dynamic_batching_gain']:.2f}x)")
    return out
