"""The HTTP edge: Messages API routes, SSE, auth and version headers, Anthropic error JSON."""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fastmode.config import EngineConfig
from fastmode.engine.engine import Engine, EngineOverloaded, RequestTooLarge
from fastmode.engine.request import Lane, SamplingParams
from fastmode.server import errors
from fastmode.server.errors import APIError, InvalidRequest, new_id
from fastmode.server.generation import Generation, GenerationAborted
from fastmode.server.prompt import parse_output, render_prompt
from fastmode.server.validate import API_VERSIONS, MessagesRequest, parse_messages_request
from fastmode.tokenizer.chat_template import ChatTemplate
from fastmode.weights.registry import LoadedModel

log = logging.getLogger("fastmode.server")
MAX_BODY = 32 * 1024 * 1024
DISCONNECT_POLL_S = 0.5


class ClientGone(Exception):
    """The client disconnected before its non-streaming answer was ready."""


@dataclass
class ServerState:
    loaded: LoadedModel
    engine: Engine
    template: ChatTemplate
    model_id: str
    created_at: str
    api_keys: frozenset[str]  # empty: any key (or none) is accepted


def build_state(loaded: LoadedModel, engine_config: EngineConfig, api_keys: frozenset[str] = frozenset()) -> ServerState:
    tok = loaded.tokenizer
    eos = tok.token_text(tok.eos_ids[0]) if tok.eos_ids else ""
    bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
    engine = Engine(loaded.model, engine_config, tok.eos_ids)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ServerState(loaded, engine, ChatTemplate(tok.chat_template, bos, eos), loaded.name, created, api_keys)


Handler = Callable[[Request, ServerState], Awaitable[Response]]


def endpoint(handler: Handler, *, versioned: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler with auth, version checks, request-id and error rendering."""

    async def run(request: Request) -> Response:
        rid = new_id("req_")
        state: ServerState = request.app.state.fastmode
        try:
            _authenticate(request, state)
            if versioned:
                request.state.api_version = _check_version(request)
            response = await handler(request, state)
        except APIError as e:
            response = errors.error_response(e, rid)
        except ClientGone:  # nobody is listening; the status is for the access log only
            response = Response(status_code=499)
        except Exception:  # a bug of ours: log it, never leak a traceback
            log.exception("unhandled error in %s", request.url.path)
            response = errors.error_response(errors.InternalError("Internal server error"), rid)
        response.headers["request-id"] = rid
        return response

    return run


def _authenticate(request: Request, state: ServerState) -> None:
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if state.api_keys and key not in state.api_keys:
        msg = "invalid x-api-key" if key else "missing API key: send it as x-api-key or Authorization: Bearer"
        raise errors.AuthenticationError(msg)


def _check_version(request: Request) -> str:
    version = request.headers.get("anthropic-version")
    if version is None:
        raise InvalidRequest(f"anthropic-version: header is required (one of {', '.join(API_VERSIONS)})")
    if version not in API_VERSIONS:
        raise InvalidRequest(f"anthropic-version: {version!r} is not a valid version (one of {', '.join(API_VERSIONS)})")
    return version


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise errors.RequestTooLarge(f"request body of {len(raw)} bytes exceeds the {MAX_BODY} byte limit")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise InvalidRequest("The request body is nested too deeply") from e


def _model(req: MessagesRequest, state: ServerState) -> None:
    if req.model != state.model_id:
        raise errors.NotFound(f"model: {req.model} (this server serves {state.model_id})")


def _prompt_ids(req: MessagesRequest, state: ServerState) -> list[int]:
    """Render and tokenize (CPU work: callers run it off the event loop)."""
    tok = state.loaded.tokenizer
    text = render_prompt(req, state.template)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"the request contains text that is not valid Unicode ({e.reason}); "
                             f"send UTF-8 text without lone surrogate escapes") from e
    ids = tok.encode(text)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def _sampling(req: MessagesRequest, state: ServerState) -> SamplingParams:
    d = state.loaded.defaults
    if req.temperature is None and req.top_p is None and req.top_k is None:
        t, p, k = d.temperature, d.top_p, d.top_k  # the model's default decoding
    else:
        t = 1.0 if req.temperature is None else float(req.temperature)  # the API's default temperature
        p = 1.0 if req.top_p is None else float(req.top_p)
        k = req.top_k or 0
    return SamplingParams(max_tokens=req.max_tokens, temperature=t, top_p=p, top_k=k)


def _usage(input_tokens: int, output_tokens: int, speed: str) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "service_tier": "standard", "speed": speed, "inference_geo": "global", "server_tool_use": None}


def _message(msg_id: str, model: str, content: list[dict[str, Any]], stop_reason: str | None,
             stop_sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "stop_details": None, "usage": usage}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def create_message(request: Request, state: ServerState) -> Response:
    req = parse_messages_request(await _json_body(request), request.state.api_version)
    _model(req, state)
    arch = state.loaded.arch
    ids = await run_in_threadpool(_prompt_ids, req, state)
    if len(ids) >= arch.max_position:
        raise InvalidRequest(f"prompt is too long: {len(ids)} tokens >= {arch.max_position} maximum "
                             f"(the context window of {state.model_id})")
    if req.max_tokens > arch.max_position:
        raise InvalidRequest(f"max_tokens: {req.max_tokens} > {arch.max_position}, which is the maximum allowed "
                             f"number of output tokens for {state.model_id}")
    lane = Lane.FAST if req.speed == "fast" else Lane.STANDARD
    msg_id = new_id("msg_")
    if req.max_tokens == 0:
        usage = _usage(len(ids), 0, lane.value)
        if req.stream:
            return StreamingResponse(_empty_stream(msg_id, state.model_id, usage), media_type="text/event-stream")
        return JSONResponse(_message(msg_id, state.model_id, [], "max_tokens", None, usage))
    gen = Generation(state.engine, state.loaded.tokenizer, ids, _sampling(req, state), lane, req.stop_sequences,
                     hold_tool_calls=bool(req.tools))
    try:
        gen.start()
    except EngineOverloaded as e:
        raise errors.Overloaded(f"Overloaded: {e}") from e
    except RequestTooLarge as e:
        raise InvalidRequest(str(e)) from e
    if req.stream:
        return GenerationStream(gen, _stream(gen, msg_id, state.model_id, req, len(ids)))
    await _run_to_end(gen, request)
    out = gen.outcome
    content = parse_output(out.text + out.tail, req.tools)
    stop = "tool_use" if any(b["type"] == "tool_use" for b in content) else out.stop_reason
    usage = _usage(len(ids), out.output_tokens, lane.value)
    return JSONResponse(_message(msg_id, state.model_id, content, stop,
                                 out.stop_sequence if stop == "stop_sequence" else None, usage))


class GenerationStream(StreamingResponse):
    """An SSE response that aborts its generation however the response ends, even when the
    client leaves before the body iterator has started."""

    def __init__(self, gen: Generation, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self.gen = gen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.abort()


async def _run_to_end(gen: Generation, request: Request) -> None:
    """Drain a non-streaming generation; abort it if the client disconnects meanwhile."""

    async def drain() -> None:
        async for _ in gen.stream():
            pass

    task = asyncio.ensure_future(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()  # its finally aborts the request in the engine
            await asyncio.gather(task, return_exceptions=True)
    try:
        task.result()
    except GenerationAborted as e:
        raise errors.Overloaded(str(e)) from e


async def _empty_stream(msg_id: str, model: str, usage: dict[str, Any]) -> AsyncIterator[bytes]:
    yield _sse("message_start", {"type": "message_start", "message": _message(msg_id, model, [], None, None, usage)})
    yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None,
                                                                     "stop_details": None}, "usage": {"output_tokens": 0}})
    yield _sse("message_stop", {"type": "message_stop"})


async def _stream(gen: Generation, msg_id: str, model: str, req: MessagesRequest, n_in: int) -> AsyncIterator[bytes]:
    usage = _usage(n_in, 0, gen.lane.value)
    yield _sse("message_start", {"type": "message_start", "message": _message(msg_id, model, [], None, None, usage)})
    yield _sse("ping", {"type": "ping"})
    index, text_open = 0, False
    try:
        async for chunk in gen.stream():
            if not text_open:
                yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}})
                text_open = True
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "text_delta", "text": chunk}})
    except GenerationAborted as e:
        yield _sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": str(e)}})
        return
    except Exception:
        log.exception("generation failed")
        yield _sse("error", {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}})
        return
    if text_open:
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    out = gen.outcome
    stop = out.stop_reason
    for block in parse_output(out.tail, req.tools) if out.tail else []:
        if block["type"] == "text":  # a malformed tool call stays text
            start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
        else:
            stop = "tool_use"
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    stop_sequence = out.stop_sequence if stop == "stop_sequence" else None
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": stop, "stop_sequence": stop_sequence, "stop_details": None},
                                 "usage": {"output_tokens": out.output_tokens}})
    yield _sse("message_stop", {"type": "message_stop"})


async def count_tokens(request: Request, state: ServerState) -> Response:
    req = parse_messages_request(await _json_body(request), request.state.api_version, for_count=True)
    _model(req, state)
    return JSONResponse({"input_tokens": len(await run_in_threadpool(_prompt_ids, req, state))})


def _model_info(state: ServerState) -> dict[str, Any]:
    arch = state.loaded.arch
    return {"type": "model", "id": state.model_id, "display_name": state.loaded.display_name,
            "created_at": state.created_at, "lifecycle": "active", "deprecated_at": None, "retires_at": None,
            "max_input_tokens": arch.max_position, "max_tokens": arch.max_position}


async def list_models(request: Request, state: ServerState) -> Response:
    limit = request.query_params.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise InvalidRequest("limit: Input should be an integer between 1 and 1000")
    info = _model_info(state)
    return JSONResponse({"data": [info], "has_more": False, "first_id": info["id"], "last_id": info["id"]})


async def get_model(request: Request, state: ServerState) -> Response:
    model_id = request.path_params["model_id"]
    if model_id != state.model_id:
        raise errors.NotFound(f"model: {model_id}")
    return JSONResponse(_model_info(state))


async def health(request: Request, state: ServerState) -> Response:
    eng = state.engine
    return JSONResponse({"status": "ok", "model": state.model_id, "free_kv_blocks": eng.blocks.num_free,
                         "total_kv_blocks": eng.blocks.num_blocks, "stats": eng.stats})


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    err = (errors.NotFound(f"Not found: {request.method} {request.url.path}") if status == 404 else
           InvalidRequest(f"Method {request.method} is not allowed on {request.url.path}"))
    if status == 405:
        err.status = 405
    return errors.error_response(err, new_id("req_"))


def create_app(state: ServerState) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.fastmode = state
        state.engine.start()
        try:
            yield
        finally:
            state.engine.shutdown()

    routes = [
        Route("/v1/messages", endpoint(create_message), methods=["POST"]),
        Route("/v1/messages/count_tokens", endpoint(count_tokens), methods=["POST"]),
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(get_model), methods=["GET"]),
        Route("/health", endpoint(health, versioned=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _not_found})
