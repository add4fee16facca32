"""fastmode.client against a scripted fake Messages API served by uvicorn on loopback."""
from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import anthropic
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conftest import free_port, serve_asgi
from fastmode.client import FastResult, async_create_message_with_fast_fallback, create_message_with_fast_fallback


@dataclass(frozen=True)
class Seen:
    """One request as the fake server received it."""

    speed: str | None
    retry_count: str | None
    beta_header: str | None


Script = Callable[[Seen, int], Response]  # (request, index of that request) -> response


def message(speed: str | None) -> JSONResponse:
    usage: dict[str, Any] = {"input_tokens": 3, "output_tokens": 1, "speed": speed}
    return JSONResponse({
        "id": "msg_fake", "type": "message", "role": "assistant", "model": "fake-model",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": usage,
    })


def error(status: int, kind: str, **headers: str) -> JSONResponse:
    body = {"type": "error", "error": {"type": kind, "message": f"scripted {kind}"}}
    return JSONResponse(body, status_code=status, headers=headers)


def echo(seen: Seen, i: int) -> Response:
    return message(seen.speed or "standard")


def fast_limited(seen: Seen, i: int) -> Response:
    if seen.speed == "fast":
        return error(429, "rate_limit_error", **{"retry-after": "1"})
    return echo(seen, i)


@dataclass
class FakeAPI:
    script: Script = echo
    seen: list[Seen] = field(default_factory=list)

    async def messages(self, request: Request) -> Response:
        body = await request.json()
        seen = Seen(
            body.get("speed"), request.headers.get("x-stainless-retry-count"), request.headers.get("anthropic-beta"),
        )
        self.seen.append(seen)
        return self.script(seen, len(self.seen) - 1)


def serve(api: FakeAPI):
    return serve_asgi(Starlette(routes=[Route("/v1/messages", api.messages, methods=["POST"])]), "fake API")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeAPI]]:
    api = FakeAPI()
    with serve(api) as url:
        yield url, api


@pytest.fixture
def api(server: tuple[str, FakeAPI]) -> FakeAPI:
    server[1].script, server[1].seen = echo, []
    return server[1]


@pytest.fixture
def client(server: tuple[str, FakeAPI]) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server[0], api_key="k") as c:
        yield c


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


REQUEST: dict[str, Any] = {
    "model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}],
}


def fast(**extra: Any) -> dict[str, Any]:
    return {**REQUEST, "speed": "fast", **extra}


def test_fast_success(api: FakeAPI, client: anthropic.Anthropic) -> None:
    r = create_message_with_fast_fallback(client, **fast())
    assert (r.speed, r.fell_back, r.attempts) == ("fast", False, 1)
    assert r.message.content[0].text == "hi"  # type: ignore[union-attr]
    assert api.seen == [Seen("fast", "0", None)]


def test_fast_429_falls_back_without_sdk_retry(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = fast_limited
    sleeps = Sleeps()
    r = create_message_with_fast_fallback(client, sleep=sleeps, **fast())
    assert (r.speed, r.fell_back, r.attempts) == ("standard", True, 2)
    # Exactly two HTTP requests, both first tries: the SDK never retried the 429 nor honored retry-after.
    assert [(s.speed, s.retry_count) for s in api.seen] == [("fast", "0"), (None, "0")]
    assert sleeps == []  # nor did the helper wait


def test_429_on_both_speeds_raises(api: FakeAPI, server: tuple[str, FakeAPI]) -> None:
    api.script = lambda seen, i: error(429, "rate_limit_error", **{"retry-after": "1"})
    with anthropic.Anthropic(base_url=server[0], api_key="k", max_retries=0) as c:
        with pytest.raises(anthropic.RateLimitError):
            create_message_with_fast_fallback(c, **fast())
    assert [s.speed for s in api.seen] == ["fast", None]


def test_529_then_success_retries_same_speed(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = lambda seen, i: error(529, "overloaded_error") if i == 0 else echo(seen, i)
    sleeps = Sleeps()
    r = create_message_with_fast_fallback(client, sleep=sleeps, **fast())
    assert (r.speed, r.fell_back, r.attempts) == ("fast", False, 2)
    assert [(s.speed, s.retry_count) for s in api.seen] == [("fast", "0"), ("fast", "0")]
    assert sleeps == [0.5]


def test_5xx_exhausts_attempts_with_capped_backoff(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = lambda seen, i: error(500, "api_error")
    sleeps = Sleeps()
    with pytest.raises(anthropic.InternalServerError):
        create_message_with_fast_fallback(client, max_attempts=7, sleep=sleeps, **fast())
    assert [s.speed for s in api.seen] == ["fast"] * 7  # no fallback on 5xx
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_400_raises_unchanged(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = lambda seen, i: error(400, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError):
        create_message_with_fast_fallback(client, sleep=Sleeps(), **fast())
    assert len(api.seen) == 1


def test_connection_error_after_max_attempts() -> None:
    sleeps = Sleeps()
    with anthropic.Anthropic(base_url=f"http://127.0.0.1:{free_port()}", api_key="k", timeout=2) as c:
        with pytest.raises(anthropic.APIConnectionError):
            create_message_with_fast_fallback(c, max_attempts=3, sleep=sleeps, **fast())
    assert sleeps == [0.5, 1.0]  # three attempts, two backoffs


def test_silent_server_fallback_reports_standard(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = lambda seen, i: message("standard")
    r = create_message_with_fast_fallback(client, **fast())
    assert (r.speed, r.fell_back, r.attempts) == ("standard", False, 1)
    assert api.seen[0].speed == "fast"


def test_speed_defaults_to_requested_when_unreported(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = lambda seen, i: message(None)
    assert create_message_with_fast_fallback(client, **fast()).speed == "fast"
    assert create_message_with_fast_fallback(client, **REQUEST).speed == "standard"


def test_standard_request(api: FakeAPI, client: anthropic.Anthropic) -> None:
    r = create_message_with_fast_fallback(client, **REQUEST)
    assert (r.speed, r.fell_back, r.attempts) == ("standard", False, 1)
    assert api.seen == [Seen(None, "0", None)]


def test_betas_use_beta_endpoint_and_survive_fallback(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = fast_limited
    r = create_message_with_fast_fallback(client, **fast(betas=["fast-mode-2026-02-01"]))
    assert (r.speed, r.fell_back) == ("standard", True)
    assert type(r.message).__name__ == "BetaMessage"
    assert all("fast-mode-2026-02-01" in (s.beta_header or "") for s in api.seen)
    assert len(api.seen) == 2


def test_params_not_mutated(api: FakeAPI, client: anthropic.Anthropic) -> None:
    api.script = fast_limited
    params = fast(betas=["fast-mode-2026-02-01"])
    before = copy.deepcopy(params)
    create_message_with_fast_fallback(client, **params)
    assert params == before


def test_invalid_arguments(client: anthropic.Anthropic) -> None:
    with pytest.raises(ValueError):
        create_message_with_fast_fallback(client, max_attempts=0, **fast())
    with pytest.raises(ValueError):
        create_message_with_fast_fallback(client, stream=True, **fast())


def test_async_fast_429_falls_back(api: FakeAPI, server: tuple[str, FakeAPI]) -> None:
    api.script = fast_limited

    async def main() -> FastResult:
        async with anthropic.AsyncAnthropic(base_url=server[0], api_key="k") as c:
            return await async_create_message_with_fast_fallback(c, **fast())

    r = asyncio.run(main())
    assert (r.speed, r.fell_back, r.attempts) == ("standard", True, 2)
    assert [(s.speed, s.retry_count) for s in api.seen] == [("fast", "0"), (None, "0")]


def test_async_529_retries_with_async_sleep(api: FakeAPI, server: tuple[str, FakeAPI]) -> None:
    api.script = lambda seen, i: error(529, "overloaded_error") if i == 0 else echo(seen, i)
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def main() -> FastResult:
        async with anthropic.AsyncAnthropic(base_url=server[0], api_key="k") as c:
            return await async_create_message_with_fast_fallback(c, sleep=record, **fast())

    r = asyncio.run(main())
    assert (r.speed, r.fell_back, r.attempts) == ("fast", False, 2)
    assert sleeps == [0.5]
