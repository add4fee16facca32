"""The Admin API reports over the usage ledger, shaped like Anthropic's: the usage report
(token counts per time bucket) and the cost report (USD cents per day).

Both take the raw query string as (key, value) pairs, validate every parameter into a
ReportQueryError naming it (the HTTP edge answers it as a 400), and aggregate in SQL over one
page of buckets at a time."""
from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal, localcontext
from typing import Any, Iterable, Mapping

from fastmode.platform.catalog import FAST_BETA
from fastmode.platform.db import Database


class ReportQueryError(ValueError):
    """A query parameter a report cannot take, named in the message."""


# bucket_width: (seconds, default limit, max limit)
USAGE_WIDTHS: dict[str, tuple[int, int, int]] = {"1m": (60, 60, 1440), "1h": (3600, 24, 168),
                                                 "1d": (86400, 7, 31)}
COST_WIDTHS: dict[str, tuple[int, int, int]] = {"1d": (86400, 7, 31)}
# Every dimension a usage result carries; the stored ones map to their column, the rest are always null.
USAGE_DIMENSIONS = ("api_key_id", "workspace_id", "model", "service_tier", "context_window", "inference_geo",
                    "account_id", "service_account_id", "speed")
_STORED = {"api_key_id", "model", "service_tier", "context_window", "inference_geo", "speed"}
SERVICE_TIERS = ("standard", "priority", "batch")
CONTEXT_WINDOWS = ("0-200k", "200k-1M")
SPEEDS = ("standard", "fast")
# filter parameter: (dimension it filters, allowed values or None for any string)
_USAGE_FILTERS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "models": ("model", None), "api_key_ids": ("api_key_id", None), "workspace_ids": ("workspace_id", None),
    "account_ids": ("account_id", None), "service_account_ids": ("service_account_id", None),
    "service_tiers": ("service_tier", SERVICE_TIERS), "context_window": ("context_window", CONTEXT_WINDOWS),
    "inference_geos": ("inference_geo", None), "speeds": ("speed", SPEEDS),
}
COST_GROUP_BY = ("workspace_id", "description")
# token type: (usage column, which rate applies, cache multiplier, description label)
TOKEN_TYPES: dict[str, tuple[str, str, Decimal, str]] = {
    "uncached_input_tokens": ("uncached_input_tokens", "input_price", Decimal(1), "input tokens"),
    "output_tokens": ("output_tokens", "output_price", Decimal(1), "output tokens"),
    "cache_read_input_tokens": ("cache_read_input_tokens", "input_price", Decimal("0.1"), "cache read input tokens"),
    "cache_creation.ephemeral_5m_input_tokens": ("cache_creation_5m_input_tokens", "input_price", Decimal("1.25"),
                                                 "5m cache write input tokens"),
    "cache_creation.ephemeral_1h_input_tokens": ("cache_creation_1h_input_tokens", "input_price", Decimal(2),
                                                 "1h cache write input tokens"),
}
MAX_FILTER_VALUES = 100
_EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                      r"(?:([Zz])|([+-])(\d{2}):(\d{2}))")
_KEY = re.compile(r"([A-Za-z_]+)(?:\[\d*\])?")
_PAGE_PREFIX = "page_"


class _Params:
    """The query string by parameter name; `name[]`, `name[0]` and `name` are one parameter."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.values: dict[str, list[str]] = {}
        for key, value in pairs:
            m = _KEY.fullmatch(key)
            if m:
                self.values.setdefault(m.group(1), []).append(value)

    def one(self, name: str) -> str | None:
        values = self.values.get(name)
        if values and len(values) > 1:
            raise ReportQueryError(f"{name}: given {len(values)} times; give it at most once")
        return values[0] if values else None

    def many(self, name: str, allowed: Iterable[str] | None = None) -> list[str]:
        values = list(dict.fromkeys(self.values.get(name, ())))
        if len(values) > MAX_FILTER_VALUES:
            raise ReportQueryError(f"{name}[]: at most {MAX_FILTER_VALUES} values; got {len(values)}")
        if allowed is not None:
            allowed = tuple(allowed)
            for v in values:
                if v not in allowed:
                    raise ReportQueryError(f"{name}[]: {v!r} is not one of {', '.join(allowed)}")
        return values


def _parse_time(name: str, value: str) -> datetime:
    """An RFC 3339 timestamp with an offset (`Z` or `+HH:MM`), as aware UTC."""
    m = _RFC3339.fullmatch(value.strip())
    if not m:
        raise ReportQueryError(f"{name}: {value!r} is not an RFC 3339 timestamp such as 2026-11-22T00:00:00Z")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    try:
        offset = timedelta(0) if z else (1 if sign == "+" else -1) * timedelta(hours=int(oh), minutes=int(om))
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), int((frac or "0").ljust(6, "0")[:6]),
                      tzinfo=timezone(offset)).astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise ReportQueryError(f"{name}: {value!r} is not a valid date and time") from None
    if not _EARLIEST <= dt < _LATEST:
        raise ReportQueryError(f"{name}: must be between {_fmt(_EARLIEST.timestamp())} and {_fmt(_LATEST.timestamp())}")
    return dt


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _encode_page(ts: int) -> str:
    return _PAGE_PREFIX + base64.urlsafe_b64encode(_fmt(ts).encode()).decode()


def _decode_page(value: str) -> datetime:
    try:
        if not value.startswith(_PAGE_PREFIX):
            raise ValueError
        text = base64.urlsafe_b64decode(value[len(_PAGE_PREFIX):].encode("ascii")).decode("ascii")
        return _parse_time("page", text)
    except (ValueError, binascii.Error, UnicodeError, ReportQueryError):
        raise ReportQueryError(f"page: {value!r} is not a cursor this report returned as next_page") from None


@dataclass(frozen=True)
class _Window:
    """One page of buckets: `count` buckets of `width` seconds from `start`."""

    start: int
    width: int
    count: int
    next_page: str | None

    def bucket(self, i: int) -> tuple[str, str]:
        lo = self.start + i * self.width
        return _fmt(lo), _fmt(lo + self.width)

    @property
    def end(self) -> int:
        return self.start + self.count * self.width


def _window(p: _Params, now: float, widths: Mapping[str, tuple[int, int, int]]) -> _Window:
    """Validate starting_at, ending_at, bucket_width, limit and page into the page to report."""
    raw_start = p.one("starting_at")
    if raw_start is None:
        raise ReportQueryError("starting_at: required (an RFC 3339 timestamp such as 2026-11-22T00:00:00Z)")
    start_at = _parse_time("starting_at", raw_start)
    raw_end = p.one("ending_at")
    end_ts = _parse_time("ending_at", raw_end).timestamp() if raw_end is not None else now
    if end_ts <= start_at.timestamp():
        raise ReportQueryError(f"ending_at: must be after starting_at ({_fmt(start_at.timestamp())}); got "
                               f"{_fmt(end_ts) if raw_end is not None else 'now, ' + _fmt(now)}")
    name = p.one("bucket_width")
    name = "1d" if name is None else name
    if name not in widths:
        raise ReportQueryError(f"bucket_width: must be one of {', '.join(widths)}; got {name!r}")
    width, default_limit, max_limit = widths[name]
    raw_limit = p.one("limit")
    limit = default_limit
    if raw_limit is not None:
        limit = int(raw_limit) if re.fullmatch(r"[0-9]{1,9}", raw_limit) else 0
        if not 1 <= limit <= max_limit:
            raise ReportQueryError(f"limit: must be an integer from 1 to {max_limit} for bucket_width {name}; "
                                   f"got {raw_limit!r}")
    first = math.floor(start_at.timestamp() / width) * width
    total = math.ceil((end_ts - first) / width)
    offset = 0
    raw_page = p.one("page")
    if raw_page is not None:
        cursor = _decode_page(raw_page).timestamp()
        offset = int((cursor - first) // width)
        if cursor != first + offset * width or not 0 <= offset < total:
            raise ReportQueryError(f"page: {raw_page!r} does not belong to this starting_at, ending_at and "
                                   f"bucket_width")
    stop = min(offset + limit, total)
    return _Window(first + offset * width, width, stop - offset,
                   _encode_page(first + stop * width) if stop < total else None)


def _aggregate(db: Database, org_id: str, w: _Window, columns: list[str], sums: list[str],
               where: list[str], args: list[Any]) -> list[dict[str, Any]]:
    """One row per (bucket index, columns) in the page, with SUM of each of `sums`; columns are trusted names."""
    cols = "".join(f", {c}" for c in columns)
    sql = (f"SELECT CAST((created_at - ?) / ? AS INTEGER) AS bucket{cols}, "
           + ", ".join(f"SUM({s}) AS {s}" for s in sums)
           + " FROM usage WHERE org_id = ? AND created_at >= ? AND created_at < ?"
           + "".join(f" AND {c}" for c in where) + f" GROUP BY bucket{cols} ORDER BY bucket{cols}")
    rows = db.query(sql, (w.start, w.width, org_id, w.start, w.end, *args))
    return [dict(r) for r in rows if 0 <= r["bucket"] < w.count]


def _page(w: _Window, rows_by_bucket: Mapping[int, list[dict[str, Any]]]) -> dict[str, Any]:
    data = []
    for i in range(w.count):
        lo, hi = w.bucket(i)
        data.append({"starting_at": lo, "ending_at": hi, "results": rows_by_bucket.get(i, [])})
    return {"data": data, "has_more": w.next_page is not None, "next_page": w.next_page}


def usage_report(db: Database, org_id: str, params: list[tuple[str, str]], betas: set[str],
                 now: float) -> dict[str, Any]:
    """GET /v1/organizations/usage_report/messages: token counts per bucket, optionally grouped."""
    p = _Params(params)
    w = _window(p, now, USAGE_WIDTHS)
    group_by = p.many("group_by", USAGE_DIMENSIONS)
    where: list[str] = []
    args: list[Any] = []
    for param, (dim, allowed) in _USAGE_FILTERS.items():
        values = p.many(param, allowed)
        if not values:
            continue
        if dim == "speed" and FAST_BETA not in betas:
            raise ReportQueryError(f"speeds[]: requires the anthropic-beta header {FAST_BETA}")
        if dim in _STORED:
            where.append(f"{dim} IN ({', '.join('?' * len(values))})")
            args.extend(values)
        else:
            where.append("0")  # we have no such dimension: every row is null there, matching no value
    if "speed" in group_by and FAST_BETA not in betas:
        raise ReportQueryError(f"group_by[]: speed requires the anthropic-beta header {FAST_BETA}")
    columns = [d for d in group_by if d in _STORED]
    sums = ["uncached_input_tokens", "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens",
            "cache_read_input_tokens", "output_tokens"]
    by_bucket: dict[int, list[dict[str, Any]]] = {}
    for r in _aggregate(db, org_id, w, columns, sums, where, args):
        result: dict[str, Any] = {
            "uncached_input_tokens": r["uncached_input_tokens"],
            "cache_creation": {"ephemeral_5m_input_tokens": r["cache_creation_5m_input_tokens"],
                               "ephemeral_1h_input_tokens": r["cache_creation_1h_input_tokens"]},
            "cache_read_input_tokens": r["cache_read_input_tokens"],
            "output_tokens": r["output_tokens"],
            "server_tool_use": {"web_search_requests": 0},
        }
        result.update({d: r.get(d) for d in USAGE_DIMENSIONS})
        by_bucket.setdefault(r["bucket"], []).append(result)
    return _page(w, by_bucket)


def _dec(x: float) -> Decimal:
    """A stored float rate or multiplier as the decimal it was meant to be (float noise rounded off)."""
    return Decimal(repr(round(x, 9)))


def format_cents(amount: Decimal) -> str:
    """Fixed-point, at most 6 decimal places, no trailing zeros: Decimal('12.345600') -> '12.3456'."""
    text = format(amount.quantize(Decimal("0.000001")), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def cost_report(db: Database, org_id: str, params: list[tuple[str, str]], now: float) -> dict[str, Any]:
    """GET /v1/organizations/cost_report: USD cents per day, optionally one row per token-type description.
    Priority Tier usage is not in it (as on the API: it is billed under its commitment)."""
    p = _Params(params)
    w = _window(p, now, COST_WIDTHS)
    by_description = "description" in p.many("group_by", COST_GROUP_BY)
    columns = ["model", "speed", "service_tier", "context_window", "inference_geo",
               "input_price", "output_price", "multiplier"]
    sums = [col for col, _, _, _ in TOKEN_TYPES.values()]
    # bucket -> key -> [tokens, cents]; the key is () when not grouped by description
    totals: dict[int, dict[tuple[str, ...], list[Any]]] = {}
    with localcontext(Context(prec=60)):
        for r in _aggregate(db, org_id, w, columns, sums, ["service_tier != 'priority'"], []):
            tier = r["service_tier"]  # standard or batch
            for token_type, (col, rate, cache, _) in TOKEN_TYPES.items():
                tokens = r[col] or 0
                if not tokens:
                    continue
                key = ((r["model"], r["speed"], tier, r["context_window"], r["inference_geo"], token_type)
                       if by_description else ())
                acc = totals.setdefault(r["bucket"], {}).setdefault(key, [0, Decimal(0)])
                acc[0] += tokens
                acc[1] += Decimal(tokens) * _dec(r[rate]) * cache * _dec(r["multiplier"]) / 10_000
    order = list(TOKEN_TYPES)
    by_bucket: dict[int, list[dict[str, Any]]] = {}
    for bucket, groups in totals.items():
        rows = by_bucket[bucket] = []
        for key in sorted(groups, key=lambda k: (*k[:-1], order.index(k[-1])) if k else ()):
            row: dict[str, Any] = {"amount": format_cents(groups[key][1]), "currency": "USD", "cost_type": None,
                                   "description": None, "model": None, "token_type": None, "service_tier": None,
                                   "context_window": None, "inference_geo": None, "workspace_id": None}
            if key:
                model, speed, tier, window, geo, token_type = key
                row.update(cost_type="tokens", description=f"{model} usage - {TOKEN_TYPES[token_type][3]} ({speed})",
                           model=model, token_type=token_type, service_tier=tier, context_window=window,
                           inference_geo=geo)
            rows.append(row)
    return _page(w, by_bucket)
