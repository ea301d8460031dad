"""`kvant serve`: an OpenAI-compatible local server for one artifact, with NorMistral's exact
tokens.

FastAPI and uvicorn do the HTTP; kvant.generation does the tokens (the core `kvant generate`
uses). Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (streamed as
server-sent events when asked), llama-server's `/tokenize` and `/detokenize`, and `/health`.
Why not llama-cpp-python's own server: it tokenizes with llama.cpp's tokenizer (wrong ids
for NorMistral) and streams token by token (lost spaces; see kvant.generation).

Errors are OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``): a 4xx
status for a bad request, 500 for the server's own failure; the server keeps serving. One
model context serves all requests: they queue (kvant.generation.Completion holds the
engine's lock while it generates).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from kvant.errors import KvantError
from kvant.generation import CHAT_STOP, ContextError, Engine, Sampling, chat_prompt

logger = logging.getLogger(__name__)


class _Request(BaseModel):
    """What OpenAI clients send; fields Kvant does not act on (penalties, user, ...) are
    accepted and ignored, as llama-server does."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default
    echo: Literal[False] = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] = ""


class ChatRequest(_Request):
    messages: list[Message]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str
    add_special: bool = True  # llama-server's default is False; NorMistral expects <s>


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = (status, message, code,
                                                                         param, kind)


def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


class _Reply:
    """One response's id and time, and its choice-0 objects in OpenAI's envelope."""

    def __init__(self, model: str, prefix: str, obj: str):
        self.model, self.obj = model, obj
        self.ident, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def __call__(self, choice: dict, finish: str | None, obj: str | None = None) -> dict:
        return {"id": self.ident, "object": obj or self.obj, "created": self.created,
                "model": self.model, "choices": [{"index": 0, **choice, "logprobs": None,
                                                  "finish_reason": finish}]}


def _sse(chunks: Iterator[dict]) -> Iterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``engine`` (loaded by the caller)."""
    app = FastAPI(title="Kvant", description=f"NorMistral ({engine.name}), exact tokens")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                           "with the key the server was started with", "invalid_api_key",
                           kind="authentication_error")

    @app.exception_handler(APIError)
    def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.code, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", "invalid_json")
        return _error(400, f"{where or 'body'}: {first.get('msg')}", "invalid_value",
                      where or None)

    @app.exception_handler(HTTPException)
    def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    def _failure(request: Request, exc: Exception) -> JSONResponse:
        # anything else is the server's fault: OpenAI's shape too, so clients show the
        # message; uvicorn still logs the traceback
        return _error(500, f"the server failed on this request ({type(exc).__name__}: "
                      f"{exc}); see the server's log", "internal_error", kind="server_error")

    def check_model(name: str | None) -> None:
        if name not in (None, "", engine.name):
            raise APIError(404, f"model '{name}' is not served here; this server serves "
                           f"'{engine.name}' (GET /v1/models)", "model_not_found", "model")

    def start(prompt, req: _Request, stop: tuple[str, ...], param: str):
        """The completion for a request, or the 400 that explains why not."""
        check_model(req.model)
        limit = req.max_completion_tokens or req.max_tokens or engine.n_ctx
        try:
            return engine.complete(prompt, limit, stop, req.sampling())
        except ContextError as exc:
            raise APIError(400, str(exc), "context_length_exceeded", param) from exc
        except KvantError as exc:
            raise APIError(400, str(exc), "invalid_value") from exc

    def usage(completion) -> dict:
        return {"prompt_tokens": len(completion.ids), "completion_tokens": completion.n_new,
                "total_tokens": len(completion.ids) + completion.n_new}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                            "created": int(time.time()), "owned_by": "kvant",
                                            "context_length": engine.n_ctx}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    def completions(req: CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request: send a string", "invalid_value",
                               "prompt")
            prompt = prompt[0]
        completion = start(prompt, req, req.stops(), "prompt")
        reply = _Reply(engine.name, "cmpl", "text_completion")
        if req.stream:
            def chunks() -> Iterator[dict]:
                for piece in completion:
                    yield reply({"text": piece}, None)
                yield reply({"text": ""}, completion.finish_reason)
            return StreamingResponse(_sse(chunks()), media_type="text/event-stream")
        text = "".join(completion)
        return {**reply({"text": text}, completion.finish_reason), "usage": usage(completion)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    def chat(req: ChatRequest):
        try:
            prompt = chat_prompt([m.model_dump() for m in req.messages])
        except KvantError as exc:
            raise APIError(400, str(exc), "invalid_value", "messages") from exc
        completion = start(prompt, req, (*CHAT_STOP, *req.stops()), "messages")
        reply = _Reply(engine.name, "chatcmpl", "chat.completion.chunk")
        if req.stream:
            def chunks() -> Iterator[dict]:
                yield reply({"delta": {"role": "assistant", "content": ""}}, None)
                started = False
                for piece in completion:
                    if not started:  # the space after "Assistent:" (see below)
                        piece = piece.lstrip(" ")
                        started = bool(piece)
                    if piece:
                        yield reply({"delta": {"content": piece}}, None)
                yield reply({"delta": {}}, completion.finish_reason)
            return StreamingResponse(_sse(chunks()), media_type="text/event-stream")
        # the format puts a space after "Assistent:"; it belongs to the format, not the answer
        text = "".join(completion).lstrip(" ")
        message = {"message": {"role": "assistant", "content": text}}
        return {**reply(message, completion.finish_reason, "chat.completion"),
                "usage": usage(completion)}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    def tokenize(req: TokenizeRequest) -> dict:
        return {"tokens": engine.encode(req.content, req.add_special)}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    def detokenize(req: DetokenizeRequest) -> dict:
        vocab = engine.tokenizer.get_vocab_size()
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0-{vocab - 1})",
                           "invalid_value", "tokens")
        return {"content": engine.decode(req.tokens)}

    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None) -> None:
    """Load ``engine`` and serve it until interrupted."""
    import uvicorn  # the server process only

    engine.load()
    logger.info("serving %s on http://%s:%d/v1 (context %d tokens)", engine.name, host, port,
                engine.n_ctx)
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning")
