"""POST /v1/messages and /v1/messages/count_tokens: catalog rules, speed, rate limits, the
engine run (JSON or SSE) and the usage row every finished request writes."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fastmode.engine.engine import EngineOverloaded, RequestTooLarge
from fastmode.engine.prefix_cache import CacheResult, CacheSpec
from fastmode.engine.request import Lane, SamplingParams
from fastmode.platform.accounts import Organization, Principal
from fastmode.platform.catalog import ModelEntry
from fastmode.platform.ledger import Usage
from fastmode.platform.ratelimit import RateLimitExceeded, retry_headers
from fastmode.platform.service import Ticket
from fastmode.server import errors
from fastmode.server.errors import InvalidRequest, new_id
from fastmode.server.generation import Generation, GenerationAborted, Outcome
from fastmode.server.http import ClientGone, betas, json_body, log
from fastmode.server.policy import check_model_params, effort_instruction, resolve_service_tier, resolve_speed
from fastmode.server.caching import cache_spec
from fastmode.server.prompt import (breakpoint_ttl, callable_tools, forced_tool_prefix, parse_output, render_marked,
                                    render_prompt, single_tool_call)
from fastmode.server.state import Backend, ServerState
from fastmode.server.validate import MessagesRequest, cacheable_blocks, parse_messages_request

DISCONNECT_POLL_S = 0.5
COUNT_LIMIT = 16  # count_tokens counts prompts of up to this many context windows
PRIORITY = {"priority": -1, "standard": 0, "batch": 1}  # engine admission order within a lane


@dataclass
class Prepared:
    """A validated request with its model, prompt ids, and the speed and tier it runs at."""

    req: MessagesRequest
    entry: ModelEntry
    backend: Backend
    ids: list[int]
    speed: str
    service_tier: str
    inference_geo: str
    cache: CacheSpec | None = None  # prompt caching breakpoints (None: nothing cached or read)
    pool: str | None = None  # the draft pool scope (engine/pool.py); None: no pool
    window: int | None = None  # the model entry's context window (prompt + output stop there)

    @property
    def runs_engine(self) -> bool:
        """max_tokens 0 runs only to pre-warm the prompt cache."""
        return self.req.max_tokens > 0 or self.cache is not None

    def usage(self, output_tokens: int, cache: CacheResult | None = None) -> dict[str, Any]:
        c = cache or CacheResult()
        return {"input_tokens": len(self.ids) - c.read - c.created, "output_tokens": output_tokens,
                "cache_creation_input_tokens": c.created, "cache_read_input_tokens": c.read,
                "cache_creation": {"ephemeral_5m_input_tokens": c.created_5m, "ephemeral_1h_input_tokens": c.created_1h},
                "service_tier": self.service_tier, "speed": self.speed, "inference_geo": self.inference_geo,
                "server_tool_use": None}

    def ledger_usage(self, output_tokens: int, cache: CacheResult | None = None) -> Usage:
        c = cache or CacheResult()
        return Usage(uncached_input_tokens=len(self.ids) - c.read - c.created, cache_read_input_tokens=c.read,
                     cache_creation_5m_input_tokens=c.created_5m, cache_creation_1h_input_tokens=c.created_1h,
                     output_tokens=output_tokens)


def resolve_model(state: ServerState, name: str, patterns: bool = True) -> ModelEntry:
    """The catalog entry a model name names; without `patterns`, only ids and exact aliases
    (what `/v1/models/{id}` answers for: a catch-all `*` serves requests, it names no model)."""
    entry = state.catalog.resolve(name, patterns)
    if entry is None:
        served = ", ".join(e.id for e in state.catalog.entries)
        raise errors.NotFound(f"model: {name} (this server serves {served})")
    return entry


def _prompt(req: MessagesRequest, backend: Backend, namespace: str, min_cacheable: int,
            window: int, for_count: bool = False) -> tuple[list[int], CacheSpec | None]:
    """Render and tokenize, and place the cache breakpoints (CPU work: callers run it off the
    event loop). A text too long for the context window whatever its tokens is refused before
    tokenizing (a body of megabytes would otherwise hold the interpreter for seconds); a count
    counts up to COUNT_LIMIT context windows."""
    tok = backend.loaded.tokenizer
    wants_cache = req.cache_control is not None or any(breakpoint_ttl(b) for _, b in cacheable_blocks(req))
    rendered = render_marked(req, backend.template) if wants_cache else None
    text = rendered.text if rendered is not None else render_prompt(req, backend.template)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"the request contains text that is not valid Unicode ({e.reason}); "
                             f"send UTF-8 text without lone surrogate escapes") from e
    least = tok.min_tokens(text)
    if for_count and least >= COUNT_LIMIT * window:
        raise InvalidRequest(f"prompt is too long to count: at least {least} tokens >= {COUNT_LIMIT * window}, "
                             f"{COUNT_LIMIT} times the context window of {req.model}")
    if not for_count and least >= window:
        raise InvalidRequest(f"prompt is too long: at least {least} tokens >= {window} maximum (the context "
                             f"window of {req.model})")
    ids, ends = tok.encode_with_ends(text)
    bos = int(tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id))
    if bos:
        ids = [tok.bos_id] + ids  # type: ignore[list-item]
    spec = None
    if rendered is not None:
        automatic = (req.cache_control.get("ttl") or "5m") if req.cache_control is not None else None
        spec = cache_spec(rendered, ends, bos, automatic, namespace, min_cacheable)
    return ids, spec


async def prepare(state: ServerState, body: Any, version: str, beta: set[str], org: Organization, *,
                  for_count: bool = False, batch: bool = False) -> Prepared:
    req = parse_messages_request(body, version, for_count=for_count)
    entry = resolve_model(state, req.model)
    check_model_params(req, entry)
    speed = resolve_speed(req, entry, org, beta, state.platform.clock(), batch=batch)
    tier = "batch" if batch else resolve_service_tier(req, org, speed)
    instruction = effort_instruction(req)
    if instruction:
        req.system = [*req.system, {"type": "text", "text": instruction}]
    backend = state.backend(entry)
    # caches are never shared across organizations or model ids (several ids may share one
    # set of weights), nor (the engine adds the lane) across speeds
    namespace = f"{org.id}\0{entry.id}"
    window = state.context_window(entry)
    ids, cache = await run_in_threadpool(_prompt, req, backend, namespace, entry.min_cacheable_tokens, window,
                                         for_count)
    if not for_count:
        if len(ids) >= window:
            raise InvalidRequest(f"prompt is too long: {len(ids)} tokens >= {window} maximum "
                                 f"(the context window of {req.model})")
        if req.max_tokens > window:
            raise InvalidRequest(f"max_tokens: {req.max_tokens} > {window}, which is the maximum allowed number "
                                 f"of output tokens for {req.model}")
    # answers are drafted from for later requests of the same organization, model id, end user
    # and (the engine adds the lane) speed; zero data retention keeps none
    pool = None if org.zero_data_retention else f"{namespace}\0{req.user_id or ''}"
    return Prepared(req, entry, backend, ids, speed, tier, req.inference_geo or "global",
                    None if for_count else cache, pool, window)


def sampling(prep: Prepared) -> SamplingParams:
    req, d = prep.req, prep.backend.loaded.defaults
    if req.temperature is None and req.top_p is None and req.top_k is None:
        t, p, k = d.temperature, d.top_p, d.top_k  # the model's default decoding
    else:
        t = 1.0 if req.temperature is None else float(req.temperature)  # the API's default temperature
        p = 1.0 if req.top_p is None else float(req.top_p)
        k = req.top_k or 0
    return SamplingParams(max_tokens=req.max_tokens, temperature=t, top_p=p, top_k=k)


def start_generation(prep: Prepared, ticket: Ticket) -> Generation:
    """Queue the request in its engine; a refusal releases the ticket's reservation."""
    lane = Lane.FAST if prep.speed == "fast" else Lane.STANDARD
    gen = Generation(prep.backend.engine, prep.backend.loaded.tokenizer, prep.ids, sampling(prep), lane,
                     prep.req.stop_sequences, tool_names=[t["name"] for t in callable_tools(prep.req)],
                     priority=PRIORITY[prep.service_tier], cache=prep.cache, prefix=forced_tool_prefix(prep.req),
                     pool=prep.pool, single_tool_call=single_tool_call(prep.req), max_len=prep.window)
    try:
        gen.start()
    except EngineOverloaded as e:
        ticket.release()
        raise errors.Overloaded(f"Overloaded: {e}") from e
    except RequestTooLarge as e:
        ticket.release()
        raise InvalidRequest(str(e)) from e
    return gen


def finish(gen: Generation, ticket: Ticket, prep: Prepared) -> None:
    out = gen.outcome
    stop = stop_reason(prep, out, content(prep, out)) if out.stop_reason else ("error" if gen.failed else "canceled")
    ticket.finish(prep.ledger_usage(out.output_tokens, out.cache), stop)


def content(prep: Prepared, out: Outcome, text: str | None = None) -> list[dict[str, Any]]:
    """The reply's content blocks: its text (or `text`, a part of it) with its tool calls."""
    return parse_output(out.text + out.tail if text is None else text, callable_tools(prep.req),
                        single_tool_call(prep.req))


def stop_reason(prep: Prepared, out: Outcome, blocks: list[dict[str, Any]]) -> str | None:
    """tool_use where the reply's blocks hold a tool call, else why generation stopped."""
    return "tool_use" if any(b["type"] == "tool_use" for b in blocks) else out.stop_reason


def message_json(msg_id: str, model: str, content: list[dict[str, Any]], stop_reason: str | None,
                 stop_sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "stop_details": None, "usage": usage}


def final_message(prep: Prepared, gen: Generation, msg_id: str) -> dict[str, Any]:
    out = gen.outcome
    blocks = content(prep, out)
    stop = stop_reason(prep, out, blocks)
    return message_json(msg_id, prep.entry.id, blocks, stop, out.stop_sequence if stop == "stop_sequence" else None,
                        prep.usage(out.output_tokens, out.cache))


def admit(state: ServerState, principal: Principal, prep: Prepared, request_id: str) -> Ticket:
    try:
        return state.platform.admit(principal.org, principal.api_key_id, prep.entry, request_id=request_id,
                                    speed=prep.speed, service_tier=prep.service_tier,
                                    inference_geo=prep.inference_geo, input_tokens=len(prep.ids),
                                    max_tokens=prep.req.max_tokens)
    except RateLimitExceeded as e:
        pool = "fast mode" if prep.speed == "fast" else "standard"
        what = e.dimension.replace("_", " ")
        if e.never and e.limit == 0:
            msg = (f"Your organization's {pool} rate limit allows no {what} per minute"
                   + ("; send the request without speed \"fast\"" if prep.speed == "fast" else ""))
        elif e.never:
            msg = (f"This request's {what} exceed your organization's {pool} rate limit per minute on their own; "
                   f"lower max_tokens or the prompt" + (", or send it without speed \"fast\"" if prep.speed == "fast"
                                                        else ""))
        else:
            msg = (f"This request would exceed your organization's {pool} rate limit for {what} per minute; "
                   f"retry after {e.retry_after:.1f} s" + (" or send it without speed \"fast\""
                                                           if prep.speed == "fast" else ""))
        raise errors.RateLimited(msg, headers=retry_headers(e)) from e


async def create_message(request: Request, state: ServerState) -> Response:
    principal: Principal = request.state.principal
    prep = await prepare(state, await json_body(request), request.state.api_version, betas(request), principal.org)
    ticket = admit(state, principal, prep, request.state.request_id)
    msg_id = new_id("msg_")
    if not prep.runs_engine:
        ticket.finish(prep.ledger_usage(0), "max_tokens")
        if prep.req.stream:
            return StreamingResponse(_empty_stream(msg_id, prep), media_type="text/event-stream",
                                     headers=ticket.headers)
        return JSONResponse(message_json(msg_id, prep.entry.id, [], "max_tokens", None, prep.usage(0)),
                            headers=ticket.headers)
    if state.stopping:  # the shutdown's cut-off has passed: nothing new starts
        ticket.release()
        raise errors.Overloaded("the server is shutting down; retry the request")
    gen = start_generation(prep, ticket)
    state.live.add(gen)
    if prep.req.stream and prep.req.max_tokens > 0:
        return GenerationStream(gen, ticket, prep, _stream(gen, msg_id, prep), state.live)
    try:
        await _run_to_end(gen, request)
    finally:
        await _settle(gen, ticket, prep, state.live)
    if prep.req.stream:  # a pre-warm: the cache is written, nothing was generated
        return StreamingResponse(_empty_stream(msg_id, prep, gen.outcome.cache), media_type="text/event-stream",
                                 headers=ticket.headers)
    return JSONResponse(final_message(prep, gen, msg_id), headers=ticket.headers)


class GenerationStream(StreamingResponse):
    """An SSE response that aborts its generation and records its usage however the response
    ends, even when the client leaves before the body iterator has started."""

    def __init__(self, gen: Generation, ticket: Ticket, prep: Prepared, body: AsyncIterator[bytes],
                 live: set[Generation]) -> None:
        """`live`: the server's generations running now, which this one leaves as it ends."""
        super().__init__(body, media_type="text/event-stream", headers={"cache-control": "no-cache", **ticket.headers})
        self.gen, self.ticket, self.prep, self.live = gen, ticket, prep, live

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.abort()
            await _settle(self.gen, self.ticket, self.prep, self.live)


async def _settle(gen: Generation, ticket: Ticket, prep: Prepared, live: set[Generation]) -> None:
    """However an HTTP request's generation ended: it leaves the live set, and once the engine
    has said what it wrote to the prompt cache (`Generation.settled`), its usage row is written
    (also if this wait is cancelled)."""
    live.discard(gen)
    try:
        await gen.settled()
    finally:
        finish(gen, ticket, prep)


async def run_to_end(gen: Generation) -> None:
    """Drain a generation; the engine's shutdown becomes a 529."""
    try:
        async for _ in gen.stream():
            pass
    except GenerationAborted as e:
        raise errors.Overloaded(str(e)) from e


async def _run_to_end(gen: Generation, request: Request) -> None:
    """Drain a non-streaming generation; abort it if the client disconnects meanwhile."""
    task = asyncio.ensure_future(run_to_end(gen))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()  # its finally aborts the request in the engine
            await asyncio.gather(task, return_exceptions=True)
    task.result()


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _empty_stream(msg_id: str, prep: Prepared, cache: CacheResult | None = None) -> AsyncIterator[bytes]:
    yield _sse("message_start", {"type": "message_start",
                                 "message": message_json(msg_id, prep.entry.id, [], None, None, prep.usage(0, cache))})
    yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None,
                                                                     "stop_details": None}, "usage": {"output_tokens": 0}})
    yield _sse("message_stop", {"type": "message_stop"})


async def _stream(gen: Generation, msg_id: str, prep: Prepared) -> AsyncIterator[bytes]:
    await gen.admitted()  # message_start reports what the prompt cache read and writes
    yield _sse("message_start", {"type": "message_start",
                                 "message": message_json(msg_id, prep.entry.id, [], None, None,
                                                         prep.usage(0, gen.outcome.cache))})
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
    out = gen.outcome
    stop = out.stop_reason
    # the held-back tail: tool calls, or text (a malformed call stays text) that continues the
    # open text block, so the stream adds up to the blocks a non-streamed reply has
    for block in content(prep, out, out.tail) if out.tail else []:
        if block["type"] == "text" and text_open:
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "text_delta", "text": block["text"]}})
            continue
        if text_open:
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            index, text_open = index + 1, False
        if block["type"] == "text":
            start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
        else:
            stop = "tool_use"
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        yield _sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        if block["type"] == "text":
            text_open = True  # held open: more text of the tail may follow
            continue
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    if text_open:
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    stop_sequence = out.stop_sequence if stop == "stop_sequence" else None
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": stop, "stop_sequence": stop_sequence, "stop_details": None},
                                 "usage": {"output_tokens": out.output_tokens}})
    yield _sse("message_stop", {"type": "message_stop"})


async def count_tokens(request: Request, state: ServerState) -> Response:
    principal: Principal = request.state.principal
    prep = await prepare(state, await json_body(request), request.state.api_version, betas(request), principal.org,
                         for_count=True)
    return JSONResponse({"input_tokens": len(prep.ids)})
