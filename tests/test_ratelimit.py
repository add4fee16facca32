"""GCRA rate limits per (org, lane): admission, replenishment, settlement, headers, concurrency."""
from __future__ import annotations

import random
import threading
from datetime import datetime, timezone

import pytest

from fastmode.platform.ratelimit import LaneLimits, RateLimiter, RateLimitExceeded, retry_headers

START = datetime(2026, 11, 22, 10, 0, 0, tzinfo=timezone.utc).timestamp()
STD, FAST, OTHER = ("org_a", "standard"), ("org_a", "fast"), ("org_b", "standard")


class FakeClock:
    """A hand-advanced clock; `last` is the value most recently read by the calling thread."""

    def __init__(self, t: float = START) -> None:
        self.t = t
        self._local = threading.local()

    def __call__(self) -> float:
        self._local.last = self.t
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    @property
    def last(self) -> float:
        return self._local.last


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def refusal(limiter: RateLimiter, pool, limits: LaneLimits, inp: int = 0, out: int = 0) -> RateLimitExceeded:
    with pytest.raises(RateLimitExceeded) as info:
        limiter.admit(pool, limits, inp, out)
    return info.value


def remaining(limiter: RateLimiter, pool, limits: LaneLimits, name: str) -> int:
    return int(limiter.snapshot_headers(pool, limits)[f"{name}-remaining"])


def test_burst_to_the_limit_then_refusal_with_exact_retry_after(clock):
    limiter, limits = RateLimiter(clock), LaneLimits(requests_per_minute=600)
    for _ in range(600):
        limiter.admit(STD, limits, 0, 0)
    exc = refusal(limiter, STD, limits)
    assert exc.dimension == "requests" and not exc.never
    assert exc.retry_after == pytest.approx(0.1)

    tokens = LaneLimits(input_tokens_per_minute=600)
    limiter.admit(STD, tokens, 595, 0)
    exc = refusal(limiter, STD, tokens, inp=10)
    assert exc.dimension == "input_tokens" and exc.retry_after == pytest.approx(0.5)
    assert exc.headers["anthropic-ratelimit-input-tokens-remaining"] == "5"


def test_continuous_replenishment(clock):
    limiter, limits = RateLimiter(clock), LaneLimits(requests_per_minute=600, input_tokens_per_minute=6000)
    for _ in range(60):
        limiter.admit(STD, limits, 100, 0)
    exc = refusal(limiter, STD, limits, inp=250)
    assert exc.dimension == "input_tokens" and exc.retry_after == pytest.approx(2.5)
    clock.advance(exc.retry_after)
    limiter.admit(STD, limits, 250, 0)
    assert refusal(limiter, STD, limits, inp=1).retry_after == pytest.approx(0.01)
    clock.advance(1.0)
    assert remaining(limiter, STD, limits, "anthropic-ratelimit-input-tokens") == 100
    clock.advance(120.0)
    assert remaining(limiter, STD, limits, "anthropic-ratelimit-input-tokens") == 6000


def test_retry_after_is_the_latest_dimension(clock):
    limiter = RateLimiter(clock)
    limits = LaneLimits(requests_per_minute=60, input_tokens_per_minute=600, output_tokens_per_minute=600)
    limiter.admit(STD, limits, 600, 300)
    exc = refusal(limiter, STD, limits, inp=10, out=400)
    assert exc.dimension == "output_tokens" and exc.retry_after == pytest.approx(10.0)
    clock.advance(9.0)
    assert refusal(limiter, STD, limits, inp=10, out=400).retry_after == pytest.approx(1.0)
    assert remaining(limiter, STD, limits, "anthropic-ratelimit-output-tokens") == 390
    clock.advance(1.0)
    limiter.admit(STD, limits, 10, 400)


def test_refusal_commits_nothing(clock):
    limiter = RateLimiter(clock)
    limits = LaneLimits(requests_per_minute=10, input_tokens_per_minute=100, output_tokens_per_minute=100)
    limiter.admit(STD, limits, 0, 100)
    before = limiter.snapshot_headers(STD, limits)
    refusal(limiter, STD, limits, inp=50, out=1)
    assert limiter.snapshot_headers(STD, limits) == before


def test_pools_are_independent(clock):
    limiter = RateLimiter(clock)
    std = LaneLimits(requests_per_minute=100, input_tokens_per_minute=1000, output_tokens_per_minute=1000)
    fast = LaneLimits(input_tokens_per_minute=1000, output_tokens_per_minute=1000)
    limiter.admit(STD, std, 100, 100)
    before = limiter.snapshot_headers(STD, std)
    limiter.admit(FAST, fast, 1000, 1000)
    assert refusal(limiter, FAST, fast, inp=1).dimension == "input_tokens"
    assert limiter.snapshot_headers(STD, std) == before
    limiter.admit(STD, std, 900, 900)
    other = ("org_b", "fast")
    assert remaining(limiter, other, fast, "anthropic-fast-input-tokens") == 1000
    limiter.admit(other, fast, 1000, 1000)


def test_settle_returns_unused_reservation_once(clock):
    limiter, limits = RateLimiter(clock), LaneLimits(output_tokens_per_minute=1000)
    out = "anthropic-ratelimit-output-tokens"
    adm = limiter.admit(STD, limits, 0, 400)
    assert adm.headers[f"{out}-remaining"] == "600"
    adm.settle(100)
    assert remaining(limiter, STD, limits, out) == 900
    adm.settle(0)
    assert remaining(limiter, STD, limits, out) == 900

    over = limiter.admit(STD, limits, 0, 100)
    over.settle(500)
    assert remaining(limiter, STD, limits, out) == 800

    late = limiter.admit(STD, limits, 0, 800)
    clock.advance(60.0)
    late.settle(0)
    assert remaining(limiter, STD, limits, out) == 1000
    limiter.admit(STD, limits, 0, 1000)
    assert refusal(limiter, STD, limits, out=1).dimension == "output_tokens"


def test_refund_never_overfills_the_bucket(clock):
    limiter, limits = RateLimiter(clock), LaneLimits(output_tokens_per_minute=600)
    first = limiter.admit(STD, limits, 0, 300)
    second = limiter.admit(STD, limits, 0, 300)
    clock.advance(40.0)
    first.settle(0)
    second.settle(0)
    out = "anthropic-ratelimit-output-tokens"
    assert remaining(limiter, STD, limits, out) == 600
    limiter.admit(STD, limits, 0, 600)
    assert refusal(limiter, STD, limits, out=1).retry_after == pytest.approx(0.1)


def test_cost_above_limit_is_never_admissible(clock):
    limiter, limits = RateLimiter(clock), LaneLimits(requests_per_minute=10, output_tokens_per_minute=1000)
    exc = refusal(limiter, STD, limits, out=1001)
    assert exc.never and exc.dimension == "output_tokens"
    headers = retry_headers(exc)
    assert headers["x-should-retry"] == "false"
    assert "retry-after" not in headers and "retry-after-ms" not in headers
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "1000"
    limiter.admit(STD, limits, 0, 1000)


def test_retry_headers_round_up(clock):
    limiter, limits = RateLimiter(clock), LaneLimits(requests_per_minute=600, input_tokens_per_minute=60)
    limiter.admit(STD, limits, 60, 0)
    exc = refusal(limiter, STD, limits, inp=2)
    assert retry_headers(exc) == {**exc.headers, "retry-after": "2", "retry-after-ms": "2000"}
    clock.advance(0.5)
    headers = retry_headers(refusal(limiter, STD, limits, inp=2))
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")
    assert "x-should-retry" not in headers
    requests = LaneLimits(requests_per_minute=600)
    for _ in range(600):
        limiter.admit(OTHER, requests, 0, 0)
    headers = retry_headers(refusal(limiter, OTHER, requests))
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "100")


def test_fast_limit_zero_advertises_no_capacity_and_refuses(clock):
    limiter, limits = RateLimiter(clock), LaneLimits(input_tokens_per_minute=0, output_tokens_per_minute=0)
    assert limiter.snapshot_headers(FAST, limits) == {
        "anthropic-fast-input-tokens-limit": "0", "anthropic-fast-input-tokens-remaining": "0",
        "anthropic-fast-input-tokens-reset": "2026-11-22T10:00:00Z",
        "anthropic-fast-output-tokens-limit": "0", "anthropic-fast-output-tokens-remaining": "0",
        "anthropic-fast-output-tokens-reset": "2026-11-22T10:00:00Z"}
    exc = refusal(limiter, FAST, limits, inp=10, out=10)
    assert exc.never and exc.dimension == "input_tokens"
    assert exc.headers["anthropic-fast-output-tokens-limit"] == "0"
    assert retry_headers(exc)["x-should-retry"] == "false"


def test_standard_headers(clock):
    limiter = RateLimiter(clock)
    limits = LaneLimits(requests_per_minute=50, input_tokens_per_minute=1000, output_tokens_per_minute=400)
    clock.advance(0.25)
    adm = limiter.admit(STD, limits, 100, 300)
    assert adm.headers == {
        "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": "2026-11-22T10:00:02Z",
        "anthropic-ratelimit-input-tokens-limit": "1000", "anthropic-ratelimit-input-tokens-remaining": "900",
        "anthropic-ratelimit-input-tokens-reset": "2026-11-22T10:00:07Z",
        "anthropic-ratelimit-output-tokens-limit": "400", "anthropic-ratelimit-output-tokens-remaining": "100",
        "anthropic-ratelimit-output-tokens-reset": "2026-11-22T10:00:46Z",
        "anthropic-ratelimit-tokens-limit": "400", "anthropic-ratelimit-tokens-remaining": "100",
        "anthropic-ratelimit-tokens-reset": "2026-11-22T10:00:46Z"}
    clock.advance(100.0)
    headers = limiter.snapshot_headers(STD, LaneLimits(input_tokens_per_minute=1000))
    assert headers == {
        "anthropic-ratelimit-input-tokens-limit": "1000", "anthropic-ratelimit-input-tokens-remaining": "1000",
        "anthropic-ratelimit-input-tokens-reset": "2026-11-22T10:01:41Z",
        "anthropic-ratelimit-tokens-limit": "1000", "anthropic-ratelimit-tokens-remaining": "1000",
        "anthropic-ratelimit-tokens-reset": "2026-11-22T10:01:41Z"}
    assert limiter.snapshot_headers(STD, LaneLimits()) == {}


def test_fast_headers(clock):
    limiter = RateLimiter(clock)
    limits = LaneLimits(requests_per_minute=5, input_tokens_per_minute=6000, output_tokens_per_minute=1200)
    adm = limiter.admit(FAST, limits, 3000, 100)
    assert adm.headers == {
        "anthropic-fast-input-tokens-limit": "6000", "anthropic-fast-input-tokens-remaining": "3000",
        "anthropic-fast-input-tokens-reset": "2026-11-22T10:00:30Z",
        "anthropic-fast-output-tokens-limit": "1200", "anthropic-fast-output-tokens-remaining": "1100",
        "anthropic-fast-output-tokens-reset": "2026-11-22T10:00:05Z"}


def test_unknown_lane_and_negative_costs_are_rejected(clock):
    limiter = RateLimiter(clock)
    with pytest.raises(ValueError):
        limiter.admit(("org_a", "turbo"), LaneLimits(), 0, 0)
    with pytest.raises(ValueError):
        limiter.admit(STD, LaneLimits(), -1, 0)


def run_threads(n: int, target) -> None:
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=target, args=(i, barrier)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_admissions_never_exceed_capacity(clock):
    limit = 5000
    limiter, limits = RateLimiter(clock), LaneLimits(output_tokens_per_minute=limit)
    admitted: list[int] = []

    def worker(seed: int, barrier: threading.Barrier) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(150):
            n = rng.randint(1, 60)
            try:
                limiter.admit(STD, limits, 0, n)
            except RateLimitExceeded:
                continue
            admitted.append(n)

    run_threads(32, worker)
    left = remaining(limiter, STD, limits, "anthropic-ratelimit-output-tokens")
    assert sum(admitted) <= limit and sum(admitted) + left == limit
    assert left < 60


def test_concurrent_settlement_with_advancing_clock_respects_window_bound(clock):
    limit, max_res, step, steps = 3000, 100, 0.25, 200
    limiter, limits = RateLimiter(clock), LaneLimits(output_tokens_per_minute=limit)
    events: list[tuple[float, int]] = []
    done = threading.Event()

    def worker(seed: int, barrier: threading.Barrier) -> None:
        rng = random.Random(seed)
        barrier.wait()
        if seed == 0:
            for _ in range(steps):
                clock.advance(step)
                done.wait(0.002)
            done.set()
            return
        pending = []
        while not done.is_set():
            n = rng.randint(1, max_res)
            try:
                pending.append((limiter.admit(STD, limits, 0, n), n))
                events.append((clock.last, n))
            except RateLimitExceeded:
                pass
            if pending and rng.random() < 0.5:
                adm, n = pending.pop(rng.randrange(len(pending)))
                used = rng.randint(0, n)
                adm.settle(used)
                events.append((clock.last, -(n - used)))

    run_threads(32, worker)
    totals: dict[float, int] = {}
    for t, n in events:
        totals[t] = totals.get(t, 0) + n
    times = sorted(totals)
    prefix = [0]
    for t in times:
        prefix.append(prefix[-1] + totals[t])
    assert sum(n for _, n in events if n > 0) > 2 * limit
    assert any(n < 0 for _, n in events)
    for i, a in enumerate(times):
        for j in range(i, len(times)):
            net = prefix[j + 1] - prefix[i]
            assert net <= limit * (1 + (times[j] - a) / 60) + max_res, (a, times[j], net)
