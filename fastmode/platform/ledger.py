"""Pricing and the usage ledger: one durable row per finished request, with its cost."""
from __future__ import annotations

import time
from dataclasses import dataclass

from fastmode.platform.catalog import Prices
from fastmode.platform.db import Database

CACHE_WRITE_5M = 1.25
CACHE_WRITE_1H = 2.0
CACHE_READ = 0.1
BATCH = 0.5
GEO = {"global": 1.0, "us": 1.1}
LONG_CONTEXT = 200_000


@dataclass(frozen=True)
class Usage:
    uncached_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        """Every input token, cached or not."""
        return (self.uncached_input_tokens + self.cache_creation_5m_input_tokens
                + self.cache_creation_1h_input_tokens + self.cache_read_input_tokens)


@dataclass(frozen=True)
class Charge:
    input_price: float  # USD per million base input tokens at the speed that ran
    output_price: float
    multiplier: float  # batch and data residency, stacked
    cost_usd: float


def price(prices: Prices, usage: Usage, *, speed: str, service_tier: str, inference_geo: str) -> Charge:
    """Fast rates (when fast ran) x cache multipliers x batch x data residency, all stacking."""
    inp, out = prices.rates(speed)
    mult = (BATCH if service_tier == "batch" else 1.0) * GEO.get(inference_geo, 1.0)
    weighted_input = (usage.uncached_input_tokens + CACHE_WRITE_5M * usage.cache_creation_5m_input_tokens
                      + CACHE_WRITE_1H * usage.cache_creation_1h_input_tokens
                      + CACHE_READ * usage.cache_read_input_tokens)
    cost = (weighted_input * inp + usage.output_tokens * out) * mult / 1e6
    return Charge(inp, out, mult, cost)


@dataclass(frozen=True)
class LedgerRow:
    request_id: str
    org_id: str
    api_key_id: str | None
    model: str
    speed: str
    service_tier: str
    inference_geo: str
    usage: Usage
    outcome: str


class Ledger:
    def __init__(self, db: Database, clock=time.time) -> None:
        self.db = db
        self.clock = clock

    def record(self, row: LedgerRow, prices: Prices) -> Charge:
        charge = price(prices, row.usage, speed=row.speed, service_tier=row.service_tier,
                       inference_geo=row.inference_geo)
        u = row.usage
        window = "200k-1M" if u.input_tokens > LONG_CONTEXT else "0-200k"
        self.db.execute(
            "INSERT INTO usage (request_id, org_id, api_key_id, model, speed, service_tier, inference_geo, "
            "context_window, uncached_input_tokens, cache_creation_5m_input_tokens, cache_creation_1h_input_tokens, "
            "cache_read_input_tokens, output_tokens, input_price, output_price, multiplier, cost_usd, outcome, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.request_id, row.org_id, row.api_key_id, row.model, row.speed, row.service_tier, row.inference_geo,
             window, u.uncached_input_tokens, u.cache_creation_5m_input_tokens, u.cache_creation_1h_input_tokens,
             u.cache_read_input_tokens, u.output_tokens, charge.input_price, charge.output_price, charge.multiplier,
             charge.cost_usd, row.outcome, self.clock()))
        return charge
