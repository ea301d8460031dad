"""`kvant serve`: an OpenAI-compatible local server for one artifact, with NorMistral's exact
tokens.

FastAPI and uvicorn do the HTTP; kvant.engine does the tokens (the core `kvant generate`
uses). Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (streamed as
server-sent events when asked), llama-server's `/tokenize` and `/detokenize`, and `/health`.
Why not llama-cpp-python's own server: it tokenizes with llama.cpp's tokenizer (wrong ids
for NorMistral) and streams token by token (lost spaces; see kvant.engine).

Errors are OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``): a 4xx
status for a bad request, 503 with Retry-After when the queue is full, 500 for the server's
own failure; a failure in the middle of a stream is an error event, then `[DONE]`. The
server keeps serving.

One model context serves all requests, so generation is decoupled from sending
(:class:`Generator`): one thread runs the jobs in turn, each into its own buffer that the
request's coroutine sends from. A client that stops reading holds only its own response;
one that disconnects cancels its generation; at most ``max_queue`` requests wait, and
`/health` never waits on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from kvant.engine import CHAT_STOP, ContextError, Engine, Sampling, chat_prompt
from kvant.errors import KvantError

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
                 param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = (status, message, code,
                                                                         param, kind)
        self.headers = headers


def _body(message: str, code: str | None = None, param: str | None = None,
          kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_body(message, code, param, kind), status_code=status, headers=headers)


def _failure_body(exc: BaseException) -> dict:
    return _body(f"the server failed on this request ({type(exc).__name__}: {exc}); see the "
                 "server's log", "internal_error", kind="server_error")


_END = object()


class Job:
    """One request's generation: its pieces, put by the generator thread into an asyncio
    queue of the request's event loop, then the end (or the exception that ended it)."""

    def __init__(self, completion, loop: asyncio.AbstractEventLoop):
        self.completion, self.loop = completion, loop
        self.pieces: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, item)

    def cancel(self) -> None:
        self.completion.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        while (item := await self.pieces.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Generator:
    """The one thread that generates: jobs wait in a bounded queue and run one at a time,
    whatever their clients do meanwhile."""

    def __init__(self, max_queue: int):
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running: Job | None = None
        self.thread = threading.Thread(target=self._run, name="kvant-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.waiting.maxsize} requests are already "
                           "waiting; retry shortly (see Retry-After)", "server_busy",
                           kind="server_error", headers={"Retry-After": "2"}) from None
        return job

    def _run(self) -> None:
        while True:
            job = self.waiting.get()
            self.running = job
            try:
                if not job.completion.cancelled.is_set():  # its client left while it waited
                    for piece in job.completion:
                        job.put(piece)
                job.put(_END)
            except Exception as exc:  # reported to the request, logged; the thread goes on
                logger.exception("generation failed")
                job.put(exc)
            finally:
                self.running = None


class _Reply:
    """One response's id and time, and its choice-0 objects in OpenAI's envelope."""

    def __init__(self, model: str, prefix: str, obj: str):
        self.model, self.obj = model, obj
        self.ident, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def __call__(self, choice: dict, finish: str | None, obj: str | None = None) -> dict:
        return {"id": self.ident, "object": obj or self.obj, "created": self.created,
                "model": self.model, "choices": [{"index": 0, **choice, "logprobs": None,
                                                  "finish_reason": finish}]}


# The routes read what they serve from the application's state (FastAPI's APIRouter and
# app.state, rather than closures over create_app's arguments): engine, generator, api_key.
router = APIRouter()


def authorize(request: Request) -> None:
    api_key = request.app.state.api_key
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                       "with the key the server was started with", "invalid_api_key",
                       kind="authentication_error")


def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.code, exc.param, exc.kind, exc.headers)


def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return _error(400, "the request body is not valid JSON", "invalid_json")
    return _error(400, f"{where or 'body'}: {first.get('msg')}", "invalid_value",
                  where or None)


def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), None)


def _failure(request: Request, exc: Exception) -> JSONResponse:
    # anything else is the server's fault: OpenAI's shape too, so clients show the message;
    # uvicorn still logs the traceback
    return JSONResponse(_failure_body(exc), status_code=500)


HANDLERS = ((APIError, _api_error), (RequestValidationError, _invalid), (HTTPException, _http),
            (Exception, _failure))


def _start(request: Request, prompt, req: _Request, stop: tuple[str, ...],
           param: str) -> Job:
    """The request's generation, queued; or the 400 (503) that explains why not."""
    engine = request.app.state.engine
    if req.model not in (None, "", engine.name):
        raise APIError(404, f"model '{req.model}' is not served here; this server serves "
                       f"'{engine.name}' (GET /v1/models)", "model_not_found", "model")
    limit = req.max_completion_tokens or req.max_tokens or engine.n_ctx
    try:
        completion = engine.complete(prompt, limit, stop, req.sampling())
    except ContextError as exc:
        raise APIError(400, str(exc), "context_length_exceeded", param) from exc
    except KvantError as exc:
        raise APIError(400, str(exc), "invalid_value") from exc
    return request.app.state.generator.submit(Job(completion, asyncio.get_running_loop()))


async def _collect(job: Job, request: Request) -> str:
    """The whole text of a job; a client that disconnects meanwhile cancels it."""
    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return "".join([piece async for piece in job])
    finally:
        watcher.cancel()


def _stream(job: Job, chunks) -> StreamingResponse:
    """Server-sent events of ``chunks(pieces)``; a failure midway is an error event and then
    [DONE]; a client that goes away cancels the generation."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks(job):
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as exc:
            logger.warning("stream failed: %s", exc)
            yield f"data: {json.dumps(_failure_body(exc), ensure_ascii=False)}\n\n"
        finally:  # also when the client disconnected and the response was cancelled
            job.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _usage(completion) -> dict:
    return {"prompt_tokens": len(completion.ids), "completion_tokens": completion.n_new,
            "total_tokens": len(completion.ids) + completion.n_new}


def _check_ids(engine: Engine, ids: list[int], param: str) -> None:
    vocab = engine.tokenizer.get_vocab_size()
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0-{vocab - 1})",
                       "invalid_value", param)


@router.get("/health")
async def health(request: Request) -> dict:
    # on the event loop, never behind the engine: it answers while generation runs
    generator = request.app.state.generator
    return {"status": "ok", "waiting": generator.waiting.qsize(),
            "generating": generator.running is not None}


@router.get("/v1/models", dependencies=[Depends(authorize)])
def models(request: Request) -> dict:
    engine = request.app.state.engine
    return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                        "created": int(time.time()), "owned_by": "kvant",
                                        "context_length": engine.n_ctx}]}


@router.post("/v1/completions", dependencies=[Depends(authorize)])
async def completions(req: CompletionRequest, request: Request):
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request: send a string", "invalid_value",
                           "prompt")
        prompt = prompt[0]
    elif isinstance(prompt, list):
        _check_ids(request.app.state.engine, prompt, "prompt")
    job = _start(request, prompt, req, req.stops(), "prompt")
    completion = job.completion
    reply = _Reply(request.app.state.engine.name, "cmpl", "text_completion")
    if req.stream:
        async def chunks(pieces) -> AsyncIterator[dict]:
            async for piece in pieces:
                yield reply({"text": piece}, None)
            yield reply({"text": ""}, completion.finish_reason)
        return _stream(job, chunks)
    text = await _collect(job, request)
    return {**reply({"text": text}, completion.finish_reason), "usage": _usage(completion)}


@router.post("/v1/chat/completions", dependencies=[Depends(authorize)])
async def chat(req: ChatRequest, request: Request):
    try:
        prompt = chat_prompt([m.model_dump() for m in req.messages])
    except KvantError as exc:
        raise APIError(400, str(exc), "invalid_value", "messages") from exc
    job = _start(request, prompt, req, (*CHAT_STOP, *req.stops()), "messages")
    completion = job.completion
    reply = _Reply(request.app.state.engine.name, "chatcmpl", "chat.completion.chunk")
    if req.stream:
        async def chunks(pieces) -> AsyncIterator[dict]:
            yield reply({"delta": {"role": "assistant", "content": ""}}, None)
            started = False
            async for piece in pieces:
                if not started:  # the space after "Assistent:" (see below)
                    piece = piece.lstrip(" ")
                    started = bool(piece)
                if piece:
                    yield reply({"delta": {"content": piece}}, None)
            yield reply({"delta": {}}, completion.finish_reason)
        return _stream(job, chunks)
    # the format puts a space after "Assistent:"; it belongs to the format, not the answer
    text = (await _collect(job, request)).lstrip(" ")
    message = {"message": {"role": "assistant", "content": text}}
    return {**reply(message, completion.finish_reason, "chat.completion"),
            "usage": _usage(completion)}


@router.post("/tokenize", dependencies=[Depends(authorize)])
def tokenize(req: TokenizeRequest, request: Request) -> dict:
    return {"tokens": request.app.state.engine.encode(req.content, req.add_special)}


@router.post("/detokenize", dependencies=[Depends(authorize)])
def detokenize(req: DetokenizeRequest, request: Request) -> dict:
    _check_ids(request.app.state.engine, req.tokens, "tokens")
    return {"content": request.app.state.engine.decode(req.tokens)}


def create_app(engine: Engine, api_key: str | None = None, max_queue: int = 8) -> FastAPI:
    """The FastAPI application serving ``engine`` (loaded by the caller). With an API key,
    the interactive docs and the OpenAPI schema are off (they would answer without it)."""
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Kvant", description=f"NorMistral ({engine.name}), exact tokens",
                  **docs)
    app.state.engine, app.state.api_key = engine, api_key
    app.state.generator = Generator(max_queue)
    for exc_type, handler in HANDLERS:
        app.add_exception_handler(exc_type, handler)
    app.include_router(router)
    return app


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, max_queue: int = 8) -> None:
    """Load ``engine`` and serve it until interrupted."""
    import uvicorn  # the server process only

    engine.load()
    logger.info("serving %s on http://%s:%d/v1 (context %d tokens)", engine.name, host, port,
                engine.n_ctx)
    uvicorn.run(create_app(engine, api_key, max_queue), host=host, port=port,
                log_level="warning")
