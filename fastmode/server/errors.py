"""Typed API errors and the one place that turns them into Anthropic error JSON."""
from __future__ import annotations

import json
import secrets
import string

from starlette.responses import Response

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(APIError):
    pass


class AuthenticationError(APIError):
    status, type = 401, "authentication_error"


class PermissionDenied(APIError):
    status, type = 403, "permission_error"


class NotFound(APIError):
    status, type = 404, "not_found_error"


class RequestTooLarge(APIError):
    status, type = 413, "request_too_large"


class RateLimited(APIError):
    status, type = 429, "rate_limit_error"


class InternalError(APIError):
    status, type = 500, "api_error"


class Overloaded(APIError):
    status, type = 529, "overloaded_error"


def error_body(err: APIError, request_id: str) -> dict:
    return {"type": "error", "error": {"type": err.type, "message": err.message}, "request_id": request_id}


def error_response(err: APIError, request_id: str) -> Response:
    headers = {"request-id": request_id, **err.headers}
    return Response(json.dumps(error_body(err, request_id)), status_code=err.status,
                    media_type="application/json", headers=headers)
