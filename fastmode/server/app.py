"""The HTTP edge: routes, the models endpoints, health, and the app's lifespan."""
from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fastmode.platform.catalog import EFFORT_LEVELS, THINKING_TYPES, ModelEntry
from fastmode.server import admin, batches, errors
from fastmode.server.errors import InvalidRequest, new_id
from fastmode.server.http import endpoint, limit_param
from fastmode.server.messages import count_tokens, create_message, resolve_model
from fastmode.server.state import ServerState, build_state  # noqa: F401  (build_state: the public constructor)


LIFECYCLES = ("active", "deprecated", "retired")  # the values of /v1/models' lifecycle[] filter
BACKSTOP_S = 5  # after the cut-off, how long uvicorn waits before it cancels what is left


class Server(uvicorn.Server):
    """uvicorn's server with a cut-off: once asked to stop (Ctrl-C), it takes no new requests
    and gives those running `grace` seconds; then each still generating ends with an
    overloaded error (a stream's last event is an `error` event, a request not streamed
    answers 529), so its client learns why and may retry, and its usage is recorded. Whatever
    is still open `BACKSTOP_S` later is cancelled by uvicorn."""

    def __init__(self, state: ServerState, config: uvicorn.Config, grace: float) -> None:
        config.timeout_graceful_shutdown = grace + BACKSTOP_S  # type: ignore[assignment]  (a float works)
        super().__init__(config)
        self.state, self.grace = state, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        cut_off = asyncio.get_running_loop().call_later(self.grace, self.state.end_live_requests)
        try:
            await super().shutdown(sockets)
        finally:
            cut_off.cancel()


def _supported(flag: bool) -> dict[str, bool]:
    return {"supported": flag}


def _model_info(state: ServerState, e: ModelEntry) -> dict[str, Any]:
    window = state.context_window(e)
    no = _supported(False)
    return {"type": "model", "id": e.id, "display_name": e.name, "created_at": e.created_at,
            "lifecycle": e.lifecycle, "deprecated_at": e.deprecated_at, "retires_at": e.retires_at,
            "max_input_tokens": window, "max_tokens": e.max_output_tokens or window,
            "capabilities": {
                "batch": _supported(True), "citations": no, "code_execution": no, "image_input": no,
                "pdf_input": no, "structured_outputs": no, "context_management": {"supported": False},
                "effort": {"supported": bool(e.effort_levels),
                           **{lvl: _supported(lvl in e.effort_levels) for lvl in EFFORT_LEVELS}},
                "server_tools": {"supported": False, "code_execution": no, "web_search": no},
                "thinking": {"supported": bool(set(e.thinking_types) - {"disabled"}),
                             "types": {t: _supported(t in e.thinking_types) for t in THINKING_TYPES}},
            }}


async def list_models(request: Request, state: ServerState) -> Response:
    q = request.query_params
    n = limit_param(request)
    wanted = q.getlist("lifecycle[]") + q.getlist("lifecycle")
    bad = [w for w in wanted if w not in LIFECYCLES]
    if bad:
        raise InvalidRequest(f"lifecycle[]: {bad[0]!r} is not one of {', '.join(LIFECYCLES)}")
    shown = set(wanted or ("active", "deprecated"))  # retired models only on request
    entries = [e for e in state.catalog.entries if e.lifecycle in shown]
    entries.sort(key=lambda e: e.released, reverse=True)  # newest first, as the API lists them (stable)
    ids = [e.id for e in entries]
    for name in ("after_id", "before_id"):
        if q.get(name) is not None and q[name] not in ids:
            raise InvalidRequest(f"{name}: {q[name]!r} is not a model id of this server")
    if q.get("after_id"):
        lo = ids.index(q["after_id"]) + 1
        hi = min(lo + n, len(ids))
        has_more = hi < len(ids)
    elif q.get("before_id"):
        hi = ids.index(q["before_id"])
        lo = max(0, hi - n)
        has_more = lo > 0
    else:
        lo, hi = 0, min(n, len(ids))
        has_more = hi < len(ids)
    page = entries[lo:hi]
    data = [_model_info(state, e) for e in page]
    return JSONResponse({"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})


async def get_model(request: Request, state: ServerState) -> Response:
    return JSONResponse(_model_info(state, resolve_model(state, request.path_params["model_id"], patterns=False)))


async def health(request: Request, state: ServerState) -> Response:
    engines = {w: {"free_kv_blocks": b.engine.blocks.num_free, "total_kv_blocks": b.engine.blocks.num_blocks,
                   "stats": b.engine.stats} for w, b in state.backends.items()}
    return JSONResponse({"status": "ok", "models": [e.id for e in state.catalog.entries], "engines": engines})


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
        for engine in state.engines:
            engine.start()
        runner = batches.BatchRunner(state)
        state.batches = runner
        runner.start()
        try:
            yield
        finally:
            await runner.stop()
            for engine in state.engines:
                engine.shutdown()

    routes = [
        Route("/v1/messages", endpoint(create_message), methods=["POST"]),
        Route("/v1/messages/count_tokens", endpoint(count_tokens), methods=["POST"]),
        *batches.routes(),
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(get_model), methods=["GET"]),
        *admin.routes(),
        Route("/health", endpoint(health, versioned=False, authenticated=False), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _not_found})
    app.router.redirect_slashes = False  # a path with a trailing slash is an error JSON 404, not a bare redirect
    return app
