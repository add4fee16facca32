"""The platform facade the HTTP edge talks to: who is calling, may they run now (per-lane rate
limits), and what did it cost (the ledger). One `Ticket` per admitted request settles its
output-token reservation and writes its usage row exactly once, however the request ends."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from fastmode.platform.accounts import Accounts, Organization
from fastmode.platform.catalog import ModelEntry
from fastmode.platform.db import Database
from fastmode.platform.ledger import Charge, Ledger, LedgerRow, Usage
from fastmode.platform.ratelimit import Admission, LaneLimits, RateLimiter


@dataclass
class Ticket:
    """An admitted request: its rate-limit headers now, its usage row when it ends."""

    platform: Platform
    org: Organization
    api_key_id: str | None
    entry: ModelEntry
    request_id: str
    speed: str
    service_tier: str
    inference_geo: str
    admission: Admission | None
    headers: dict[str, str] = field(default_factory=dict)
    charge: Charge | None = None
    released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def release(self) -> None:
        """The request never ran (refused after admission, or a batch item cut off): give back
        what it took from its pool and record nothing."""
        with self._lock:
            if self.charge is None and self.admission is not None:
                self.admission.cancel()
            self.released = True

    def finish(self, usage: Usage, outcome: str) -> Charge | None:
        """Settle the reservation and record the usage row; later calls do nothing."""
        with self._lock:
            if self.charge is not None or self.released:
                return None
            if self.admission is not None:
                self.admission.settle(usage.output_tokens)
            self.charge = self.platform.ledger.record(
                LedgerRow(self.request_id, self.org.id, self.api_key_id, self.entry.id, self.speed,
                          self.service_tier, self.inference_geo, usage, outcome), self.entry.prices)
            return self.charge


class Platform:
    def __init__(self, db: Database | None = None, *, open_mode: bool = True,
                 limits: dict[str, dict[str, int]] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.db = db or Database()
        self.accounts = Accounts(self.db, open_mode)
        self.limiter = RateLimiter(clock)
        self.ledger = Ledger(self.db, clock)
        self.limits = limits or {}
        self.clock = clock

    def lane_limits(self, org: Organization, lane: str) -> LaneLimits:
        """The server's per-minute limits for the lane, with the organization's overrides on top."""
        merged = {**self.limits.get(lane, {}), **org.limits.get(lane, {})}
        return LaneLimits(**merged)

    def admit(self, org: Organization, api_key_id: str | None, entry: ModelEntry, *, request_id: str, speed: str,
              service_tier: str, inference_geo: str, input_tokens: int, max_tokens: int,
              rate_limited: bool = True) -> Ticket:
        """Take the request's tokens from its lane's pool (raises RateLimitExceeded)."""
        admission = None
        headers: dict[str, str] = {}
        if rate_limited:
            admission = self.limiter.admit((org.id, speed), self.lane_limits(org, speed), input_tokens, max_tokens)
            headers = dict(admission.headers)
            if speed == "standard" and org.fast_mode:  # clients look for fast capacity on any response
                headers.update(self.limiter.snapshot_headers((org.id, "fast"), self.lane_limits(org, "fast")))
        return Ticket(self, org, api_key_id, entry, request_id, speed, service_tier, inference_geo, admission, headers)

    def snapshot_headers(self, org: Organization, lane: str) -> dict[str, str]:
        return self.limiter.snapshot_headers((org.id, lane), self.lane_limits(org, lane))
