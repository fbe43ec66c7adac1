"""``exar-edge serve``: the EXAR loop behind an OpenAI-compatible HTTP API.

A thin layer over the session of ``exar-edge ask``: FastAPI parses and checks each request
(pydantic), ONE worker thread answers them one at a time, in the order they were admitted,
through the one llama.cpp runtime (its per-role KV caches reused across requests), and uvicorn
serves it. At most ``queue_size`` requests wait while one is answered; more get 503 with
Retry-After.

    POST /v1/chat/completions   the last user message is the question; system/developer messages and
                                earlier user messages are the context passage (assistant and tool
                                messages are not used)
    POST /v1/completions        the prompt is the question
    GET  /v1/models             the one model (the run's folder name)
    GET  /health                no key needed: status and queue

``stream: true`` sends the final answer as SSE chunks in the OpenAI format (the loop validates an
answer before it is given, so nothing streams while it runs). Beside ``choices`` each response
(the last chunk, when streamed) has ``exar``: the loop's trace as ``exar-edge ask --json`` gives
it, without question and context, plus ``request`` (the n-th request admitted), ``served`` (the
n-th the runtime started), ``queue_ms`` (waiting) and ``latency_ms`` (admission to answer).

Per request: ``exar: {max_rounds, threshold, on_reject}``, and the OpenAI fields ``temperature``,
``top_p``, ``seed``, ``max_tokens``/``max_completion_tokens`` (these lower the server's
``--max-new-tokens``, never raise it); other OpenAI fields are accepted and ignored. When nothing
passes the validator and ``on_reject`` is ``abstain``, the content is ``ABSTAIN_MESSAGE`` and
``finish_reason`` is ``"abstain"``.

Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 bad JSON or fields, 401 API
key, 404/405 no such endpoint, 413 body over the limit, 503 queue full or shutting down (with
Retry-After), 504 no answer within the timeout (a request still waiting is dropped; one being
answered finishes unseen, llama.cpp cannot stop mid-answer), 500 an exar bug (one line, no
traceback).
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from exar import __version__, constants
from exar.edge.session import Session, check_text
from exar.errors import ExarError

ABSTAIN_MESSAGE = "I don't know: no answer passed the validator."
ABSTAIN_FINISH_REASON = "abstain"
CONTEXT_ROLES = ("system", "developer", "user")
M_ARENA_MAX = -8  # glibc malloc.h


@dataclass(frozen=True)
class ServeOptions:
    """How the server treats requests (the loop's own settings live in the session)."""

    model_id: str = "exar"
    api_key: str | None = None
    queue_size: int = constants.SERVE_QUEUE
    timeout_s: float = constants.SERVE_TIMEOUT_S
    max_body_bytes: int = constants.SERVE_MAX_BODY_KIB * 1024


# --- requests -----------------------------------------------------------------------------------

class ExarOptions(BaseModel):
    """The body's ``exar`` object: this request's loop settings (unset: the server's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_rounds: int | None = Field(None, ge=1, le=constants.SERVE_MAX_ROUNDS)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    on_reject: Literal[constants.ON_REJECT] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Body(BaseModel):
    """What chat and text completions share; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    exar: ExarOptions | None = None

    def loop_overrides(self, max_tokens: int | None) -> dict:
        """LoopSettings fields this request sets (None: keep the server's)."""
        chosen = self.exar or ExarOptions()
        return {"max_rounds": chosen.max_rounds, "threshold": chosen.threshold, "on_reject": chosen.on_reject,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "max_new_tokens": max_tokens}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value):
        """OpenAI's list of content parts, when they are all text, as one string."""
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in value):
                raise ValueError("must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...}); "
                                 "exar answers text only")
            return "".join(p["text"] for p in value)
        return value


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def question_and_context(self) -> tuple[str, str]:
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise ApiError(400, "'messages': no user message (the last user message is the question)", param="messages")
        last = users[-1]
        question = check_text(self.messages[last].content, f"'messages.{last}.content' (the question)")
        passages = [m.content for m in self.messages[:last] if m.role in CONTEXT_ROLES and (m.content or "").strip()]
        return question, "\n\n".join(passages)


class CompletionRequest(_Body):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if not isinstance(value, str):
            raise ValueError("must be a string (or a list of one string)")
        return value


# --- errors -------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered in the OpenAI format: one message, a type, the field it is about, a code."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded",
             504: "timeout", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                 "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's first complaint about a body as one line naming the field."""
    error = errors[0]
    loc = [str(part) for part in error["loc"]]
    loc = loc[1:] if loc[:1] == ["body"] else loc
    if error["type"] == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "decode error")
        return ApiError(400, f"the body is not valid JSON ({reason})", code="invalid_json")
    if not loc:
        return ApiError(400, "the body must be a JSON object" if error["type"] != "missing" else "the request has no "
                        "JSON body", code="invalid_body")
    param = ".".join(loc)
    if error["type"] == "extra_forbidden":
        known = ", ".join(ExarOptions.model_fields)
        return ApiError(400, f"'{param}': unknown setting (known: {known})", param=param)
    return ApiError(400, f"'{param}': {error['msg'].removeprefix('Value error, ')}", param=param)


# --- the queue ----------------------------------------------------------------------------------

@dataclass
class Ticket:
    """One admitted request: its number, when it was admitted and started, its place among those served."""

    number: int
    admitted: float
    started: float | None = None
    served: int | None = None


class AnswerQueue:
    """One worker thread in front of one runtime: jobs run one at a time in the order admitted;
    at most ``size`` wait while one runs; a waiting job can be dropped (its future cancelled)."""

    def __init__(self, size: int):
        self.size = size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exar-serve")
        self._lock = threading.Lock()
        self._pending = 0
        self._busy_s = 0.0
        self.admitted = self.served = self.dropped = 0
        self.closing = False

    def submit(self, fn: Callable, *args) -> tuple[Future, Ticket]:
        with self._lock:
            if self.closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down",
                               headers={"Retry-After": "5"})
            if self._pending > self.size:
                raise ApiError(503, f"the queue is full ({self.size} requests waiting); retry later", code="queue_full",
                               headers={"Retry-After": str(self._retry_after())})
            self._pending += 1
            self.admitted += 1
            ticket = Ticket(self.admitted, time.perf_counter())
            future = self._executor.submit(self._run, ticket, fn, args)
        future.add_done_callback(self._finished)
        return future, ticket

    def _run(self, ticket: Ticket, fn: Callable, args: tuple):
        with self._lock:
            self.served += 1
            ticket.served = self.served
        ticket.started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._busy_s += time.perf_counter() - ticket.started

    def _finished(self, future: Future) -> None:
        with self._lock:
            self._pending -= 1
            self.dropped += future.cancelled()

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean answer time so far times the jobs ahead."""
        mean = self._busy_s / self.served if self.served else 1.0
        return max(1, math.ceil(mean * self._pending))

    @property
    def waiting(self) -> int:
        with self._lock:
            return max(0, self._pending - 1)

    def drain(self) -> None:
        """Admit nothing more and drop every waiting job; the one running finishes."""
        with self._lock:
            self.closing = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """``drain``, then wait for the running job."""
        self.drain()
        self._executor.shutdown(wait=True)


# --- the app ------------------------------------------------------------------------------------

class _Answerer:
    """The worker's side: the loop on the shared runtime with one request's settings."""

    def __init__(self, session: Session):
        self.session = session

    def settings_for(self, overrides: dict):
        try:
            return replace(self.session.settings, **{k: v for k, v in overrides.items() if v is not None})
        except ExarError as e:
            raise ApiError(400, f"'exar': {e}", param="exar") from None

    def __call__(self, question: str, context: str, settings) -> tuple[dict, int]:
        """(the ask --json result, prompt tokens the loop evaluated or took from the KV cache)."""
        counts = self.session.runtime.prompt_tokens
        before = sum(counts.values())
        result = replace(self.session, settings=settings).ask(question, context)
        return result, sum(counts.values()) - before


def create_app(session: Session, options: ServeOptions = ServeOptions()) -> FastAPI:
    """The ASGI app over ``session``; ``app.state.queue`` is its AnswerQueue (close it when done)."""
    app = FastAPI(title="exar-edge serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=options.max_body_bytes)
    app.state.queue = queue = AnswerQueue(options.queue_size)
    answerer = _Answerer(session)
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if options.api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), options.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send the header `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return error.response()

    @app.exception_handler(ExarError)
    async def _bad_input(request, error: ExarError):
        return ApiError(400, str(error)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        media_type = request.headers.get("content-type", "").split(";")[0].strip()
        if not media_type.endswith("json"):
            return ApiError(400, f"the body must be JSON sent as `Content-Type: application/json` (got "
                                 f"{media_type or 'no Content-Type'})", code="invalid_body").response()
        return validation_error(list(error.errors())).response()

    @app.exception_handler(HTTPException)
    async def _http(request, error: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}",
                   413: f"the body is larger than the server's limit of {options.max_body_bytes} bytes"}
        return ApiError(error.status_code, message.get(error.status_code, str(error.detail)),
                        code={413: "body_too_large"}.get(error.status_code), headers=error.headers).response()

    async def answer(request: Request, body: _Body, question: str, context: str, max_tokens: int | None):
        settings = answerer.settings_for(body.loop_overrides(
            None if max_tokens is None else min(max_tokens, session.settings.max_new_tokens)))
        future, ticket = queue.submit(answerer, question, context, settings)
        result, prompt_tokens = await _wait(request, future, ticket, options.timeout_s)
        now = time.perf_counter()
        trace = {k: v for k, v in result.items() if k not in ("question", "context")}
        trace.update(request=ticket.number, served=ticket.served,
                     queue_ms=round((ticket.started - ticket.admitted) * 1000.0, 3),
                     latency_ms=round((now - ticket.admitted) * 1000.0, 3))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": result["tokens"],
                 "total_tokens": prompt_tokens + result["tokens"]}
        abstained = result["answer"] is None
        return (ABSTAIN_MESSAGE if abstained else result["answer"],
                ABSTAIN_FINISH_REASON if abstained else "stop", trace, usage)

    def envelope(kind: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": options.model_id}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        question, context = body.question_and_context()
        text, finish, trace, usage = await answer(request, body, question, context,
                                                  body.max_completion_tokens or body.max_tokens)
        head = envelope("chat.completion", "chatcmpl")
        if not body.stream:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return {**head, "choices": [choice], "usage": usage, "exar": trace}
        head["object"] = "chat.completion.chunk"
        deltas = [{"role": "assistant", "content": ""}] + [{"content": piece} for piece in _pieces(text)]
        chunks = [{**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
                  for d in deltas]
        chunks.append({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}],
                       "exar": trace})
        return _stream(chunks, head, usage, body)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        text, finish, trace, usage = await answer(request, body, check_text(body.prompt, "'prompt'"), "",
                                                  body.max_tokens)
        head = envelope("text_completion", "cmpl")
        if not body.stream:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], "usage": usage, "exar": trace}
        chunks = [{**head, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]}
                  for piece in _pieces(text)]
        chunks.append({**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}],
                       "exar": trace})
        return _stream(chunks, head, usage, body)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        runtime = session.runtime
        return {"object": "list", "data": [{"id": options.model_id, "object": "model", "created": 0,
                                            "owned_by": "exar", "mode": runtime.models.mode,
                                            "quant": runtime.models.quant}]}

    @app.get("/health")
    async def health():
        status = "shutting down" if queue.closing else "ok"
        return JSONResponse({"status": status, "model": options.model_id, "waiting": queue.waiting,
                             "queue_size": queue.size, "answered": queue.served, "dropped": queue.dropped},
                            status_code=503 if queue.closing else 200)

    return app


def _pieces(text: str) -> list[str]:
    """The answer in word-sized chunks that join back to exactly the answer."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]


def _stream(chunks: list[dict], head: dict, usage: dict, body: _Body) -> EventSourceResponse:
    if body.stream_options is not None and body.stream_options.include_usage:
        chunks = chunks + [{**head, "choices": [], "usage": usage}]

    async def events():
        for chunk in chunks:
            yield {"data": json.dumps(chunk)}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())


async def _wait(request: Request, future: Future, ticket: Ticket, timeout_s: float):
    """The job's result, or an ApiError: timeout (504), shutting down (503), bad input (400), a bug (500).

    A request whose client hangs up while it waits is dropped from the queue.
    """
    waiter = asyncio.wrap_future(future)
    hung_up = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, hung_up}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung_up.cancel()
    if waiter not in done:
        future.cancel()  # drops the job while it still waits (now, before the answer goes out)
        waiter.cancel()
        if hung_up in done:
            raise ApiError(499, "the client closed the connection")
        where = "while it waited in the queue" if ticket.started is None else "while it was being answered"
        raise ApiError(504, f"no answer within the server's timeout of {timeout_s:g} s ({where}); retry later, "
                            "or ask the operator to raise --timeout", code="timeout")
    if future.cancelled():
        raise ApiError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
    error = future.exception()
    if isinstance(error, ApiError):
        raise error
    if isinstance(error, ExarError):
        raise ApiError(400, str(error))
    if error is not None:
        _log_bug(error)
        raise ApiError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error")
    return future.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _log_bug(error: BaseException) -> None:
    if os.environ.get("EXAR_DEBUG"):
        traceback.print_exception(error)
    else:
        print(f"error: {type(error).__name__}: {error} (rerun with --debug for the traceback)", file=sys.stderr)


# --- serving ------------------------------------------------------------------------------------

def listen(host: str = constants.SERVE_HOST, port: int = constants.SERVE_PORT) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port), or an ExarError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ExarError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ExarError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0 picks a free one)") \
            from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


class Server(uvicorn.Server):
    """uvicorn's server over the app; on SIGINT/SIGTERM the queue also stops admitting and drops what
    waits (503), while the answer under way finishes and is sent."""

    def __init__(self, app: FastAPI, *, verbose: bool = False):
        super().__init__(uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                                        lifespan="off", server_header=False))
        self.queue: AnswerQueue = app.state.queue
        self.stop_signal: str | None = None

    def handle_exit(self, sig: int, frame) -> None:
        self.stop_signal = signal.Signals(sig).name
        super().handle_exit(sig, frame)
        try:  # a signal handler must not take the queue's locks itself: the loop thread does it
            asyncio.get_running_loop().call_soon_threadsafe(self.queue.drain)
        except RuntimeError:
            self.queue.drain()


@contextmanager
def _stop_without_reraise():
    """uvicorn re-raises a caught SIGINT/SIGTERM once it has shut down; here that ends serving normally."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def one_malloc_arena() -> None:
    """Make glibc's malloc keep one heap for all threads (no-op elsewhere).

    With a heap per thread, what the worker allocates and the event loop frees keeps resident
    memory creeping up request after request (measured: +25% over 1800 requests on the tiny run;
    flat with one arena, see bench/RESULTS.md). Call it before the worker thread starts.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def serve(session: Session, sock: socket.socket, options: ServeOptions = ServeOptions(), *, verbose: bool = False,
          echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
    """Serve ``session`` on the listening ``sock`` (see ``listen``) until SIGINT/SIGTERM."""
    one_malloc_arena()
    app = create_app(session, options)
    server = Server(app, verbose=verbose)
    models = session.runtime.models
    where = ("this machine only (--host 0.0.0.0 serves the network)" if is_loopback(sock)
             else "the network" + ("" if options.api_key else "; warning: no --api-key, anyone who can reach it may use it"))
    echo(f"exar-edge serve: {options.model_id} ({models.mode} {models.quant}, {session.runtime.threads} threads) at "
         f"{url_of(sock)}, {where}; API key {'required' if options.api_key else 'not required'}; Ctrl-C stops")
    try:
        with _stop_without_reraise():
            server.run(sockets=[sock])
    finally:
        app.state.queue.close()
        sock.close()
    queue = app.state.queue
    echo(f"exar-edge serve: stopped{f' on {server.stop_signal}' if server.stop_signal else ''}; "
         f"{queue.served} requests answered, {queue.dropped} dropped")

