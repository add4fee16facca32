"""The Admin API usage and cost reports over rows written straight into an in-memory ledger."""
from __future__ import annotations

import itertools
import random
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from fastmode.platform.db import Database
from fastmode.platform.reports import ReportQueryError, cost_report, format_cents, usage_report

ORG = "org_a"
BETA = {"fast-mode-2026-02-01"}
T0 = datetime(2026, 11, 22, tzinfo=timezone.utc).timestamp()
H, D = 3600, 86400
NOW = T0 + 30 * D
TOKENS = ("uncached_input_tokens", "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens",
          "cache_read_input_tokens", "output_tokens")
_ids = itertools.count()


def add(db: Database, created_at: float, **overrides) -> dict:
    """Insert one usage row with sensible defaults; returns the row as inserted."""
    row = dict(request_id=f"req_{next(_ids)}", org_id=ORG, api_key_id="apikey_1", model="claude-opus-4-8",
               speed="standard", service_tier="standard", inference_geo="global", context_window="0-200k",
               uncached_input_tokens=0, cache_creation_5m_input_tokens=0, cache_creation_1h_input_tokens=0,
               cache_read_input_tokens=0, output_tokens=0, input_price=5.0, output_price=25.0, multiplier=1.0,
               cost_usd=0.0, outcome="end_turn", created_at=created_at)
    row.update(overrides)
    db.execute(f"INSERT INTO usage ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    return row


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def q(**kw) -> list[tuple[str, str]]:
    """Query pairs; list values become repeated `name[]` keys."""
    out = []
    for k, v in kw.items():
        out += [(f"{k}[]", x) for x in v] if isinstance(v, list) else [(k, str(v))]
    return out


def usage(db, betas=frozenset(BETA), org=ORG, **kw) -> dict:
    return usage_report(db, org, q(**kw), set(betas), NOW)


def cost(db, **kw) -> dict:
    return cost_report(db, ORG, q(**kw), NOW)


def flat(row: dict) -> tuple[int, ...]:
    c = row["cache_creation"]
    return (row["uncached_input_tokens"], c["ephemeral_5m_input_tokens"], c["ephemeral_1h_input_tokens"],
            row["cache_read_input_tokens"], row["output_tokens"])


@pytest.fixture
def db():
    d = Database()
    yield d
    d.close()


@pytest.mark.parametrize("width,seconds", [("1m", 60), ("1h", H), ("1d", D)])
def test_buckets_align_to_utc_boundaries(db, width, seconds):
    start = T0 + 5 * H + 17 * 60 + 33.25  # 05:17:33.25Z
    out = usage(db, starting_at=iso(start).replace("Z", "+00:00"), ending_at=iso(start + 3 * seconds),
                bucket_width=width)
    first = start // seconds * seconds
    assert out["data"][0]["starting_at"] == iso(first)
    for i, b in enumerate(out["data"]):
        assert (b["starting_at"], b["ending_at"]) == (iso(first + i * seconds), iso(first + (i + 1) * seconds))
    assert out["data"][-1]["ending_at"] >= iso(start + 3 * seconds) and not out["has_more"]


def test_offset_timestamps_convert_to_utc(db):
    out = usage(db, starting_at="2026-11-22T02:00:00+02:00", ending_at="2026-11-22T03:00:00+02:00",
                bucket_width="1h")
    assert [b["starting_at"] for b in out["data"]] == ["2026-11-22T00:00:00Z"]


def test_empty_buckets_present_and_rows_land_in_their_bucket(db):
    add(db, T0 + D, output_tokens=7)
    add(db, T0 + 2 * D - 0.001, output_tokens=3)  # last instant of day 2
    add(db, T0 + 3 * D, output_tokens=100)  # after ending_at's bucket
    out = usage(db, starting_at=iso(T0), ending_at=iso(T0 + 3 * D))
    assert [len(b["results"]) for b in out["data"]] == [0, 1, 0]
    assert out["data"][1]["results"][0]["output_tokens"] == 10
    assert out["has_more"] is False and out["next_page"] is None


def test_ending_at_defaults_to_now(db):
    out = usage_report(db, ORG, q(starting_at=iso(T0), bucket_width="1h"), set(), T0 + 2 * H + 1)
    assert len(out["data"]) == 3 and not out["has_more"]


@pytest.mark.parametrize("width,seconds,default,maximum", [("1m", 60, 60, 1440), ("1h", H, 24, 168),
                                                            ("1d", D, 7, 31)])
def test_limit_defaults_and_maxima(db, width, seconds, default, maximum):
    span = dict(starting_at=iso(T0), ending_at=iso(T0 + 2000 * seconds), bucket_width=width)
    out = usage(db, **span)
    assert len(out["data"]) == default and out["has_more"]
    assert len(usage(db, limit=maximum, **span)["data"]) == maximum
    with pytest.raises(ReportQueryError, match=f"limit: .*1 to {maximum}"):
        usage(db, limit=maximum + 1, **span)


def test_pagination_covers_every_bucket_once(db):
    rng = random.Random(1)
    rows = [add(db, T0 + rng.uniform(0, 50 * H), output_tokens=rng.randint(1, 1000)) for _ in range(200)]
    span = dict(starting_at=iso(T0 + 1), ending_at=iso(T0 + 50 * H - 1), bucket_width="1h", limit=7)
    starts, total, page = [], 0, None
    while True:
        out = usage(db, **span, **({"page": page} if page else {}))
        starts += [b["starting_at"] for b in out["data"]]
        total += sum(r["output_tokens"] for b in out["data"] for r in b["results"])
        page = out["next_page"]
        assert out["has_more"] == (page is not None)
        if not page:
            break
    assert starts == [iso(T0 + i * H) for i in range(50)]
    assert total == sum(r["output_tokens"] for r in rows)


def test_group_by_model_and_speed_sums_exactly(db):
    rng = random.Random(7)
    expected: dict[tuple, Counter] = {}
    for _ in range(300):
        r = add(db, T0 + rng.uniform(0, 3 * D), model=rng.choice(["claude-opus-4-8", "claude-haiku-5"]),
                speed=rng.choice(["fast", "standard"]), **{t: rng.randint(0, 10_000) for t in TOKENS})
        key = (int((r["created_at"] - T0) // D), r["model"], r["speed"])
        expected.setdefault(key, Counter()).update({t: r[t] for t in TOKENS})
    out = usage(db, starting_at=iso(T0), ending_at=iso(T0 + 3 * D), group_by=["model", "speed"])
    got = {}
    for i, b in enumerate(out["data"]):
        for r in b["results"]:
            assert r["api_key_id"] is r["workspace_id"] is r["service_tier"] is r["inference_geo"] is None
            assert r["server_tool_use"] == {"web_search_requests": 0}
            got[(i, r["model"], r["speed"])] = flat(r)
    assert got == {k: tuple(c[t] for t in TOKENS) for k, c in expected.items()}


def test_ungrouped_and_null_dimension_grouping(db):
    add(db, T0, output_tokens=5, uncached_input_tokens=2)
    add(db, T0 + 1, output_tokens=6, model="claude-haiku-5", speed="fast")
    out = usage(db, starting_at=iso(T0), ending_at=iso(T0 + D))
    [row] = out["data"][0]["results"]
    assert flat(row) == (2, 0, 0, 0, 11) and row["model"] is None and row["speed"] is None
    grouped = usage(db, starting_at=iso(T0), ending_at=iso(T0 + D), group_by=["workspace_id", "account_id"])
    [row] = grouped["data"][0]["results"]
    assert row["workspace_id"] is None and row["account_id"] is None and row["output_tokens"] == 11


def test_group_by_without_brackets_and_unknown_params_ignored(db):
    add(db, T0, model="m1", output_tokens=1)
    add(db, T0, model="m2", output_tokens=2)
    out = usage_report(db, ORG, [("starting_at", iso(T0)), ("ending_at", iso(T0 + D)), ("group_by", "model"),
                                 ("beta", "true")], set(), NOW)
    assert {(r["model"], r["output_tokens"]) for r in out["data"][0]["results"]} == {("m1", 1), ("m2", 2)}


def test_filters(db):
    add(db, T0, speed="fast", model="m1", service_tier="batch", output_tokens=1)
    add(db, T0, speed="standard", model="m1", service_tier="priority", output_tokens=10)
    add(db, T0, speed="standard", model="m2", service_tier="standard", output_tokens=100)
    span = dict(starting_at=iso(T0), ending_at=iso(T0 + D))

    def total(**kw):
        return sum(r["output_tokens"] for b in usage(db, **span, **kw)["data"] for r in b["results"])

    assert total() == 111
    assert total(speeds=["fast"]) == 1 and total(speeds=["standard"]) == 110
    assert total(models=["m1"]) == 11 and total(models=["m1", "m2"]) == 111 and total(models=["nope"]) == 0
    assert total(service_tiers=["batch", "priority"]) == 11
    assert total(models=["m1"], speeds=["standard"]) == 10
    assert total(workspace_ids=["wrkspc_x"]) == 0  # we have no workspaces
    assert total(context_window=["200k-1M"]) == 0 and total(inference_geos=["us"]) == 0


def test_speed_requires_the_fast_mode_beta(db):
    span = dict(starting_at=iso(T0), ending_at=iso(T0 + D))
    with pytest.raises(ReportQueryError, match="group_by.*fast-mode-2026-02-01"):
        usage(db, betas=set(), group_by=["speed"], **span)
    with pytest.raises(ReportQueryError, match="speeds.*fast-mode-2026-02-01"):
        usage(db, betas={"other"}, speeds=["fast"], **span)
    assert usage(db, betas=set(), group_by=["model"], **span)["data"]


def test_other_orgs_rows_excluded(db):
    add(db, T0, output_tokens=1)
    add(db, T0, org_id="org_b", output_tokens=1000, input_price=1.0)
    span = dict(starting_at=iso(T0), ending_at=iso(T0 + D))
    assert usage(db, **span)["data"][0]["results"][0]["output_tokens"] == 1
    assert usage(db, org="org_c", **span)["data"][0]["results"] == []
    assert cost(db, **span)["data"][0]["results"][0]["amount"] == "0.0025"  # 1 x $25/MTok in cents


def test_cost_amounts_in_cents(db):
    # fast output at $150/MTok; standard input at $5/MTok; cache writes/read on $5 input.
    add(db, T0, speed="fast", input_price=30.0, output_price=150.0, output_tokens=1000)
    add(db, T0, uncached_input_tokens=2000, cache_creation_5m_input_tokens=4000,
        cache_creation_1h_input_tokens=3000, cache_read_input_tokens=10_000)
    add(db, T0, service_tier="batch", inference_geo="us", multiplier=0.5 * 1.1, output_tokens=1_000_000)
    add(db, T0, service_tier="priority", output_tokens=400)  # billed under its commitment: not in the report
    add(db, T0, outcome="error")  # no tokens: no rows
    out = cost(db, starting_at=iso(T0), ending_at=iso(T0 + D), group_by=["description"])
    got = {(r["description"], r["service_tier"], r["inference_geo"]): r for r in out["data"][0]["results"]}
    c = Decimal(100) / Decimal(1_000_000)  # cents per USD / tokens per MTok
    want = {
        ("claude-opus-4-8 usage - output tokens (fast)", "standard", "global"): 1000 * Decimal(150) * c,
        ("claude-opus-4-8 usage - input tokens (standard)", "standard", "global"): 2000 * Decimal(5) * c,
        ("claude-opus-4-8 usage - 5m cache write input tokens (standard)", "standard", "global"):
            4000 * Decimal(5) * Decimal("1.25") * c,
        ("claude-opus-4-8 usage - 1h cache write input tokens (standard)", "standard", "global"):
            3000 * Decimal(5) * 2 * c,
        ("claude-opus-4-8 usage - cache read input tokens (standard)", "standard", "global"):
            10_000 * Decimal(5) * Decimal("0.1") * c,
        ("claude-opus-4-8 usage - output tokens (standard)", "batch", "us"):
            1_000_000 * Decimal(25) * Decimal("0.5") * Decimal("1.1") * c,
    }
    assert {k: Decimal(r["amount"]) for k, r in got.items()} == want
    assert got[next(iter(want))]["amount"] == "15"
    assert {r["token_type"] for r in got.values()} == {
        "output_tokens", "uncached_input_tokens", "cache_creation.ephemeral_5m_input_tokens",
        "cache_creation.ephemeral_1h_input_tokens", "cache_read_input_tokens"}
    for r in got.values():
        assert r["cost_type"] == "tokens" and r["currency"] == "USD" and r["model"] == "claude-opus-4-8"
        assert r["context_window"] == "0-200k" and r["workspace_id"] is None
    [total] = cost(db, starting_at=iso(T0), ending_at=iso(T0 + D))["data"][0]["results"]
    assert Decimal(total["amount"]) == sum(want.values())
    assert total["description"] is total["model"] is total["cost_type"] is total["token_type"] is None


def test_cost_buckets_and_pagination(db):
    add(db, T0 + 2 * D + 5, output_tokens=1)
    first = cost(db, starting_at=iso(T0 + H), ending_at=iso(T0 + 10 * D), limit=3)
    assert [b["starting_at"] for b in first["data"]] == [iso(T0 + i * D) for i in range(3)]
    assert [len(b["results"]) for b in first["data"]] == [0, 0, 1] and first["has_more"]
    rest = cost(db, starting_at=iso(T0 + H), ending_at=iso(T0 + 10 * D), page=first["next_page"])
    assert [b["starting_at"] for b in rest["data"]] == [iso(T0 + i * D) for i in range(3, 10)]
    assert not rest["has_more"] and rest["next_page"] is None


def test_format_cents():
    assert format_cents(Decimal("12.345600")) == "12.3456"
    assert format_cents(Decimal("1500")) == "1500" and format_cents(Decimal(0)) == "0"
    assert format_cents(Decimal("0.0000001")) == "0" and format_cents(Decimal("1E+3")) == "1000"


SPAN = [("starting_at", "2026-11-22T00:00:00Z"), ("ending_at", "2026-11-25T00:00:00Z")]


@pytest.mark.parametrize("pairs,message", [
    ([("ending_at", "2026-11-25T00:00:00Z")], "starting_at: required"),
    ([("starting_at", "yesterday")], "starting_at: 'yesterday' is not an RFC 3339"),
    ([("starting_at", "2026-11-22")], "starting_at: .* not an RFC 3339"),
    ([("starting_at", "2026-11-22T00:00:00")], "starting_at: .* not an RFC 3339"),  # no offset
    ([("starting_at", "2026-02-30T00:00:00Z")], "starting_at: .* not a valid date"),
    ([("starting_at", "2026-11-22T00:00:00+24:00")], "starting_at: .* not a valid date"),
    ([("starting_at", "1969-12-31T00:00:00Z")], "starting_at: must be between"),
    ([("starting_at", "2026-11-22T00:00:00Z"), ("ending_at", "soon")], "ending_at: 'soon'"),
    ([("starting_at", "2026-11-22T00:00:00Z"), ("ending_at", "2026-11-21T00:00:00Z")], "ending_at: must be after"),
    ([("starting_at", "2026-11-22T00:00:00Z"), ("ending_at", "2026-11-22T00:00:00Z")], "ending_at: must be after"),
    ([("starting_at", "2027-11-22T00:00:00Z")], r"ending_at: must be after .*now"),
    ([("starting_at", "2026-11-22T00:00:00Z"), ("starting_at", "2026-11-23T00:00:00Z")], "starting_at: given 2"),
    (SPAN + [("bucket_width", "1w")], "bucket_width: must be one of 1m, 1h, 1d; got '1w'"),
    (SPAN + [("bucket_width", "")], "bucket_width: must be one of"),
    (SPAN + [("limit", "0")], "limit: must be an integer from 1 to 31"),
    (SPAN + [("limit", "-1")], "limit: .*'-1'"),
    (SPAN + [("limit", "abc")], "limit: .*'abc'"),
    (SPAN + [("limit", "1.5")], "limit: .*'1.5'"),
    (SPAN + [("limit", "99999999999999999999")], "limit: "),
    (SPAN + [("group_by[]", "region")], "group_by\\[\\]: 'region' is not one of api_key_id"),
    (SPAN + [("speeds[]", "ludicrous")], "speeds\\[\\]: 'ludicrous' is not one of standard, fast"),
    (SPAN + [("service_tiers[]", "gold")], "service_tiers\\[\\]: 'gold'"),
    (SPAN + [("context_window[]", "1M+")], "context_window\\[\\]: '1M\\+'"),
    (SPAN + [("models[]", f"m{i}") for i in range(101)], "models\\[\\]: at most 100"),
    (SPAN + [("page", "garbage")], "page: 'garbage' is not a cursor"),
    (SPAN + [("page", "page_!!!")], "page: .* not a cursor"),
    (SPAN + [("page", "page_eWVzdGVyZGF5")], "page: .* not a cursor"),  # base64 of 'yesterday'
    (SPAN + [("page", "page_MjAyNi0xMS0yMlQwMDowMDowMVo=")], "page: .* does not belong"),  # misaligned
    (SPAN + [("page", "page_MjAyNi0xMi0yMlQwMDowMDowMFo=")], "page: .* does not belong"),  # past ending_at
    (SPAN + [("page", "page_MjAyNi0xMS0wMVQwMDowMDowMFo=")], "page: .* does not belong"),  # before starting_at
])
def test_usage_report_rejects_bad_input(db, pairs, message):
    with pytest.raises(ReportQueryError, match=message):
        usage_report(db, ORG, pairs, BETA, NOW)


@pytest.mark.parametrize("pairs,message", [
    ([], "starting_at: required"),
    (SPAN + [("bucket_width", "1h")], "bucket_width: must be one of 1d; got '1h'"),
    (SPAN + [("limit", "32")], "limit: must be an integer from 1 to 31"),
    (SPAN + [("group_by[]", "model")], "group_by\\[\\]: 'model' is not one of workspace_id, description"),
    (SPAN + [("page", "nope")], "page: "),
])
def test_cost_report_rejects_bad_input(db, pairs, message):
    with pytest.raises(ReportQueryError, match=message):
        cost_report(db, ORG, pairs, NOW)
