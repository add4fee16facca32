"""The fast-mode platform through the official SDK, against the example catalog
(examples/anthropic-catalog.toml) with its weights swapped for tiny-random."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

import anthropic
import httpx
import pytest

from conftest import running_server, small_engine_config
from fastmode.client import create_message_with_fast_fallback
from fastmode.platform.catalog import Catalog, FastMode
from fastmode.platform.db import Database
from fastmode.platform.ledger import price, Usage
from fastmode.platform.service import Platform
from fastmode.server.app import build_state
from fastmode.settings import load_settings

CATALOG = "examples/anthropic-catalog.toml"
BETA = "fast-mode-2026-02-01"
HI = [{"role": "user", "content": "hi"}]
H = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


def example_catalog(**changes: dict) -> Catalog:
    """The example catalog on tiny-random weights; `changes` maps a model id to replaced fields."""
    entries = [dataclasses.replace(e, **{"weights": "tiny-random", "context_window": None, **changes.get(e.id, {})})
               for e in load_settings(CATALOG).models]
    return Catalog(entries)


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@contextmanager
def catalog_server(tiny, *, limits=None, clock=time.time, open_mode=True, db=None, changes=None,
                   **engine) -> Iterator[tuple[str, Platform]]:
    platform = Platform(db or Database(), open_mode=open_mode, limits=limits or {}, clock=clock)
    state = build_state({"tiny-random": tiny}, small_engine_config(**engine), catalog=example_catalog(**(changes or {})),
                        platform=platform)
    with running_server(state) as url:
        yield url, platform


@pytest.fixture(scope="module")
def server(tiny):
    with catalog_server(tiny, limits=load_settings(CATALOG).limits) as s:
        yield s


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key="local", max_retries=0)


def raw(url: str, body: dict, key: str = "local", version: str = "2023-06-01", **headers) -> httpx.Response:
    return httpx.post(f"{url}/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": key, "anthropic-version": version, **headers})


def ledger(platform: Platform, request_id: str) -> dict:
    rows = platform.db.query("SELECT * FROM usage WHERE request_id = ?", (request_id,))
    assert len(rows) == 1, f"expected one usage row for {request_id}, got {len(rows)}"
    return dict(rows[0])


# ---- catalog and fast-mode lifecycle ----------------------------------------------------------

def test_ga_model_runs_fast_without_a_beta_header_and_sends_fast_headers(client, server):
    r = client.messages.with_raw_response.create(model="claude-opus-5-5", max_tokens=5, speed="fast", messages=HI)
    msg = r.parse()
    assert msg.usage.speed == "fast" and msg.model == "claude-opus-5-5"
    fast = {k for k in r.headers if k.startswith("anthropic-fast-")}
    assert fast == {f"anthropic-fast-{d}-tokens-{f}" for d in ("input", "output") for f in ("limit", "remaining", "reset")}
    assert r.headers["anthropic-fast-output-tokens-limit"] == "40000"
    row = ledger(server[1], r.headers["request-id"])
    assert (row["speed"], row["input_price"], row["output_price"]) == ("fast", 8.0, 40.0)


def test_a_model_entrys_context_window_ends_generation_at_both_speeds(tiny):
    """An entry's context window smaller than the weights' stops prompt + output there, as the
    weights' own window does: stop reason model_context_window_exceeded."""
    with catalog_server(tiny, changes={"claude-opus-5-5": {"context_window": 40}}) as (url, _):
        c = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)
        for speed in ("standard", "fast"):
            msg = c.messages.create(model="claude-opus-5-5", max_tokens=40, speed=speed, messages=HI)
            assert msg.stop_reason == "model_context_window_exceeded", speed
            assert msg.usage.input_tokens + msg.usage.output_tokens == 40 and msg.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["claude-fable-5-2", "claude-mythos-5-2"])
def test_other_ga_models_run_fast_at_their_own_prices(client, server, model):
    r = client.messages.with_raw_response.create(model=model, max_tokens=3, speed="fast", messages=HI)
    assert r.parse().usage.speed == "fast"
    row = ledger(server[1], r.headers["request-id"])
    assert (row["speed"], row["input_price"], row["output_price"]) == ("fast", 16.0, 80.0)


def test_preview_model_needs_the_beta_header(client):
    with pytest.raises(anthropic.BadRequestError, match=BETA) as e:
        client.messages.create(model="claude-opus-5", max_tokens=5, speed="fast", messages=HI)
    assert "claude-opus-5" in e.value.message and "research preview" in e.value.message
    msg = client.beta.messages.create(model="claude-opus-5", max_tokens=5, speed="fast", betas=[BETA], messages=HI)
    assert msg.usage.speed == "fast"
    assert client.messages.create(model="claude-opus-5", max_tokens=5, messages=HI).usage.speed == "standard"


def test_deprecated_fast_mode_needs_the_beta_header_until_its_removal_date(tiny):
    """claude-opus-4-8: fast behind the beta header before 2026-11-30, a 400 from then on; the
    model itself keeps serving standard speed."""
    clock = Clock()
    with catalog_server(tiny, clock=clock) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        clock.t = datetime(2026, 11, 29, 23, 59, tzinfo=timezone.utc).timestamp()
        with pytest.raises(anthropic.BadRequestError, match="deprecated.*2026-11-30.*" + BETA):
            c.messages.create(model="claude-opus-4-8", max_tokens=3, speed="fast", messages=HI)
        r = c.beta.messages.with_raw_response.create(model="claude-opus-4-8", max_tokens=3, speed="fast",
                                                     betas=[BETA], messages=HI)
        assert r.parse().usage.speed == "fast"
        row = ledger(platform, r.headers["request-id"])
        assert (row["speed"], row["input_price"], row["output_price"]) == ("fast", 10.0, 50.0)
        clock.t = datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp()
        for betas in ([], [BETA]):
            with pytest.raises(anthropic.BadRequestError, match="removed for claude-opus-4-8 on 2026-11-30") as e:
                c.beta.messages.create(model="claude-opus-4-8", max_tokens=3, speed="fast", betas=betas, messages=HI)
            assert "speed" in e.value.message
        assert c.messages.create(model="claude-opus-4-8", max_tokens=3, messages=HI).usage.speed == "standard"


def test_deprecated_fast_mode_falls_back_silently_at_standard_price(client, server):
    r = client.messages.with_raw_response.create(model="claude-opus-4-6", max_tokens=5, speed="fast", messages=HI)
    msg = r.parse()
    assert msg.usage.speed == "standard"
    assert "anthropic-ratelimit-requests-remaining" in r.headers  # the standard pool was charged
    row = ledger(server[1], r.headers["request-id"])
    assert (row["speed"], row["input_price"], row["output_price"]) == ("standard", 5.0, 25.0)


@pytest.mark.parametrize("model,changes", [("claude-sonnet-4-6", {}), ("claude-opus-4-7", {}),
                                           ("claude-opus-5-5", {"claude-opus-5-5": {"fast_mode": FastMode.REMOVED}})])
def test_unsupported_and_removed_fast_mode_are_400s_naming_model_and_parameter(tiny, model, changes):
    with catalog_server(tiny, changes=changes) as (url, _):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as e:
            c.messages.create(model=model, max_tokens=5, speed="fast", messages=HI)
        assert model in e.value.message and "speed" in e.value.message
        assert c.messages.create(model=model, max_tokens=3, messages=HI).usage.speed == "standard"


def test_aliases_and_the_wildcard(client):
    assert client.messages.create(model="claude-opus-4-8-latest", max_tokens=2, messages=HI).model == "claude-opus-4-8"
    assert client.messages.create(model="gpt-4o", max_tokens=2, messages=HI).model == "claude-sonnet-4-6"
    assert client.models.retrieve("claude-opus-4-8-latest").id == "claude-opus-4-8"
    with pytest.raises(anthropic.NotFoundError):  # the catch-all serves requests; it names no model
        client.models.retrieve("gpt-4o")
    with pytest.raises(anthropic.BadRequestError) as e:  # an error names the model as the request did
        client.messages.create(model="gpt-4o", max_tokens=2, speed="fast", messages=HI)
    assert "gpt-4o does not support" in e.value.message and "claude-sonnet-4-6" not in e.value.message
    with pytest.raises(anthropic.BadRequestError, match="output tokens for gpt-4o"):
        client.messages.create(model="gpt-4o", max_tokens=5000, messages=HI)
    for length in (18_000, 400_000):  # refused once tokenized, and by its length alone (not tokenized)
        with pytest.raises(anthropic.BadRequestError, match="the context window of gpt-4o"):
            client.messages.create(model="gpt-4o", max_tokens=5,
                                   messages=[{"role": "user", "content": "x " * (length // 2)}])
    ids = [m.id for m in client.models.list()]
    assert ids == ["claude-opus-5-5", "claude-fable-5-2", "claude-mythos-5-2", "claude-opus-5", "claude-opus-4-8",
                   "claude-opus-4-7", "claude-sonnet-4-6", "claude-opus-4-6"]  # newest first
    assert [m.id for m in client.models.list(extra_query={"lifecycle[]": "retired"})] == []
    assert len(client.models.list(extra_query={"lifecycle[]": ["active", "deprecated"]}).data) == len(ids)
    with pytest.raises(anthropic.BadRequestError, match="lifecycle"):
        client.models.list(extra_query={"lifecycle[]": "gone"})
    info = client.models.retrieve("claude-opus-4-8")
    assert info.capabilities.thinking.types.adaptive.supported and not info.capabilities.thinking.types.enabled.supported
    assert info.capabilities.effort.low.supported and not info.capabilities.effort.medium.supported
    assert info.max_tokens == 4096 and info.max_input_tokens == 2048  # tiny-random's context length


@pytest.mark.filterwarnings("ignore:Using Claude with claude-opus-4-6")
def test_thinking_effort_sampling_geo_and_max_tokens_per_model(server, client):
    url = server[0]
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        client.messages.create(model="claude-opus-4-8", max_tokens=2000, messages=HI,
                               thinking={"type": "enabled", "budget_tokens": 1024})
    client.messages.create(model="claude-opus-4-8", max_tokens=3, messages=HI, thinking={"type": "adaptive"})
    client.messages.create(model="claude-opus-4-6", max_tokens=2000, messages=HI,
                           thinking={"type": "enabled", "budget_tokens": 1024})
    with pytest.raises(anthropic.BadRequestError, match="effort"):
        client.messages.create(model="claude-opus-4-8", max_tokens=3, messages=HI, output_config={"effort": "medium"})
    # effort is applied: low adds a brevity instruction to the prompt, high (the default) adds nothing
    n = {e: client.messages.count_tokens(model="claude-opus-4-8", messages=HI, output_config={"effort": e}).input_tokens
         for e in ("low", "high")}
    assert n["low"] > n["high"] == client.messages.count_tokens(model="claude-opus-4-8", messages=HI).input_tokens
    # sampling parameters: a 400 on models that take none (under 2023-06-01, where the API allows them)
    body = {"model": "claude-opus-5-5", "max_tokens": 2, "messages": HI, "temperature": 0.5}
    r = raw(url, body)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    assert raw(url, {**body, "model": "claude-opus-4-6"}).status_code == 200
    r = raw(url, {"model": "claude-opus-5-5", "max_tokens": 2, "messages": HI, "inference_geo": "eu"})
    assert r.status_code == 400 and "inference_geo" in r.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="4096"):
        client.messages.create(model="claude-opus-5-5", max_tokens=5000, messages=HI)


def test_priority_tier_with_fast_mode_is_a_400(server):
    r = raw(server[0], {"model": "claude-opus-5-5", "max_tokens": 2, "messages": HI, "speed": "fast",
                        "service_tier": "priority"})
    assert r.status_code == 400 and "Priority Tier" in r.json()["error"]["message"]


# ---- accounts ---------------------------------------------------------------------------------

def test_keys_enrollment_and_admin_rights(tiny):
    with catalog_server(tiny, open_mode=False) as (url, platform):
        acc = platform.accounts
        acc.create_org("plain")
        acc.create_org("speedy", fast_mode=True)
        _, plain = acc.create_key("plain")
        _, speedy = acc.create_key("speedy")
        revoked_key, revoked = acc.create_key("speedy")
        acc.revoke_key(revoked_key.id)
        _, admin = acc.create_key("speedy", admin=True)
        for key in ("sk-unknown", revoked):
            with pytest.raises(anthropic.AuthenticationError):
                anthropic.Anthropic(base_url=url, api_key=key, max_retries=0).messages.create(
                    model="claude-opus-5-5", max_tokens=2, messages=HI)
        c = anthropic.Anthropic(base_url=url, api_key=plain, max_retries=0)
        with pytest.raises(anthropic.PermissionDeniedError, match="not enabled for your organization"):
            c.messages.create(model="claude-opus-5-5", max_tokens=2, speed="fast", messages=HI)
        assert c.messages.create(model="claude-opus-5-5", max_tokens=2, messages=HI).usage.speed == "standard"
        # the deprecated model falls back before enrollment matters
        assert c.messages.create(model="claude-opus-4-6", max_tokens=2, speed="fast", messages=HI).usage.speed == "standard"
        r = anthropic.Anthropic(base_url=url, api_key=speedy, max_retries=0).messages.with_raw_response.create(
            model="claude-opus-5-5", max_tokens=2, speed="fast", messages=HI)
        assert r.parse().usage.speed == "fast"
        assert r.headers["anthropic-organization-id"] == acc.org("speedy").id
        report = "/v1/organizations/usage_report/messages?starting_at=2020-01-01T00:00:00Z"
        h = {"anthropic-version": "2023-06-01"}
        assert httpx.get(url + report, headers={**h, "x-api-key": speedy}).status_code == 403
        assert httpx.get(url + report, headers={**h, "x-api-key": admin}).status_code == 200
        with pytest.raises(anthropic.PermissionDeniedError, match="admin API keys"):  # admin keys: admin APIs only
            anthropic.Anthropic(base_url=url, api_key=admin, max_retries=0).messages.create(
                model="claude-opus-5-5", max_tokens=2, messages=HI)
        # only hashes are stored
        stored = {r["key_hash"] for r in platform.db.query("SELECT key_hash FROM api_keys")}
        assert speedy not in stored and len(stored) == 4


def test_zero_data_retention_writes_no_content(tiny, tmp_path, caplog):
    """A ZDR organization's prompts and outputs never reach the database files or the logs; the
    same scan finds another organization's batch content, so it would catch a leak."""
    caplog.set_level(logging.DEBUG)
    db_path = tmp_path / "fastmode.db"
    with catalog_server(tiny, open_mode=False, db=Database(db_path)) as (url, platform):
        platform.accounts.create_org("secret", fast_mode=True, zero_data_retention=True)
        platform.accounts.create_org("normal")
        _, zkey = platform.accounts.create_key("secret")
        _, nkey = platform.accounts.create_key("normal")
        z = anthropic.Anthropic(base_url=url, api_key=zkey, max_retries=0)
        marker = "ZDR-MARKER-7f3a9c"
        outputs = []
        for speed in ("fast", "standard"):
            outputs.append(z.messages.create(model="claude-opus-5-5", max_tokens=20, speed=speed,
                                             system=f"system {marker}", messages=[{"role": "user", "content": marker}]))
        with z.messages.stream(model="claude-opus-5-5", max_tokens=20, messages=[{"role": "user", "content": marker}]) as s:
            outputs.append(s.get_final_message())
        z.messages.count_tokens(model="claude-opus-5-5", messages=[{"role": "user", "content": marker}])
        with pytest.raises(anthropic.PermissionDeniedError, match="zero data retention"):
            z.messages.batches.create(requests=[{"custom_id": "a", "params": {
                "model": "claude-opus-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": marker}]}}])
        texts = [m.content[0].text for m in outputs if m.content and len(m.content[0].text) >= 8]
        assert len(platform.db.query("SELECT * FROM usage WHERE org_id = ?", (platform.accounts.org("secret").id,))) == 3

        def leaked(needles: list[str]) -> list[str]:
            blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
            logs = "\n".join(r.getMessage() for r in caplog.records  # the server's loggers, not the client's
                             if r.name.startswith(("fastmode", "uvicorn", "starlette")))
            return [n for n in needles if n.encode() in blobs or n in logs]

        assert leaked([marker, *texts]) == []
        control = "CONTROL-MARKER-51d2e8"
        n = anthropic.Anthropic(base_url=url, api_key=nkey, max_retries=0)
        n.messages.batches.create(requests=[{"custom_id": "a", "params": {
            "model": "claude-opus-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": control}]}}])
        assert leaked([control]) == [control]


# ---- rate limits ------------------------------------------------------------------------------

def test_fast_pool_is_separate_and_429s_carry_retry_after(tiny):
    clock = Clock()
    limits = {"fast": {"output_tokens_per_minute": 100}, "standard": {"output_tokens_per_minute": 1000}}
    with catalog_server(tiny, limits=limits, clock=clock) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        std_before = c.messages.with_raw_response.create(model="claude-opus-5-5", max_tokens=1, messages=HI).headers
        r = c.messages.with_raw_response.create(model="claude-opus-5-5", max_tokens=90, speed="fast", messages=HI)
        used = r.parse().usage.output_tokens
        assert int(r.headers["anthropic-fast-output-tokens-remaining"]) == 10  # the whole reservation is held
        with pytest.raises(anthropic.RateLimitError) as e:
            c.messages.create(model="claude-opus-5-5", max_tokens=90, speed="fast", messages=HI)
        h = e.value.response.headers
        # the unused part of the first reservation came back when it finished
        expected_ms = (90 - (10 + 90 - used)) * 600
        assert abs(int(h["retry-after-ms"]) - expected_ms) <= 1
        assert int(h["retry-after"]) == -(-expected_ms // 1000)
        assert h["anthropic-fast-output-tokens-remaining"] == str(100 - used)
        assert "fast" in e.value.message
        # the standard pool is untouched by the fast one
        std = c.messages.with_raw_response.create(model="claude-opus-5-5", max_tokens=1, messages=HI).headers
        assert int(std["anthropic-ratelimit-output-tokens-remaining"]) >= int(std_before["anthropic-ratelimit-output-tokens-remaining"]) - 1
        assert std["anthropic-fast-output-tokens-remaining"] == str(100 - used)  # fast capacity shown on standard responses
        clock.t += expected_ms / 1000
        assert c.messages.create(model="claude-opus-5-5", max_tokens=90, speed="fast", messages=HI).usage.speed == "fast"
        with pytest.raises(anthropic.RateLimitError) as e:  # can never fit: no retry-after, x-should-retry false
            c.messages.create(model="claude-opus-5-5", max_tokens=101, speed="fast", messages=HI)
        assert e.value.response.headers["x-should-retry"] == "false" and "retry-after" not in e.value.response.headers


def test_a_limit_of_zero_says_so_instead_of_asking_for_a_smaller_request(tiny):
    with catalog_server(tiny, limits={"standard": {"requests_per_minute": 0}, "fast": {"output_tokens_per_minute": 0}}) as (url, _):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        for speed, what in (("standard", "allows no requests per minute"),
                            ("fast", "allows no output tokens per minute; send the request without speed")):
            with pytest.raises(anthropic.RateLimitError) as e:
                c.messages.create(model="claude-opus-5-5", max_tokens=5, speed=speed, messages=HI)
            assert what in e.value.message and "max_tokens" not in e.value.message
            assert e.value.response.headers["x-should-retry"] == "false"


def test_sdk_default_retries_succeed_once_retry_after_has_passed(tiny):
    limits = {"fast": {"input_tokens_per_minute": 1200}}  # 20 tokens a second, real clock
    with catalog_server(tiny, limits=limits) as (url, platform):
        quick = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        retrying = anthropic.Anthropic(base_url=url, api_key="k")  # the SDK default: 2 retries
        n = quick.messages.count_tokens(model="claude-opus-5-5", messages=[{"role": "user", "content": "x" * 1000}])
        quick.messages.create(model="claude-opus-5-5", max_tokens=1, speed="fast",
                              messages=[{"role": "user", "content": "x" * (1000 + 1160 - n.input_tokens)}])
        r = retrying.messages.with_raw_response.create(model="claude-opus-5-5", max_tokens=1, speed="fast",
                                                       messages=[{"role": "user", "content": "y" * 30}])
        assert r.parse().usage.speed == "fast"
        assert r.retries_taken >= 1  # refused first (429 + retry-after), then admitted


def test_client_kit_falls_back_to_standard_on_a_fast_429(tiny):
    limits = {"fast": {"output_tokens_per_minute": 10}}
    with catalog_server(tiny, limits=limits, clock=Clock()) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k")
        result = create_message_with_fast_fallback(c, model="claude-opus-5-5", max_tokens=50, speed="fast", messages=HI)
        assert result.fell_back and result.speed == "standard" and result.message.usage.speed == "standard"
        ok = create_message_with_fast_fallback(c, model="claude-opus-5-5", max_tokens=5, speed="fast", messages=HI)
        assert not ok.fell_back and ok.speed == "fast"


def test_concurrent_clients_never_pass_the_limit_by_more_than_one_reservation(tiny):
    limit, clients, max_tok = 400, 12, 40
    with catalog_server(tiny, limits={"fast": {"output_tokens_per_minute": limit}}, clock=Clock()) as (url, platform):
        admitted, refused, lock = [], [], threading.Lock()
        barrier = threading.Barrier(clients)

        def worker(i: int) -> None:
            c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
            barrier.wait()
            for j in range(4):
                try:
                    m = c.messages.create(model="claude-opus-5-5", max_tokens=10 + (i * 7 + j * 3) % (max_tok - 9),
                                          speed="fast", messages=[{"role": "user", "content": f"go {i} {j}"}])
                    with lock:
                        admitted.append(m.usage.output_tokens)
                except anthropic.RateLimitError:
                    with lock:
                        refused.append(1)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert refused, "the limit was never reached: the test proves nothing"
        fast_rows = platform.db.query("SELECT SUM(output_tokens) AS n, COUNT(*) AS c FROM usage WHERE speed = 'fast'")
        assert fast_rows[0]["c"] == len(admitted) and fast_rows[0]["n"] == sum(admitted)
        assert sum(admitted) <= limit + max_tok  # the clock is frozen: no replenishment at all


# ---- pricing, ledger and reports --------------------------------------------------------------

def test_every_request_writes_one_priced_row_cancelled_streams_included(tiny):
    with catalog_server(tiny) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        b = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        cases = [dict(model="claude-opus-5", extra={}), dict(model="claude-opus-5", extra={"speed": "fast"}),
                 dict(model="claude-opus-5-5", extra={"speed": "fast", "inference_geo": "us"})]
        for case in cases:
            r = b.beta.messages.with_raw_response.create(model=case["model"], max_tokens=8, messages=HI, betas=[BETA],
                                                         **case["extra"])
            m = r.parse()
            row = ledger(platform, r.headers["request-id"])
            prices = example_catalog().get(case["model"]).prices
            expect = price(prices, Usage(uncached_input_tokens=m.usage.input_tokens, output_tokens=m.usage.output_tokens),
                           speed=m.usage.speed, service_tier="standard", inference_geo=m.usage.inference_geo)
            assert row["cost_usd"] == pytest.approx(expect.cost_usd)
            assert (row["uncached_input_tokens"], row["output_tokens"]) == (m.usage.input_tokens, m.usage.output_tokens)
        assert platform.db.query("SELECT multiplier FROM usage WHERE inference_geo = 'us'")[0]["multiplier"] == pytest.approx(1.1)
        # a stream the client leaves early still writes its row, marked canceled
        with c.messages.with_streaming_response.create(model="claude-opus-5-5", max_tokens=300, stream=True,
                                                       messages=HI) as resp:
            rid = resp.headers["request-id"]
            next(resp.iter_lines())
        deadline = time.monotonic() + 10
        while not platform.db.query("SELECT 1 FROM usage WHERE request_id = ?", (rid,)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger(platform, rid)["outcome"] == "canceled"


def test_usage_report_by_speed_matches_the_requests_token_for_token(tiny):
    with catalog_server(tiny) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        sent: dict[tuple[str, str], list[int]] = {}
        for i, (model, speed) in enumerate([("claude-opus-5-5", "fast"), ("claude-opus-5-5", "standard"),
                                            ("claude-opus-4-6", "fast"), ("claude-opus-5-5", "fast"),
                                            ("claude-sonnet-4-6", "standard")]):
            m = c.messages.create(model=model, max_tokens=5 + i, speed=speed,
                                  messages=[{"role": "user", "content": "hello " * (i + 1)}])
            tot = sent.setdefault((m.model, m.usage.speed), [0, 0])
            tot[0] += m.usage.input_tokens
            tot[1] += m.usage.output_tokens
        h = H
        day = time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime())
        q = f"starting_at={day}&bucket_width=1d&group_by[]=model&group_by[]=speed"
        r = httpx.get(f"{url}/v1/organizations/usage_report/messages?{q}", headers=h)
        assert r.status_code == 400 and BETA in r.json()["error"]["message"]
        r = httpx.get(f"{url}/v1/organizations/usage_report/messages?{q}", headers={**h, "anthropic-beta": BETA})
        assert r.status_code == 200, r.text
        got = {(row["model"], row["speed"]): [row["uncached_input_tokens"], row["output_tokens"]]
               for bucket in r.json()["data"] for row in bucket["results"]}
        assert got == sent
        assert ("claude-opus-4-6", "standard") in got  # the deprecated fallback is reported as standard
        r = httpx.get(f"{url}/v1/organizations/cost_report?starting_at={day}&group_by[]=description", headers=h)
        assert r.status_code == 200
        rows = [row for bucket in r.json()["data"] for row in bucket["results"]]
        total_cents = sum(float(row["amount"]) for row in rows)
        ledger_cents = platform.db.query("SELECT SUM(cost_usd) AS c FROM usage")[0]["c"] * 100
        assert total_cents == pytest.approx(ledger_cents, rel=1e-6)
        assert any("(fast)" in row["description"] for row in rows)
        for bad in ("starting_at=yesterday", "", f"starting_at={day}&bucket_width=2d", f"starting_at={day}&limit=0",
                    f"starting_at={day}&group_by[]=color"):
            r = httpx.get(f"{url}/v1/organizations/usage_report/messages?{bad}", headers={**h, "anthropic-beta": BETA})
            assert r.status_code == 400 and r.json()["error"]["message"], bad
        r = httpx.get(f"{url}/v1/organizations/cost_report?starting_at={day}&bucket_width=1h", headers=h)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert "bucket_width" in r.json()["error"]["message"]


# ---- message batches --------------------------------------------------------------------------

def wait_ended(c: anthropic.Anthropic, batch_id: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = c.messages.batches.retrieve(batch_id)
        if b.processing_status == "ended":
            return b
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not end")


def test_batches_through_the_sdk(tiny):
    with catalog_server(tiny) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        batch = c.messages.batches.create(requests=[
            {"custom_id": "std", "params": {"model": "claude-opus-4-8", "max_tokens": 8, "messages": HI,
                                            "betas": ["token-counting-2024-11-01"]}},  # a header parameter the SDK's type has
            {"custom_id": "fast", "params": {"model": "claude-opus-5-5", "max_tokens": 8, "speed": "fast", "messages": HI}},
            {"custom_id": "nomodel", "params": {"model": "", "max_tokens": 8, "messages": HI}},
        ])
        assert batch.id.startswith("msgbatch_") and batch.request_counts.processing == 3
        ended = wait_ended(c, batch.id)
        assert (ended.request_counts.succeeded, ended.request_counts.errored) == (1, 2)
        results = {r.custom_id: r.result for r in c.messages.batches.results(batch.id)}
        ok = results["std"].message
        assert results["std"].type == "succeeded" and ok.usage.service_tier == "batch" and ok.usage.speed == "standard"
        assert results["fast"].type == "errored" and "not available for the Message Batches API" in results["fast"].error.error.message
        assert results["nomodel"].type == "errored"
        row = platform.db.query("SELECT * FROM usage WHERE service_tier = 'batch'")[0]
        assert row["multiplier"] == 0.5 and row["cost_usd"] == pytest.approx(
            (ok.usage.input_tokens * 5 + ok.usage.output_tokens * 25) * 0.5 / 1e6)
        assert [b.id for b in c.messages.batches.list()] == [batch.id]
        assert c.messages.batches.delete(batch.id).type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            c.messages.batches.retrieve(batch.id)


def long_batch(n: int) -> list[dict]:
    """n batch items long enough (400 tokens each) that most are still pending a moment later."""
    return [{"custom_id": f"r{i}", "params": {"model": "claude-opus-5-5", "max_tokens": 400,
                                             "messages": [{"role": "user", "content": f"story {i}"}]}}
            for i in range(n)]


def test_turning_on_zero_data_retention_stops_a_pending_batch(tiny):
    """Items not done when the organization turned ZDR on end errored at once, with their
    prompts dropped and no output stored (one running then stores nothing)."""
    with catalog_server(tiny) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        batch = c.messages.batches.create(requests=long_batch(40))
        platform.accounts.update_org("default", zero_data_retention=True)
        pending = "SELECT COUNT(*) AS n FROM batch_items WHERE batch_id = ? AND state = 'processing'"
        assert platform.db.query(pending, (batch.id,))[0]["n"] == 0  # at once, not as the runner reaches them
        ended = wait_ended(c, batch.id)
        assert ended.request_counts.errored > 0 and ended.request_counts.errored + ended.request_counts.succeeded == 40
        rows = platform.db.query("SELECT state, params, result FROM batch_items WHERE batch_id = ?", (batch.id,))
        stopped = [r for r in rows if r["state"] == "errored"]
        assert all("zero data retention" in r["result"] and "story" not in r["result"] + r["params"] for r in stopped)


def test_batch_cancel_and_bad_input(tiny):
    with catalog_server(tiny) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        batch = c.messages.batches.create(requests=long_batch(40))
        r = httpx.get(f"{url}/v1/messages/batches/{batch.id}/results", headers=H)
        assert r.status_code == 400 and "has not ended" in r.json()["error"]["message"]
        with pytest.raises(anthropic.BadRequestError, match="still processing"):
            c.messages.batches.delete(batch.id)
        assert c.messages.batches.cancel(batch.id).processing_status in ("canceling", "ended")
        ended = wait_ended(c, batch.id)
        assert ended.request_counts.canceled > 0 and ended.cancel_initiated_at is not None
        assert sum(dict(ended.request_counts).values()) == 40
        kinds = {r.result.type for r in c.messages.batches.results(batch.id)}
        assert "canceled" in kinds and kinds <= {"succeeded", "canceled"}
        bad = [
            ({"requests": []}, "non-empty"),
            ({"requests": [{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}]}, "unique"),
            ({"requests": [{"custom_id": "a b", "params": {}}]}, "custom_id"),
            ({"requests": [{"custom_id": "a", "params": {"stream": True}}]}, "stream"),
            ({"requests": [{"custom_id": "a"}]}, "params"),
            ({}, "requests"),
        ]
        for body, needle in bad:
            r = httpx.post(f"{url}/v1/messages/batches", json=body, headers=H)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
        for method, path in [("GET", "/v1/messages/batches/msgbatch_nope"), ("POST", "/v1/messages/batches/msgbatch_nope/cancel"),
                             ("GET", "/v1/messages/batches/msgbatch_nope/results"), ("DELETE", "/v1/messages/batches/msgbatch_nope")]:
            r = httpx.request(method, url + path, headers=H)
            assert r.status_code == 404, (method, path, r.text)
        for limit in ("0", "abc", "%C2%B2", "1001"):
            r = httpx.get(f"{url}/v1/messages/batches?limit={limit}", headers=H)
            assert r.status_code == 400 and "limit" in r.json()["error"]["message"], limit
        # an item whose text cannot be encoded ends errored, and its batch ends
        body = json.dumps({"requests": [{"custom_id": "odd", "params": {  # \ud800 escaped: the SDK cannot send it
            "model": "claude-opus-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": "x\ud800"}]}}]})
        r = httpx.post(f"{url}/v1/messages/batches", content=body, headers={**H, "content-type": "application/json"})
        assert wait_ended(c, r.json()["id"]).request_counts.errored == 1


def test_batch_items_wait_behind_interactive_requests(make_engine):
    from fastmode.engine.request import Lane, Request, SamplingParams
    from fastmode.engine.scheduler import Scheduler
    from fastmode.engine.block_manager import BlockManager

    sched = Scheduler(small_engine_config(), BlockManager(64, 16))
    p = SamplingParams(max_tokens=4)
    order = [("b1", 1), ("i1", 0), ("b2", 1), ("p1", -1), ("i2", 0)]
    for rid, prio in order:
        sched.add(Request(rid, [1, 2], p, Lane.STANDARD, lambda d: None, 64, priority=prio))
    assert [r.request_id for r in sched.waiting[Lane.STANDARD]] == ["p1", "i1", "i2", "b1", "b2"]


def test_org_limit_overrides_set_and_remove(tiny):
    platform = Platform(limits={"fast": {"requests_per_minute": 5}})
    acc = platform.accounts
    acc.create_org("acme")
    org = acc.update_org("acme", limits={"fast": {"requests_per_minute": 50}})
    assert platform.lane_limits(org, "fast").requests_per_minute == 50
    org = acc.update_org("acme", limits={"fast": {"requests_per_minute": None}})  # back to the server's limit
    assert platform.lane_limits(org, "fast").requests_per_minute == 5
    with pytest.raises(ValueError, match="lane"):
        acc.update_org("acme", fast_mode=True, limits={"slow": {"requests_per_minute": 1}})
    assert not acc.org("acme").fast_mode  # nothing was applied


def test_a_request_refused_after_admission_gives_everything_back(tiny):
    limits = {"standard": {"requests_per_minute": 2, "input_tokens_per_minute": 10_000}}
    with catalog_server(tiny, limits=limits, clock=Clock(), max_waiting=0) as (url, platform):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        for _ in range(4):  # the engine queue is full: 529s, and none of them uses up the pool
            with pytest.raises(anthropic.InternalServerError) as e:
                c.messages.create(model="claude-opus-5-5", max_tokens=2, messages=HI)
            assert e.value.status_code == 529
        assert platform.db.query("SELECT COUNT(*) AS n FROM usage")[0]["n"] == 0
        org = platform.accounts.org("default")
        h = platform.snapshot_headers(org, "standard")
        assert h["anthropic-ratelimit-requests-remaining"] == "2"
        assert h["anthropic-ratelimit-input-tokens-remaining"] == "10000"


def test_models_list_filters_by_lifecycle(tiny):
    with catalog_server(tiny, changes={"claude-opus-4-6": {"lifecycle": "deprecated"}}) as (url, _):
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        assert [m.id for m in c.models.list(extra_query={"lifecycle[]": "deprecated"})] == ["claude-opus-4-6"]
        first = c.models.list(extra_query={"lifecycle[]": "active"}, limit=3)
        active = [m.id for m in first.data]
        assert active == ["claude-opus-5-5", "claude-fable-5-2", "claude-mythos-5-2"] and first.has_more  # paged
        every = [m.id for m in first]  # the SDK follows the pages (after_id), the filter kept
        assert every[-1] == "claude-sonnet-4-6" and len(every) == 7 and "claude-opus-4-6" not in every
        assert "claude-opus-4-6" in [m.id for m in c.models.list()]  # deprecated ones are listed by default
