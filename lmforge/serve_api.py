"""The OpenAI-compatible wire format: request schemas, response bodies, the error envelope and its handlers."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 4
log = logging.getLogger("lmforge.serve")


class ApiError(Exception):
    """An HTTP error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI clients may send extras."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="lmforge extension: keep the k most likely tokens")
    min_p: float = Field(0.0, ge=0, lt=1, description="lmforge extension")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="lmforge extension")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="accepted; only 0 is supported")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="accepted; only 0 is supported")
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(False, description="lmforge extension: generate max_tokens even past <|eos|>")
    steps: int | None = Field(None, ge=1, le=4096, description="lmforge extension, diffusion models: denoising "
                              "steps (default: the server's --steps); ignored by autoregressive models")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return [s for s in stops if s]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(..., description="text, texts, or token ids")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="not supported; must be null")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None, chat: bool,
                    extra: dict | None = None) -> dict[str, Any]:
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return {**body, **(extra or {})}


def chunk_body(rid: str, model: str, index: int, delta: str | None, finish: str | None, chat: bool,
               first: bool = False) -> dict[str, Any]:
    if chat:
        d: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if delta:
            d["content"] = delta
        choice = {"index": index, "delta": d, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def choice_body(index: int, text: str, finish: str, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def install_errors(app: FastAPI) -> None:
    """Every error the app sends, in the envelope above: ApiError, invalid requests (400, not 422), crashes."""

    @app.exception_handler(ApiError)
    async def api_error(_req: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param or 'request'}: {first.get('msg')}", param=param), status_code=400)

    @app.exception_handler(Exception)
    async def crash(_req: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {err}", type="server_error"), status_code=500)


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, with its 422 validation responses replaced by the 400 this server sends."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema
