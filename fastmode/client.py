"""Client helpers: fast mode with automatic fallback to standard speed.

Standalone on top of the official ``anthropic`` SDK (imports nothing else from fastmode).

A ``speed="fast"`` request is sent with the SDK's own retries off, so a 429 from the fast-mode
rate limiter falls back to standard speed at once instead of waiting out ``retry-after``.
5xx (529 overloaded included) and connection errors are retried at the same speed with
exponential backoff; any other error is raised unchanged. Non-streaming requests only.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NamedTuple, Union

import anthropic
from anthropic.types import Message
from anthropic.types.beta import BetaMessage

__all__ = ["FastResult", "create_message_with_fast_fallback", "async_create_message_with_fast_fallback"]

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0


@dataclass(frozen=True)
class FastResult:
    """A message plus how it was served."""

    message: Union[Message, BetaMessage]
    speed: str  # the speed that served it: usage.speed when reported, else the speed requested
    fell_back: bool  # True when the client dropped to standard after a fast-mode 429
    attempts: int  # HTTP attempts made by this helper (SDK-internal retries not counted)


class _Stage(NamedTuple):
    client: Any  # Anthropic | AsyncAnthropic
    params: dict[str, Any]
    speed: str
    fell_back: bool
    final: bool  # a 429 here is raised rather than falling back


def _stages(client: Any, params: dict[str, Any], max_attempts: int) -> list[_Stage]:
    """Validate the call and plan it: fast (no SDK retries) then standard, or a single stage."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    if params.get("stream"):
        raise ValueError("streaming is not supported; use a non-streaming request")
    if params.get("speed") != "fast":
        return [_Stage(client, params, params.get("speed") or "standard", False, True)]
    standard = {k: v for k, v in params.items() if k != "speed"}
    return [
        _Stage(client.with_options(max_retries=0), params, "fast", False, False),
        _Stage(client, standard, "standard", True, True),
    ]


def _create(client: Any, params: dict[str, Any]) -> Callable[..., Any]:
    """The create method: beta endpoint when the request names betas."""
    return (client.beta.messages if "betas" in params else client.messages).create


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, anthropic.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(exc, anthropic.APIStatusError) and exc.status_code >= 500


def _backoff(attempt: int) -> float:
    """Delay after failed attempt number `attempt` (1-based): 0.5 s doubling, capped."""
    return min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_CAP_S)


def _result(message: Any, stage: _Stage, attempts: int) -> FastResult:
    served = getattr(getattr(message, "usage", None), "speed", None)
    return FastResult(message, served or stage.speed, stage.fell_back, attempts)


def create_message_with_fast_fallback(
    client: anthropic.Anthropic,
    *,
    max_attempts: int = 3,
    sleep: Callable[[float], object] = time.sleep,
    **params: Any,
) -> FastResult:
    """Create a message; a fast-mode 429 falls back to standard speed, 5xx/connection errors retry.

    `max_attempts` bounds the attempts per speed; `params` go to ``messages.create``
    (``beta.messages.create`` when they include ``betas``).
    """
    attempts = 0
    for stage in _stages(client, params, max_attempts):
        create = _create(stage.client, stage.params)
        for n in range(1, max_attempts + 1):
            attempts += 1
            try:
                return _result(create(**stage.params), stage, attempts)
            except anthropic.RateLimitError:
                if stage.final:
                    raise
                break
            except anthropic.APIError as exc:
                if n == max_attempts or not _retryable(exc):
                    raise
            sleep(_backoff(n))
    raise AssertionError("unreachable")


async def async_create_message_with_fast_fallback(
    client: anthropic.AsyncAnthropic,
    *,
    max_attempts: int = 3,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    **params: Any,
) -> FastResult:
    """Async twin of :func:`create_message_with_fast_fallback`."""
    attempts = 0
    for stage in _stages(client, params, max_attempts):
        create = _create(stage.client, stage.params)
        for n in range(1, max_attempts + 1):
            attempts += 1
            try:
                return _result(await create(**stage.params), stage, attempts)
            except anthropic.RateLimitError:
                if stage.final:
                    raise
                break
            except anthropic.APIError as exc:
                if n == max_attempts or not _retryable(exc):
                    raise
            await sleep(_backoff(n))
    raise AssertionError("unreachable")
