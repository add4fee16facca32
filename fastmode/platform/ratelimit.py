"""Per-organization, per-lane rate limits: GCRA buckets with a one-minute burst, replenished continuously.

A pool is an (org_id, lane) pair. Each pool keeps one theoretical arrival time (TAT) per dimension:
the moment its bucket is full again. Output tokens are reserved at admission (the request's
max_tokens); settling the admission gives back what was not used. Times are kept relative to the
limiter's creation so that float precision stays far below one token even for large limits."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

WINDOW = 60.0
EPS = 1e-6
DIMENSIONS = ("requests", "input_tokens", "output_tokens")
LANES = ("standard", "fast")

Pool = tuple[str, str]


@dataclass(frozen=True)
class LaneLimits:
    """Per-minute limits of one lane: None is unlimited (untracked), 0 allows nothing."""

    requests_per_minute: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None

    def of(self, dimension: str) -> int | None:
        """The limit of one of DIMENSIONS."""
        return {"requests": self.requests_per_minute, "input_tokens": self.input_tokens_per_minute,
                "output_tokens": self.output_tokens_per_minute}[dimension]


class RateLimitExceeded(Exception):
    """A refusal: `dimension` refused; `retry_after` seconds until the same request fits everywhere,
    unless `never` (the cost alone exceeds the limit); `headers` describe the pool at refusal."""

    def __init__(self, dimension: str, retry_after: float, never: bool, headers: dict[str, str],
                 limit: int | None = None) -> None:
        super().__init__(f"rate limit exceeded on {dimension}"
                         + (" (request exceeds the limit)" if never else f"; retry after {retry_after:.3f}s"))
        self.dimension = dimension
        self.limit = limit  # the refused dimension's limit per minute
        self.retry_after = retry_after
        self.never = never
        self.headers = headers


class Admission:
    """A granted request. `settle` it once with the output tokens actually produced."""

    def __init__(self, limiter: RateLimiter, pool: Pool, reserved: int, seconds_per_token: float | None,
                 headers: dict[str, str]) -> None:
        self.pool = pool
        self.reserved_output_tokens = reserved
        self.headers = headers
        self._limiter = limiter
        self._seconds_per_token = seconds_per_token
        self._settled = False
        self.charges: dict[str, float] = {}  # seconds of each dimension's bucket this admission took

    def cancel(self) -> None:
        """The request never ran: give back everything it took (request, input, output); once."""
        self._limiter._cancel(self)

    def settle(self, output_tokens_used: int) -> None:
        """Give back the unused part of the output-token reservation; later calls do nothing."""
        self._limiter._settle(self, output_tokens_used)


class RateLimiter:
    """GCRA limits per pool and dimension; `clock` returns wall-clock unix seconds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._origin = clock()
        self._tat: dict[tuple[Pool, str], float] = {}

    def admit(self, pool: Pool, limits: LaneLimits, input_tokens: int, output_tokens: int) -> Admission:
        """Charge one request, its input tokens and its output reservation, all or none.

        Raises RateLimitExceeded when any tracked dimension cannot take its cost now."""
        _check_lane(pool)
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError("token counts must be >= 0")
        costs = {"requests": 1, "input_tokens": input_tokens, "output_tokens": output_tokens}
        with self._lock:
            now = self._now()
            never: str | None = None
            waits: dict[str, float] = {}
            for dim, cost in costs.items():
                limit = limits.of(dim)
                if limit is None or cost == 0:
                    continue
                if cost > limit:
                    never = never or dim
                    continue
                wait = self._deficit(pool, dim, now) + cost * WINDOW / limit - WINDOW
                if wait > EPS:
                    waits[dim] = wait
            if never is not None:
                raise RateLimitExceeded(never, 0.0, True, self._headers(pool, limits, now), limits.of(never))
            if waits:
                dim = max(waits, key=waits.__getitem__)
                raise RateLimitExceeded(dim, waits[dim], False, self._headers(pool, limits, now))
            charges = {}
            for dim, cost in costs.items():
                limit = limits.of(dim)
                if limit is not None and cost:
                    key = (pool, dim)
                    charges[dim] = cost * WINDOW / limit
                    self._tat[key] = max(self._tat.get(key, now), now) + charges[dim]
            out_limit = limits.output_tokens_per_minute
            admission = Admission(self, pool, output_tokens, WINDOW / out_limit if out_limit else None,
                                  self._headers(pool, limits, now))
            admission.charges = charges
            return admission

    def snapshot_headers(self, pool: Pool, limits: LaneLimits) -> dict[str, str]:
        """The pool's rate-limit headers now, without admitting anything."""
        _check_lane(pool)
        with self._lock:
            return self._headers(pool, limits, self._now())

    def _settle(self, admission: Admission, used: int) -> None:
        with self._lock:
            if admission._settled:
                return
            admission._settled = True
            unused = min(admission.reserved_output_tokens, max(0, admission.reserved_output_tokens - used))
            key = (admission.pool, "output_tokens")
            if unused and admission._seconds_per_token is not None and key in self._tat:
                self._tat[key] = max(self._now(), self._tat[key] - unused * admission._seconds_per_token)

    def _cancel(self, admission: Admission) -> None:
        with self._lock:
            if admission._settled:
                return
            admission._settled = True
            now = self._now()
            for dim, seconds in admission.charges.items():
                key = (admission.pool, dim)
                if key in self._tat:
                    self._tat[key] = max(now, self._tat[key] - seconds)

    def _now(self) -> float:
        return self._clock() - self._origin

    def _deficit(self, pool: Pool, dim: str, now: float) -> float:
        """Seconds until the bucket is full again (0 when full)."""
        return max(0.0, self._tat.get((pool, dim), now) - now)

    def _state(self, pool: Pool, dim: str, limit: int, now: float) -> tuple[int, int, str]:
        deficit = self._deficit(pool, dim, now)
        remaining = 0 if limit == 0 else min(limit, max(0, math.floor((WINDOW + EPS - deficit) * limit / WINDOW)))
        return limit, remaining, _rfc3339(self._origin + now + deficit)

    def _headers(self, pool: Pool, limits: LaneLimits, now: float) -> dict[str, str]:
        fast = pool[1] == "fast"
        states = {dim: self._state(pool, dim, limit, now) for dim in DIMENSIONS
                  if (limit := limits.of(dim)) is not None and not (fast and dim == "requests")}
        prefix = "anthropic-fast-" if fast else "anthropic-ratelimit-"
        named = {dim.replace("_", "-"): state for dim, state in states.items()}
        if not fast:
            tokens = [states[d] for d in ("input_tokens", "output_tokens") if d in states]
            if tokens:
                named["tokens"] = min(tokens, key=lambda s: s[1])
        headers: dict[str, str] = {}
        for name, (limit, remaining, reset) in named.items():
            headers[f"{prefix}{name}-limit"] = str(limit)
            headers[f"{prefix}{name}-remaining"] = str(remaining)
            headers[f"{prefix}{name}-reset"] = reset
        return headers


def retry_headers(exc: RateLimitExceeded) -> dict[str, str]:
    """The headers of a 429 for `exc`: its rate-limit headers plus retry advice."""
    headers = dict(exc.headers)
    if exc.never:
        headers["x-should-retry"] = "false"
    else:
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after - EPS)))
        headers["retry-after-ms"] = str(max(1, math.ceil(exc.retry_after * 1000 - EPS * 1000)))
    return headers


def _rfc3339(ts: float) -> str:
    """UTC, whole seconds rounded up (never earlier than the instant), trailing Z."""
    return datetime.fromtimestamp(math.ceil(ts - EPS), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_lane(pool: Pool) -> None:
    if pool[1] not in LANES:
        raise ValueError(f"unknown lane {pool[1]!r}; expected one of {LANES}")
