"""Endpoint plumbing shared by every route: auth, API version, request ids, error rendering."""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from fastmode.platform.accounts import InvalidKey, Principal
from fastmode.server import errors
from fastmode.server.errors import APIError, InvalidRequest, new_id
from fastmode.server.state import ServerState
from fastmode.server.validate import API_VERSIONS

log = logging.getLogger("fastmode.server")
MAX_BODY = 32 * 1024 * 1024


class ClientGone(Exception):
    """The client disconnected before its answer was ready (or while sending its request)."""


Handler = Callable[[Request, ServerState], Awaitable[Response]]


def endpoint(handler: Handler, *, versioned: bool = True, admin: bool = False,
             authenticated: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler with auth, version checks, request-id and error rendering."""

    async def run(request: Request) -> Response:
        rid = new_id("req_")
        request.state.request_id = rid
        state: ServerState = request.app.state.fastmode
        org_id = None
        try:
            if authenticated:
                principal = authenticate(request, state)
                org_id = principal.org.id
                if admin and not principal.admin:
                    raise errors.PermissionDenied("this endpoint requires an admin API key "
                                                  "(fastmode accounts key create ORG --admin)")
                if not admin and principal.admin and principal.api_key_id is not None:
                    raise errors.PermissionDenied("admin API keys reach the admin APIs only; use a regular API key")
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
        if org_id:
            response.headers["anthropic-organization-id"] = org_id
        return response

    return run


def authenticate(request: Request, state: ServerState) -> Principal:
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    try:
        principal = state.platform.accounts.authenticate(key)
    except InvalidKey as e:
        raise errors.AuthenticationError(str(e)) from e
    request.state.principal = principal
    return principal


def limit_param(request: Request, default: int = 20, maximum: int = 1000) -> int:
    raw = request.query_params.get("limit", str(default))
    if not re.fullmatch(r"[0-9]{1,7}", raw) or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"limit: Input should be an integer between 1 and {maximum}")
    return int(raw)


def betas(request: Request) -> set[str]:
    return {b.strip() for b in request.headers.get("anthropic-beta", "").split(",") if b.strip()}


def _check_version(request: Request) -> str:
    version = request.headers.get("anthropic-version")
    if version is None:
        raise InvalidRequest(f"anthropic-version: header is required (one of {', '.join(API_VERSIONS)})")
    if version not in API_VERSIONS:
        raise InvalidRequest(f"anthropic-version: {version!r} is not a valid version (one of {', '.join(API_VERSIONS)})")
    return version


async def json_body(request: Request, limit: int = MAX_BODY) -> Any:
    """The body as JSON. At most `limit` bytes are kept: past it the rest is read and dropped
    (so the client gets its 413, not a reset connection, and memory stays bounded however many
    arrive at once). A client that leaves mid-upload is ClientGone."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif chunks:
                chunks.clear()  # over the limit: keep counting, keep nothing
    except ClientDisconnect as e:
        raise ClientGone() from e
    if size > limit:
        raise errors.RequestTooLarge(f"request body of {size} bytes exceeds the {limit} byte limit")
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise InvalidRequest("The request body is nested too deeply") from e
