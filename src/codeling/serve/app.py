"""An OpenAI-compatible HTTP API over the decoding engine, built with FastAPI.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /v1/models/{model}` and `GET /health`. Both completion routes stream server-sent events in
OpenAI's chunk format when `stream` is true, ending with `data: [DONE]`.

Two more routes are a codeling extension, not part of OpenAI's API: `GET /v1/tools` lists the
tools the server can execute, and `POST /v1/tools/execute` runs one tool call on the server
machine with a `ToolBox` (sandboxed, confined to one working directory). The web chat page
uses them to execute the tool calls that the model writes.

Every error, including malformed JSON, wrong field types and unknown routes, gets OpenAI's error
body `{"error": {"message", "type", "param", "code"}}` and is logged with the request id, which
the response also carries in the `x-request-id` header. Request bodies are parsed here with
pydantic instead of by FastAPI, so invalid fields get status 400 as in OpenAI's API, not 422.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codeling import chat
from codeling.chat import ChatFormatError
from codeling.inference.engine import (FINISH_CANCELLED, FINISH_ERROR, Engine, EngineError,
                                       EngineOverloadedError, EngineStoppedError, Event,
                                       Finished, PromptTooLongError, RequestHandle,
                                       SamplingParams, TextDelta)
from codeling.tools import ToolBox, error_result

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_STOP_STRINGS = 4  # as in OpenAI's API
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks for a gone client
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# -- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """Return the JSON body `{"error": {...}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def request_id_of(request: Request) -> str:
    """Return the id that `RequestIdMiddleware` gave the request."""
    return getattr(request.state, "request_id", "unknown")


class RequestIdMiddleware:
    """Give every HTTP request an id, stored in `request.state` and sent as `x-request-id`.

    A plain ASGI middleware, because Starlette's BaseHTTPMiddleware wraps streaming responses in
    a way that delays the cancellation of a stream whose client has gone.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{uuid.uuid4().hex[:24]}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _error_response(request: Request, error: APIError) -> JSONResponse:
    log.warning("request %s: %s %s -> %d %s: %s", request_id_of(request), request.method,
                request.url.path, error.status, error.code or error.type, error.message)
    return JSONResponse(error.body(), status_code=error.status)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(request, error)

    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            api_error = APIError(404, f"unknown request URL: {request.method} {request.url.path}; "
                                 "see GET /v1/models and the OpenAI API routes",
                                 code="unknown_url")
        elif error.status_code == 405:
            api_error = APIError(405, f"method {request.method} is not allowed on "
                                 f"{request.url.path}", code="method_not_allowed")
        else:
            api_error = APIError(error.status_code, str(error.detail))
        return _error_response(request, api_error)

    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(request, APIError(400, f"invalid request: {error.errors()}"))

    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        log.error("request %s: %s %s failed", request_id, request.method, request.url.path,
                  exc_info=error)
        body = APIError(500, f"internal server error; the server log has the details under "
                        f"request id {request_id}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected_error)


# -- request bodies -----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Body(BaseModel):
    # strict: no string-to-number coercion. Unknown fields are ignored, as OpenAI's API does for
    # fields newer than this server; known fields this server cannot honor are rejected below.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # a signed 64-bit integer
    top_k: int | None = Field(None, ge=0)  # not in OpenAI's API; vLLM accepts it too
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


def _parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Validate a JSON body; raise APIError 400 with the first problem in OpenAI's words."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        if problem["type"] == "json_invalid":
            detail = problem.get("ctx", {}).get("error", "invalid JSON")
            raise APIError(400, f"the request body is not valid JSON ({detail}); send a JSON "
                           "object with Content-Type: application/json") from None
        if not problem["loc"] or problem["type"] == "model_type":
            raise APIError(400, "the request body must be a JSON object") from None
        param = _loc_to_param(problem["loc"])
        if problem["type"] == "missing":
            raise APIError(400, f"missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter") from None
        value = json.dumps(problem.get("input"))[:100]
        raise APIError(400, f"invalid value for '{param}': {problem['msg'].lower()}, got {value}",
                       param=param, code="invalid_value") from None


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    """Turn a pydantic location such as ('messages', 0, 'role') into messages[0].role."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in ("str", "list[str]", "int", "float", "bool") or "[" in str(part):
            continue  # the union member pydantic tried, not a field name
        else:
            param += f".{part}" if param else str(part)
    return param


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body; raise APIError 413 when it is larger than `limit` bytes."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes; send a smaller "
                         "request", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _reject_unsupported(body: _Body) -> None:
    """Raise APIError 400 for parameters this server accepts in form but cannot honor."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server; leave it at 0",
                           param=name, code="unsupported_parameter")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                       code="unsupported_parameter")


def _reject_unsupported_chat(body: ChatCompletionBody) -> None:
    _reject_unsupported(body)
    for name in ("functions", "function_call"):
        if getattr(body, name):
            raise APIError(400, f"{name} is the deprecated form of tools; send tools and "
                           "tool_choice instead", param=name, code="unsupported_parameter")
    if body.tool_choice not in (None, "auto", "none"):
        raise APIError(400, f"tool_choice {body.tool_choice!r} is not supported; use \"auto\" "
                       "(the model decides) or \"none\"", param="tool_choice",
                       code="unsupported_parameter")
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported",
                       param="response_format", code="unsupported_parameter")


def _reject_unsupported_completion(body: CompletionBody) -> None:
    _reject_unsupported(body)
    if body.logprobs is not None:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    if body.echo:
        raise APIError(400, "echo is not supported by this server", param="echo",
                       code="unsupported_parameter")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this server",
                       param="suffix", code="unsupported_parameter")
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported by this server; use n", param="best_of",
                       code="unsupported_parameter")


# -- running requests ---------------------------------------------------------------------------


@dataclass
class _Run:
    """The engine requests behind one API request: one per prompt, each with n choices."""

    handles: list[RequestHandle]
    events: asyncio.Queue[tuple[int, Event]]
    n: int
    checked_at: float = field(default_factory=time.monotonic)  # last check for a disconnect

    @property
    def choices(self) -> int:
        return len(self.handles) * self.n

    def usage(self) -> dict[str, int]:
        prompt = sum(handle.prompt_tokens for handle in self.handles)
        completion = sum(handle.completion_tokens for handle in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def cancel(self) -> None:
        for handle in self.handles:
            if not handle.finished:
                handle.cancel()


class _Server:
    """The state the route handlers share: the engine, the model name and the limits."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, max_n: int,
                 max_body_bytes: int):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.max_n = max_n
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                           f"'{self.model_name}'", param="model", code="model_not_found")

    def sampling_params(self, body: _Body, max_tokens: int | None) -> SamplingParams:
        n = body.n if body.n is not None else 1
        if n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}, got {n}", param="n",
                           code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop has {len(stops)} strings; send at most "
                           f"{MAX_STOP_STRINGS}", param="stop", code="invalid_value")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            stop=tuple(stop for stop in stops if stop),
            seed=body.seed, n=n)

    def submit(self, prompts: list[list[int]], params: SamplingParams, request_id: str,
               prompt_param: str) -> _Run:
        """Submit one engine request per prompt, all reporting to one asyncio queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        handles: list[RequestHandle] = []

        def deliver_to(prompt_index: int) -> Callable[[Event], None]:
            def deliver(event: Event) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (prompt_index, event))
            return deliver

        try:
            for index, prompt in enumerate(prompts):
                suffix = f"-{index}" if len(prompts) > 1 else ""
                handles.append(self.engine.submit(prompt, params, on_event=deliver_to(index),
                                                  request_id=request_id + suffix))
        except EngineError as error:
            for handle in handles:
                handle.cancel()
            raise _engine_api_error(error, prompt_param) from None
        return _Run(handles, events, params.n)


def _engine_api_error(error: EngineError, prompt_param: str) -> APIError:
    if isinstance(error, PromptTooLongError):
        return APIError(400, f"this model's maximum context length is {error.context_length} "
                        f"tokens, but the prompt is {error.prompt_tokens} tokens and at least "
                        "one token must remain for the completion; shorten the prompt",
                        param=prompt_param, code="context_length_exceeded")
    if isinstance(error, EngineOverloadedError):
        return APIError(503, str(error), type="server_error", code="server_overloaded")
    if isinstance(error, EngineStoppedError):
        return APIError(503, "the server is shutting down; retry on another instance",
                        type="server_error", code="server_unavailable")
    return APIError(400, str(error), code="invalid_value")


async def _next_event(run: _Run, request: Request) -> tuple[int, Event]:
    """Wait for the next event; every DISCONNECT_POLL_S, check that the client is connected."""
    while True:
        now = time.monotonic()
        if now - run.checked_at >= DISCONNECT_POLL_S:
            run.checked_at = now
            if await request.is_disconnected():
                raise ClientDisconnected()
        if not run.events.empty():
            return run.events.get_nowait()  # skips the cost of wait_for's task under load
        try:
            return await asyncio.wait_for(run.events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue


async def _batches(run: _Run,
                   request: Request) -> AsyncIterator[list[tuple[int, TextDelta | Finished]]]:
    """Yield every event that is ready, as (choice index, event) pairs, until all choices end.

    Under load the engine sends events faster than one at a time can be written, so taking all
    ready events at once lets the stream write them together.
    """
    remaining = run.choices
    while remaining:
        ready = [await _next_event(run, request)]
        while not run.events.empty():
            ready.append(run.events.get_nowait())
        batch = []
        for prompt_index, event in ready:
            batch.append((prompt_index * run.n + event.index, event))
            if isinstance(event, Finished):
                remaining -= 1
        yield batch


def _choice_failure(event: Finished, request_id: str) -> APIError:
    if event.finish_reason == FINISH_CANCELLED:
        return APIError(503, "the request was cancelled because the server is shutting down",
                        type="server_error", code="server_unavailable")
    log.error("request %s: generation failed: %s", request_id, event.error)
    return APIError(500, f"generation failed; the server log has the details under request id "
                    f"{request_id}", type="server_error")


async def _collect(run: _Run, request: Request,
                   request_id: str) -> tuple[list[str], list[Finished]]:
    """Wait for every choice of a non-streaming request; return texts and Finished events."""
    texts = [""] * run.choices
    reasons: list[Finished] = [None] * run.choices  # type: ignore[list-item]
    try:
        async for batch in _batches(run, request):
            for choice, event in batch:
                if isinstance(event, TextDelta):
                    texts[choice] += event.text
                elif event.finish_reason in (FINISH_CANCELLED, FINISH_ERROR):
                    raise _choice_failure(event, request_id)
                else:
                    reasons[choice] = event
    except ClientDisconnected:
        log.info("request %s: client disconnected; request cancelled", request_id)
        raise APIError(499, "the client closed the connection",
                       code="client_disconnected") from None
    finally:
        run.cancel()
    return texts, reasons


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _stream(run: _Run, request: Request, request_id: str,
                  make_chunk: Callable[[list[dict[str, Any]]], dict[str, Any]],
                  delta_choice: Callable[[int, str], dict[str, Any]],
                  final_choices: Callable[[int, Finished], list[dict[str, Any]]],
                  first_chunks: list[dict[str, Any]], include_usage: bool) -> AsyncIterator[str]:
    """Yield server-sent events for a run; cancel the run when the client goes away.

    The text deltas of one choice that are ready together go out as one chunk.
    """
    try:
        if first_chunks:
            yield "".join(_sse(chunk) for chunk in first_chunks)
        failure = None
        async for batch in _batches(run, request):
            parts = []
            pending: dict[int, str] = {}  # text of each choice not yet written, in order
            for choice, event in batch:
                if isinstance(event, TextDelta):
                    pending[choice] = pending.get(choice, "") + event.text
                    continue
                if choice in pending:
                    parts.append(_sse(make_chunk([delta_choice(choice, pending.pop(choice))])))
                if event.finish_reason in (FINISH_CANCELLED, FINISH_ERROR):
                    failure = _choice_failure(event, request_id)
                    break
                parts.extend(_sse(make_chunk([part])) for part in final_choices(choice, event))
            parts.extend(_sse(make_chunk([delta_choice(choice, text)]))
                         for choice, text in pending.items())
            if failure is not None:
                parts.append(_sse(failure.body()))
            yield "".join(parts)
            if failure is not None:
                break
        if failure is None and include_usage:
            yield _sse({**make_chunk([]), "usage": run.usage()})
        yield _sse("[DONE]")
    except ClientDisconnected:
        log.info("request %s: client disconnected during the stream; request cancelled",
                 request_id)
    except asyncio.CancelledError:
        log.info("request %s: stream cancelled, most likely by a client disconnect", request_id)
        raise
    finally:
        run.cancel()


def _stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# -- the app ------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, api_key: str | None = None, *,
               max_n: int = 16, max_body_bytes: int = 4 * 1024 * 1024,
               manage_engine: bool = True, toolbox: ToolBox | None = None) -> FastAPI:
    """Build the FastAPI app that serves `engine` under `model_name`.

    With `api_key`, every /v1 route requires `Authorization: Bearer <api_key>`; /health never
    does. With `manage_engine`, the app starts the engine on startup and stops it on shutdown.
    `max_n` caps the choices per request and `max_body_bytes` the request body size.
    With `toolbox`, `POST /v1/tools/execute` runs the tools that `toolbox.specs` lists;
    without it, tools are off and that route returns 404.
    """
    server = _Server(engine, model_name, api_key, max_n, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        log.info("serving model %r (context %d tokens)", model_name, engine.context_length)
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(title="codeling", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(RequestIdMiddleware)
    _install_error_handlers(app)
    authorized = [Depends(_authorizer(server))]

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "ok" if engine.running else "stopped"
        body = {"status": status, "model": model_name, "active": engine.active_count,
                "waiting": engine.waiting_count}
        return JSONResponse(body, status_code=200 if engine.running else 503)

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def retrieve_model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return _model_card(server)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Any:
        return await _chat_completions(server, request)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request) -> Any:
        return await _completions(server, request)

    @app.get("/v1/tools", dependencies=authorized)
    async def list_tools() -> dict[str, Any]:
        return _tool_list(toolbox)

    @app.post("/v1/tools/execute", dependencies=authorized)
    async def execute_tool(request: Request) -> dict[str, str]:
        return await _execute_tool(server, toolbox, request)

    _mount_web_chat(app)
    return app


# -- tool execution (a codeling extension) -------------------------------------------------------


class ToolExecuteBody(BaseModel):
    """The body of `POST /v1/tools/execute`: one call, with arguments as in a tool call."""

    model_config = ConfigDict(strict=True, extra="ignore")

    name: str
    # An object, or its JSON text as in OpenAI's `tool_calls[].function.arguments`.
    arguments: dict[str, Any] | str = Field(default_factory=dict)


def _tool_list(toolbox: ToolBox | None) -> dict[str, Any]:
    if toolbox is None:
        return {"object": "list", "data": [], "workdir": None}
    return {"object": "list", "data": toolbox.specs, "workdir": str(toolbox.workdir)}


async def _execute_tool(server: _Server, toolbox: ToolBox | None,
                        request: Request) -> dict[str, str]:
    """Run one tool call in a worker thread and return {"content": RESULT}.

    A problem with the call itself (an unlisted tool, arguments that do not match the schema,
    a path outside the working directory) returns the tool's error result with status 200.
    A client then passes it on to the model like any other tool output.
    """
    request_id = request_id_of(request)
    if toolbox is None:
        raise APIError(404, "tools are off on this server, so no tool call can be executed; "
                       "start it with `codeling serve RUN --tools builtin`",
                       code="tools_disabled")
    _check_tool_request(request, server.api_key)
    body = _parse_body(await _read_body(request, server.max_body_bytes), ToolExecuteBody)
    arguments = _tool_arguments(body.arguments)

    listed = [spec["function"]["name"] for spec in toolbox.specs]
    started = time.monotonic()
    if body.name in listed:
        # A tool may run a subprocess up to its time limit. In a worker thread it leaves the
        # event loop, and so every stream in progress, running meanwhile.
        content = await asyncio.to_thread(toolbox.call, body.name, arguments)
    else:
        content = error_result(f"unknown tool {body.name!r}; this server lists "
                               f"{', '.join(listed) or 'no tools'}")
    log.info("request %s: tool %r ran in %.2f s and returned %s", request_id,
             body.name[:100], time.monotonic() - started,
             "an error" if _is_error_result(content) else f"{len(content)} characters")
    return {"content": content}


def _tool_arguments(arguments: dict[str, Any] | str) -> dict[str, Any]:
    """Return the arguments object of a tool call; raise APIError 400 when there is none."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as error:
        raise APIError(400, f"arguments is a string but not valid JSON ({error}); send a JSON "
                       "object or its JSON text", param="arguments",
                       code="invalid_value") from None
    if not isinstance(parsed, dict):
        raise APIError(400, f"arguments must be a JSON object or its JSON text, got the JSON "
                       f"text of a {type(parsed).__name__}", param="arguments",
                       code="invalid_value")
    return parsed


def _is_error_result(content: str) -> bool:
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and set(parsed) == {"error"}


def _check_tool_request(request: Request, api_key: str | None) -> None:
    """Raise APIError unless a tool call request comes from the API or the server's own page.

    A web page on another site can send a POST to a server on 127.0.0.1 through the user's
    browser. Browsers mark such requests with `Sec-Fetch-Site` (and `Origin`), and they cannot
    send Content-Type application/json cross-origin without a CORS preflight, which fails
    because this server sends no CORS headers. DNS rebinding gets past both checks, because
    the page then has the server's origin, but it cannot change the Host header from the
    attacker's name. So a server without an API key executes only requests addressed to
    localhost or an IP address.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    if fetch_site in ("cross-site", "same-site") or (
            fetch_site is None and origin is not None
            and urlsplit(origin).netloc.lower() != host.lower()):
        raise APIError(403, f"tool calls from another web site are rejected (origin "
                       f"{origin!r}); use the chat page this server serves, or an API client",
                       type="permission_error", code="cross_origin_request")
    if api_key is None and not _is_local_or_address(host):
        raise APIError(403, f"this server has no API key, so it executes tool calls only for "
                       f"requests addressed to localhost or an IP address, not {host!r}; set "
                       "--api-key to use a host name", type="permission_error",
                       code="host_not_allowed")
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the request Content-Type is {content_type or 'missing'!r}; send "
                       "the JSON body with Content-Type: application/json",
                       code="unsupported_media_type")


def _is_local_or_address(host: str) -> bool:
    """Return True when a Host header names localhost or an IP address (any port)."""
    try:
        hostname = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    if hostname is None:
        return False
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


# -- the web chat page ---------------------------------------------------------------------------

WEB_CHAT_DIR = Path(__file__).parent / "static"
# The page loads only its own files, so a CSP of 'self' keeps it working offline and blocks any
# injected inline script.
WEB_CHAT_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"


def _mount_web_chat(app: FastAPI) -> None:
    """Serve the chat page at `/` and its files under `/static`, both without the API key."""
    app.mount("/static", StaticFiles(directory=WEB_CHAT_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def web_chat() -> FileResponse:
        return FileResponse(WEB_CHAT_DIR / "index.html",
                            headers={"Content-Security-Policy": WEB_CHAT_CSP})


def _authorizer(server: _Server) -> Callable[[Request], Any]:
    async def check_api_key(request: Request) -> None:
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key; send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), server.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
    return check_api_key


def _model_card(server: _Server) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": server.created,
            "owned_by": "codeling", "context_length": server.engine.context_length}


async def _chat_completions(server: _Server, request: Request) -> Any:
    request_id = request_id_of(request)
    body = _parse_body(await _read_body(request, server.max_body_bytes), ChatCompletionBody)
    server.check_model(body.model)
    _reject_unsupported_chat(body)
    messages = [message.model_dump(exclude_none=True) for message in body.messages]
    try:
        prompt = chat.render(messages, server.engine.tokenizer, body.tools or None)
    except ChatFormatError as error:
        raise APIError(400, str(error), param=error.param, code="invalid_value") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = dataclasses.replace(server.sampling_params(body, max_tokens),
                                 tool_calls=bool(body.tools) and body.tool_choice != "none")
    run = server.submit([prompt], params, request_id, "messages")

    completion_id = f"chatcmpl-{request_id.removeprefix('req_')}"
    created = int(time.time())
    base = {"id": completion_id, "created": created, "model": server.model_name,
            "system_fingerprint": None}
    tokenizer = server.engine.tokenizer
    if not body.stream:
        texts, finals = await _collect(run, request, request_id)
        choices = []
        for index, (text, final) in enumerate(zip(texts, finals)):
            message = {"role": "assistant", "content": text, "refusal": None}
            reason = final.finish_reason
            calls, extra_text = _tool_calls_of(final, tokenizer, request_id)
            if calls:
                message["content"] = text or None
                message["tool_calls"] = calls
                reason = "tool_calls"
            elif extra_text:
                message["content"] = text + extra_text
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": reason})
        return {**base, "object": "chat.completion", "choices": choices, "usage": run.usage()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def make_chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**base, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def delta_choice(index: int, text: str) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text}, "logprobs": None,
                "finish_reason": None}

    def final_choices(index: int, final: Finished) -> list[dict[str, Any]]:
        calls, extra_text = _tool_calls_of(final, tokenizer, request_id)
        if calls:
            deltas = [{"index": position, **call} for position, call in enumerate(calls)]
            return [{"index": index, "delta": {"tool_calls": deltas}, "logprobs": None,
                     "finish_reason": None},
                    {"index": index, "delta": {}, "logprobs": None,
                     "finish_reason": "tool_calls"}]
        ending = [{"index": index, "delta": {}, "logprobs": None,
                   "finish_reason": final.finish_reason}]
        if extra_text:
            ending.insert(0, delta_choice(index, extra_text))
        return ending

    first = [make_chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
             for index in range(run.choices)]
    return _stream_response(_stream(run, request, request_id, make_chunk, delta_choice,
                                    final_choices, first, include_usage))


def _tool_calls_of(final: Finished, tokenizer: Any,
                   request_id: str) -> tuple[list[dict[str, Any]], str]:
    """Return the OpenAI tool calls in a finished choice, and text of calls that did not parse.

    A call whose JSON does not parse cannot be sent as a call, so its raw text is returned to
    be appended to the message content, and the choice ends as a plain answer.
    """
    tool_call = tokenizer.token_id("<|tool_call|>")
    if tool_call not in final.token_ids:
        return [], ""
    message = chat.parse_assistant(final.token_ids, tokenizer)
    broken = [call for call in message["tool_calls"] if "error" in call]
    if broken:
        log.warning("request %s: the model wrote a tool call that does not parse (%s); "
                    "returned as text", request_id, broken[0]["error"])
        return [], "".join(call.get("raw") or "" for call in message["tool_calls"])
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": json.dumps(call["function"]["arguments"],
                                                  ensure_ascii=False)}}
            for call in message["tool_calls"]], ""


async def _completions(server: _Server, request: Request) -> Any:
    request_id = request_id_of(request)
    body = _parse_body(await _read_body(request, server.max_body_bytes), CompletionBody)
    server.check_model(body.model)
    _reject_unsupported_completion(body)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise APIError(400, "prompt is an empty list; send a string or a list of strings",
                       param="prompt", code="invalid_value")
    tokenizer = server.engine.tokenizer
    # An empty prompt starts from bos, as `codeling generate` does.
    prompts = [tokenizer.encode(text) or [tokenizer.bos_id] for text in texts]
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = server.sampling_params(body, max_tokens)
    run = server.submit(prompts, params, request_id, "prompt")

    base = {"id": f"cmpl-{request_id.removeprefix('req_')}", "created": int(time.time()),
            "model": server.model_name, "system_fingerprint": None}
    if not body.stream:
        outputs, finals = await _collect(run, request, request_id)
        choices = [{"index": index, "text": text, "logprobs": None,
                    "finish_reason": final.finish_reason}
                   for index, (text, final) in enumerate(zip(outputs, finals))]
        return {**base, "object": "text_completion", "choices": choices, "usage": run.usage()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def make_chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**base, "object": "text_completion", "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def delta_choice(index: int, text: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None}

    def final_choices(index: int, final: Finished) -> list[dict[str, Any]]:
        return [{"index": index, "text": "", "logprobs": None,
                 "finish_reason": final.finish_reason}]

    return _stream_response(_stream(run, request, request_id, make_chunk, delta_choice,
                                    final_choices, [], include_usage))
