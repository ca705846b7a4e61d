"""An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (SSE), /v1/models, /health.

One engine thread steps a shared `Engine`; HTTP handlers on the event loop submit rows to it and
read their tokens from an asyncio queue. Requests that arrive while others are decoding join the
running batch at the next step (dynamic batching). A full waiting queue answers 429; a client that
disconnects cancels its rows, which frees their cache slots at the next step. A masked-diffusion
checkpoint is served by `serve_diffusion.DiffusionRunner` instead, behind the same endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmforge.engine import Engine, Event, Row
from lmforge.errors import LmforgeError
from lmforge.generate import encode_prompt, render_messages
from lmforge.sampling import SamplingParams
from lmforge.serve_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    SamplingFields,
    choice_body,
    chunk_body,
    completion_body,
    install_errors,
    new_id,
    openapi_schema,
    usage,
)

if TYPE_CHECKING:
    from lmforge.serve_diffusion import DiffusionRunner

log = logging.getLogger("lmforge.serve")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500)}


@dataclass
class ServeConfig:
    model_name: str = "lmforge"
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    """Requests waiting for a batch slot beyond which new ones get 429."""
    max_tokens_cap: int = 0
    """Largest max_tokens a request may ask for; 0 = the model's context."""
    compile: bool = False
    step_delay_s: float = 0.0
    """Sleep after each decode step: makes timing-dependent behaviour testable (queueing, disconnects)."""
    diffusion_steps: int = 32
    """Denoising steps per request for a diffusion model (a request's `steps` overrides it)."""


@dataclass(eq=False)
class Handle:
    """The event-loop side of one HTTP request: its rows and the queue their events arrive on."""

    loop: asyncio.AbstractEventLoop
    stream: bool = False
    """Wants every token; otherwise only the finishing event is delivered (fewer event-loop wakeups)."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    rows: list[Row] = field(default_factory=list)


class ModelThread:
    """The one thread that runs the model (it is not thread-safe), woken when requests arrive; the
    queue limit that answers 429. Subclasses define `_loop`."""

    def __init__(self, name: str, max_queue: int, step_delay_s: float = 0.0) -> None:
        self.max_queue, self.step_delay_s = max_queue, step_delay_s
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _check_room(self, waiting: int, more: int) -> None:
        if waiting + more > self.max_queue:
            raise ApiError(429, "the server is busy: too many requests waiting; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def _loop(self) -> None:
        raise NotImplementedError


class Runner(ModelThread):
    """Owns the engine and the thread that steps it whenever some request is waiting or running."""

    def __init__(self, engine: Engine, max_queue: int, step_delay_s: float = 0.0) -> None:
        super().__init__("lmforge-engine", max_queue, step_delay_s)
        self.engine = engine

    def counts(self) -> dict[str, int]:
        e = self.engine
        return {"running": len(e.active), "waiting": len(e.waiting), "finished": e.n_finished,
                "cancelled": e.n_cancelled}

    def submit(self, jobs: list[tuple[list[int], SamplingParams, frozenset[int] | None]],
               stream: bool = False, steps: int | None = None) -> Handle:
        """Queue one row per job. `steps` is for diffusion runners; next-token decoding has none."""
        self._check_room(len(self.engine.waiting), len(jobs))
        handle = Handle(asyncio.get_running_loop(), stream)
        for ids, params, stop_ids in jobs:
            handle.rows.append(self.engine.submit(ids, params, stop_ids=stop_ids, user=handle))
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        for row in handle.rows:
            self.engine.cancel(row)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.busy:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as err:  # a failed step must not leave clients waiting forever
                log.exception("generation step failed")
                events = self._fail_all(err)
            events = [ev for ev in events if ev.finished or ev.row.user.stream]
            if events:
                # one hop to the event loop per step, not per token
                events[0].row.user.loop.call_soon_threadsafe(deliver, events)
            if self.step_delay_s:
                time.sleep(self.step_delay_s)

    def _fail_all(self, err: Exception) -> list[Any]:
        rows = self.engine.active + list(self.engine.waiting)
        self.engine.active, self.engine.waiting = [], type(self.engine.waiting)()
        for r in rows:
            r.error, r.finish_reason = f"generation failed: {err}", "error"
        return [Failure(r, r.error) for r in rows]


@dataclass
class Failure:
    """Delivered in place of an Event when a row's generation failed."""

    row: Row
    message: str
    finished: bool = True


def deliver(events: list[Event | Failure]) -> None:
    """On the event loop: hand each event to its request's queue."""
    for ev in events:
        ev.row.user.queue.put_nowait(ev)


# ---- the app --------------------------------------------------------------------------------------
def create_app(model, tokenizer, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model`; its engine thread starts and stops with the app."""
    cfg = cfg or ServeConfig()
    runner = _runner(model, tokenizer, cfg)
    ctx, objective = model.cfg.seq_len, model.cfg.objective
    cap = min(cfg.max_tokens_cap or ctx, ctx)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions for an lmforge checkpoint.")
    app.state.runner, app.state.cfg = runner, cfg
    install_errors(app)

    auth = _auth(cfg.api_key)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": cfg.model_name, "objective": objective, **runner.counts()}

    @app.get("/v1/models", dependencies=[Depends(auth)], responses=ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "lmforge", "context_length": ctx, "objective": objective}]}

    @app.post("/v1/completions", dependencies=[Depends(auth)], responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        _check_common(req, cfg)
        if req.logprobs is not None:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        prompts = _completion_prompts(req, tokenizer, model.cfg.vocab_size)
        jobs = []
        for ids in prompts:
            jobs += _jobs(ids, req, req.max_tokens, ctx, cap, (), None)
        echo = [tokenizer.decode(ids) if req.echo else "" for ids in prompts for _ in range(req.n)]
        return await _respond(runner, request, req, jobs, cfg.model_name, chat=False, echo=echo)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], responses=ERRORS)
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        _check_common(req, cfg)
        try:
            chat = render_messages(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        except LmforgeError as err:  # a conversation the chat template cannot render
            raise ApiError(400, str(err), param="messages") from None
        limit = req.max_completion_tokens or req.max_tokens
        jobs = _jobs(chat.ids, req, limit, ctx, cap, chat.stop, chat.stop_ids)
        fmt = "template" if chat.templated else "plain"
        return await _respond(runner, request, req, jobs, cfg.model_name, chat=True, chat_format=fmt)

    app.openapi = lambda: openapi_schema(app)
    return app


def _runner(model, tokenizer, cfg: ServeConfig) -> Runner | DiffusionRunner:
    """The engine's batching runner for next-token models; one canvas at a time for diffusion ones."""
    from lmforge.diffusion import is_diffusion

    if is_diffusion(model):
        from lmforge.serve_diffusion import DiffusionRunner

        return DiffusionRunner(model, tokenizer, cfg.max_queue, cfg.diffusion_steps, cfg.step_delay_s)
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, compile=cfg.compile)
    return Runner(engine, cfg.max_queue, cfg.step_delay_s)


def _auth(api_key: str | None) -> Callable[[Request], None]:
    """A dependency that refuses requests without `Authorization: Bearer <api_key>` (when one is set)."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    return check


def _check_common(req: SamplingFields, cfg: ServeConfig) -> None:
    if req.model is not None and req.model != cfg.model_name:
        raise ApiError(404, f"model {req.model!r} does not exist; this server has {cfg.model_name!r}",
                       param="model", code="model_not_found")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported (use repetition_penalty)", param=name)


def _completion_prompts(req: CompletionRequest, tokenizer, vocab: int) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [encode_prompt(tokenizer, p)]
    if p and all(isinstance(x, int) for x in p):
        if any(not 0 <= x < vocab for x in p):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return [list(p)]
    if not p:
        raise ApiError(400, "prompt is empty", param="prompt")
    return [encode_prompt(tokenizer, s) for s in p]


def _jobs(ids: list[int], req: SamplingFields, max_tokens: int | None, ctx: int, cap: int,
          stop: tuple[str, ...], stop_ids) -> list[tuple[list[int], SamplingParams, Any]]:
    if len(ids) >= ctx:
        raise ApiError(400, f"this model's context is {ctx} tokens; the prompt has {len(ids)}",
                       param="messages" if isinstance(req, ChatRequest) else "prompt",
                       code="context_length_exceeded")
    room = ctx - len(ids)
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {cap}", param="max_tokens")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"this model's context is {ctx} tokens; you asked for {len(ids) + max_tokens} "
                       f"({len(ids)} in the prompt, {max_tokens} to generate)", param="max_tokens",
                       code="context_length_exceeded")
    jobs = []
    for i in range(req.n):
        try:
            params = SamplingParams(max_new_tokens=max_tokens or min(cap, room), temperature=req.temperature,
                                    top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                                    repetition_penalty=req.repetition_penalty,
                                    seed=None if req.seed is None else req.seed + i, stop=tuple(req.stop or ()) + stop)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        jobs.append((ids, params, frozenset() if req.ignore_eos else stop_ids))
    return jobs


async def _respond(runner: Runner, request: Request, req: SamplingFields, jobs: list, model: str, *,
                   chat: bool, echo: list[str] | None = None, chat_format: str | None = None) -> Response:
    handle = runner.submit(jobs, stream=req.stream, steps=req.steps)
    rid = new_id("chatcmpl" if chat else "cmpl")
    headers = {"X-Lmforge-Chat-Format": chat_format} if chat_format else {}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = _sse(runner, handle, rid, model, chat, include_usage, echo, req.n)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    await _wait_all(runner, handle, request)
    failed = [r for r in handle.rows if r.finish_reason == "error"]
    if failed:
        raise ApiError(500, failed[0].error or "generation failed; see the server log", type="server_error")
    choices = [choice_body(i, (echo[i] if echo else "") + r.text, r.finish_reason or "length", chat)
               for i, r in enumerate(handle.rows)]
    n_prompt = sum(len(r.prompt_ids) for r in handle.rows[::req.n])
    use = usage(n_prompt, sum(len(r.tokens) for r in handle.rows))
    extra = {"chat_format": chat_format} if chat_format else None
    return JSONResponse(completion_body(rid, model, choices, use, chat, extra), headers=headers)


async def _next(handle: Handle) -> Event:
    ev = await handle.queue.get()
    if isinstance(ev, Failure):
        raise ApiError(500, ev.message, type="server_error")
    return ev


async def _wait_all(runner: Runner, handle: Handle, request: Request) -> None:
    """Collect until every row has finished; a client that goes away cancels its rows."""
    try:
        while not all(r.finished for r in handle.rows):
            try:
                await asyncio.wait_for(_next(handle), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    runner.cancel(handle)
                    return
    finally:
        if not all(r.finished for r in handle.rows):
            runner.cancel(handle)


async def _sse(runner: Runner, handle: Handle, rid: str, model: str, chat: bool, include_usage: bool,
               echo: list[str] | None, n: int) -> AsyncIterator[bytes]:
    index = {id(r): i for i, r in enumerate(handle.rows)}
    try:
        for i in range(len(handle.rows)):
            first = echo[i] if echo and echo[i] else None
            if chat or first:
                yield _sse_data(chunk_body(rid, model, i, first, None, chat, first=chat))
        left = len(handle.rows)
        while left:
            try:
                ev = await _next(handle)
            except ApiError as err:
                yield _sse_data(err.body())
                break
            finish = ev.row.finish_reason if ev.finished else None
            if ev.delta or finish:
                yield _sse_data(chunk_body(rid, model, index[id(ev.row)], ev.delta, finish, chat))
            left -= ev.finished
        if include_usage:
            n_prompt = sum(len(r.prompt_ids) for r in handle.rows[::n])
            body = chunk_body(rid, model, 0, None, None, chat)
            body["choices"], body["usage"] = [], usage(n_prompt, sum(len(r.tokens) for r in handle.rows))
            yield _sse_data(body)
        yield b"data: [DONE]\n\n"
    finally:  # normal end, or the client disconnected and the response task was cancelled
        if not all(r.finished for r in handle.rows):
            runner.cancel(handle)


def _sse_data(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def default_model_name(ckpt_path: str) -> str:
    """runs/NAME/checkpoints/step_000500 → NAME; any other dir → its own name."""
    from pathlib import Path

    p = Path(ckpt_path).resolve()
    return p.parent.parent.name if p.parent.name == "checkpoints" else p.name


def serve(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", dtype: str | None = None, quantize: str | None = None,
          model_name: str | None = None, max_batch: int = 16, max_queue: int = 64, max_tokens: int = 0,
          compile: bool = False, step_delay_s: float = 0.0, steps: int = 32, log=print) -> None:
    """Load a checkpoint and serve it until interrupted; a diffusion model with `steps` denoising steps."""
    import uvicorn

    from lmforge.generate import load_for_inference
    from lmforge.runtime import resolve_device

    model, tok, state = load_for_inference(ckpt, resolve_device(device), dtype=dtype, quantize=quantize)
    name = model_name or default_model_name(state["path"])
    cfg = ServeConfig(model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                      max_tokens_cap=max_tokens, compile=compile, step_delay_s=step_delay_s, diffusion_steps=steps)
    app = create_app(model, tok, cfg)
    kind = f"; a diffusion model, {steps} denoising steps" if model.cfg.objective == "diffusion" else ""
    log(f"serving {name} ({state['path']}{kind}) at http://{host}:{port}/v1  (docs: http://{host}:{port}/docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
