"""Prompt caching through the official SDK: breakpoint rules, usage fields, speeds, pre-warm,
look-back, the ledger. The example catalog on tiny-random (one token per byte)."""
from __future__ import annotations

import json
import random
import time

import anthropic
import pytest

from conftest import running_server, small_engine_config
from fastmode.platform.db import Database
from fastmode.platform.service import Platform
from fastmode.server.app import build_state
from test_platform import catalog_server, example_catalog, ledger

GA = "claude-opus-5-5"  # fast mode GA; its minimum lowered to 256 tokens below
PREVIEW = "claude-opus-5"  # fast mode in preview; minimum 1024 tokens
CHANGES = {GA: {"min_cacheable_tokens": 256}}


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kappa", "omega"]) for _ in range(n))


def cached(text: str, ttl: str | None = None) -> dict:
    cc = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {"type": "text", "text": text, "cache_control": cc}


@pytest.fixture(scope="module")
def server(tiny):
    with catalog_server(tiny, changes=CHANGES, db=Database()) as s:
        yield s


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key="local", max_retries=0)


def ask(client, system=None, messages=None, **kw):
    kw.setdefault("model", GA)
    kw.setdefault("max_tokens", 8)
    if system is not None:
        kw["system"] = system
    return client.messages.with_raw_response.create(messages=messages or [{"role": "user", "content": "Go on."}], **kw)


def total_input(u) -> int:
    return u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens


def test_a_system_breakpoint_is_written_then_read(client, server):
    system = [cached(words(120, 1))]
    first = ask(client, system)
    second = ask(client, system, messages=[{"role": "user", "content": "Something else entirely."}])
    third = ask(client, system)
    u1, u2, u3 = first.parse().usage, second.parse().usage, third.parse().usage
    count = client.messages.count_tokens(model=GA, system=system, messages=[{"role": "user", "content": "Go on."}])
    assert total_input(u1) == total_input(u3) == count.input_tokens
    p = u1.cache_creation_input_tokens
    assert p > 256 and u1.cache_read_input_tokens == 0
    assert u1.cache_creation.ephemeral_5m_input_tokens == p and u1.cache_creation.ephemeral_1h_input_tokens == 0
    assert u1.input_tokens == count.input_tokens - p > 0  # the uncached rest after the breakpoint
    assert (u2.cache_read_input_tokens, u2.cache_creation_input_tokens) == (p, 0)
    assert (u3.cache_read_input_tokens, u3.cache_creation_input_tokens, u3.input_tokens) == (p, 0, u1.input_tokens)
    assert first.parse().content == third.parse().content  # a hit gives the same tokens
    for r, u in ((first, u1), (third, u3)):  # the ledger holds what the response said, priced with multipliers
        row = ledger(server[1], r.headers["request-id"])
        assert (row["uncached_input_tokens"], row["cache_creation_5m_input_tokens"], row["cache_read_input_tokens"],
                row["cache_creation_1h_input_tokens"]) == (u.input_tokens, u.cache_creation_input_tokens,
                                                           u.cache_read_input_tokens, 0)
        weighted = u.input_tokens + 1.25 * u.cache_creation_input_tokens + 0.1 * u.cache_read_input_tokens
        assert row["cost_usd"] == pytest.approx((weighted * 4 + u.output_tokens * 20) / 1e6)  # $4/$20 per MTok


def test_speeds_never_share_a_cache(client):
    system = [cached(words(110, 2))]
    std = ask(client, system).parse().usage
    fast = ask(client, system, speed="fast").parse().usage
    fast_again = ask(client, system, speed="fast").parse().usage
    std_again = ask(client, system).parse().usage
    assert std.cache_creation_input_tokens > 0 and std.speed == "standard"
    assert fast.speed == "fast" and fast.cache_read_input_tokens == 0
    assert fast.cache_creation_input_tokens == std.cache_creation_input_tokens
    assert fast_again.cache_read_input_tokens == std_again.cache_read_input_tokens == std.cache_creation_input_tokens


def test_organizations_never_share_a_cache(tiny):
    db = Database()
    with catalog_server(tiny, changes=CHANGES, db=db, open_mode=False) as (url, platform):
        keys = []
        for name in ("org-one", "org-two"):
            platform.accounts.create_org(name)
            keys.append(platform.accounts.create_key(name)[1])
        system = [cached(words(100, 3))]
        one, two = (anthropic.Anthropic(base_url=url, api_key=k, max_retries=0) for k in keys)
        assert ask(one, system).parse().usage.cache_creation_input_tokens > 0
        assert ask(two, system).parse().usage.cache_read_input_tokens == 0
        assert ask(one, system).parse().usage.cache_read_input_tokens > 0


def test_streaming_reports_cache_usage_in_message_start(client):
    system = [cached(words(100, 4))]
    ask(client, system)
    with client.messages.stream(model=GA, max_tokens=6, system=system,
                                messages=[{"role": "user", "content": "Go on."}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start = next(e for e in events if e.type == "message_start")
    assert start.message.usage.cache_read_input_tokens > 256
    assert final.usage.cache_read_input_tokens == start.message.usage.cache_read_input_tokens
    assert final.usage.output_tokens > 0


def test_1h_breakpoints_before_5m_split_the_creation(client):
    tools = [{"name": "lookup", "description": words(80, 5), "input_schema": {"type": "object", "properties": {}},
              "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    system = [cached(words(60, 6), ttl="1h"), cached(words(40, 7))]
    u = ask(client, system, tools=tools).parse().usage
    c = u.cache_creation
    assert c.ephemeral_1h_input_tokens > 256 and c.ephemeral_5m_input_tokens > 0
    assert u.cache_creation_input_tokens == c.ephemeral_1h_input_tokens + c.ephemeral_5m_input_tokens
    # only the last 5m block changed: the 1h prefix (tools + first system block) is read
    changed = [system[0], cached(words(40, 8))]
    u2 = ask(client, changed, tools=tools).parse().usage
    assert u2.cache_read_input_tokens == c.ephemeral_1h_input_tokens
    assert u2.cache_creation.ephemeral_1h_input_tokens == 0 and u2.cache_creation.ephemeral_5m_input_tokens > 0


def test_a_tools_breakpoint_caches_the_tools_alone(client):
    tools = [{"name": f"tool_{i}", "description": words(30, 10 + i), "input_schema": {"type": "object"}}
             for i in range(4)]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    a = ask(client, "Answer briefly.", tools=tools).parse().usage
    b = ask(client, "A completely different system prompt.", tools=tools).parse().usage
    assert a.cache_creation_input_tokens > 256
    assert b.cache_read_input_tokens == a.cache_creation_input_tokens  # tools come first in the prefix


def test_automatic_caching_moves_forward_and_looks_back(client):
    turns = [{"role": "user", "content": words(90, 20)}]
    u1 = ask(client, cache_control={"type": "ephemeral"}, messages=turns).parse().usage
    assert u1.cache_creation_input_tokens > 256 and u1.cache_read_input_tokens == 0
    turns += [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": words(20, 21)}]
    u2 = ask(client, cache_control={"type": "ephemeral"}, messages=turns).parse().usage
    assert u2.cache_read_input_tokens == u1.cache_creation_input_tokens  # the previous turn's entry
    assert u2.cache_creation_input_tokens > 0
    assert total_input(u2) == u2.cache_read_input_tokens + u2.cache_creation_input_tokens + u2.input_tokens


def test_pre_warm_with_max_tokens_0(client):
    system = [cached(words(100, 30))]
    warm = ask(client, system, max_tokens=0).parse()
    assert warm.content == [] and warm.stop_reason == "max_tokens" and warm.usage.output_tokens == 0
    assert warm.usage.cache_creation_input_tokens > 256
    hot = ask(client, system).parse().usage
    assert hot.cache_read_input_tokens == warm.usage.cache_creation_input_tokens
    with client.messages.stream(model=GA, max_tokens=0, system=[cached(words(100, 31))],
                                messages=[{"role": "user", "content": "Go on."}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content == [] and streamed.usage.cache_creation_input_tokens > 256


def test_below_the_model_minimum_nothing_is_cached_and_nothing_fails(client):
    system = [cached(words(100, 40))]  # about 600 tokens: below claude-opus-5's 1024
    for _ in range(2):
        u = ask(client, system, model=PREVIEW).parse().usage
        assert (u.cache_creation_input_tokens, u.cache_read_input_tokens) == (0, 0)
        assert u.cache_creation.ephemeral_5m_input_tokens == u.cache_creation.ephemeral_1h_input_tokens == 0
        assert u.input_tokens > 500


@pytest.mark.parametrize("body, message", [
    ({"system": [cached(f"s{i}") for i in range(5)]}, "A maximum of 4 blocks with cache_control"),
    ({"system": [cached(f"s{i}") for i in range(4)], "cache_control": {"type": "ephemeral"}},
     "A maximum of 4 blocks with cache_control"),
    ({"system": [cached("a"), cached("b", "1h")]}, "must not come after a ttl='5m'"),
    ({"system": [cached("a")], "messages": [{"role": "user", "content": [cached("b", "1h")]}]},
     "must not come after a ttl='5m'"),
    ({"system": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "10m"}}]},
     "ttl: Input should be '5m' or '1h'"),
    ({"system": [{"type": "text", "text": "a", "cache_control": {"type": "persistent"}}]}, "type 'ephemeral'"),
    ({"cache_control": {"type": "ephemeral", "ttl": 5}}, "ttl: Input should be '5m' or '1h'"),
    ({"messages": [{"role": "user", "content": [cached("")]}]}, "empty text blocks"),
    ({"messages": [{"role": "user", "content": [cached("hi")]}], "cache_control": "yes"}, "type 'ephemeral'"),
])
def test_breakpoint_rules_are_400s(client, body, message):
    base = {"model": GA, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(**{**base, **body})
    assert message in e.value.message


def test_four_breakpoints_and_the_automatic_one_on_an_already_marked_block_are_fine(client):
    system = [cached(words(30, 50 + i)) for i in range(3)]
    msgs = [{"role": "user", "content": [cached(words(30, 60))]}]
    u = ask(client, system, messages=msgs, cache_control={"type": "ephemeral"}).parse().usage
    assert u.cache_creation_input_tokens > 256
    # 1h before 5m, across tools, system and messages, is the allowed order
    ok = ask(client, [cached(words(60, 61), "1h")], messages=[{"role": "user", "content": [cached(words(30, 62))]}])
    assert ok.parse().usage.cache_creation.ephemeral_1h_input_tokens > 0


def test_a_nested_tool_result_breakpoint_counts_once_with_the_automatic_form(client):
    system = [cached(words(30, 90 + i)) for i in range(3)]
    msgs = [{"role": "user", "content": "Look it up."},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
                {"type": "text", "text": words(20, 94), "cache_control": {"type": "ephemeral"}}]}]}]
    tools = [{"name": "lookup", "description": "Look up.", "input_schema": {"type": "object"}}]
    # 3 system + 1 nested = 4: the automatic breakpoint lands on the already marked block
    u = ask(client, system, messages=msgs, tools=tools, cache_control={"type": "ephemeral", "ttl": "1h"}).parse().usage
    assert u.cache_creation_input_tokens > 256


def test_model_ids_sharing_weights_never_share_a_cache(client):
    system = [cached(words(200, 95))]
    assert ask(client, system).parse().usage.cache_creation_input_tokens > 1024
    other = ask(client, system, model=PREVIEW).parse().usage  # same weights, another model id
    assert other.cache_read_input_tokens == 0 and other.cache_creation_input_tokens > 1024


def test_hidden_tools_still_cache_the_messages(client):
    tools = [{"name": "lookup", "description": "Look up.", "input_schema": {"type": "object"}}]
    msgs = [{"role": "user", "content": [cached(words(90, 96))]}]
    kw = dict(messages=msgs, tools=tools, tool_choice={"type": "none"})
    first = ask(client, **kw).parse().usage
    assert first.cache_creation_input_tokens > 256
    assert ask(client, **kw).parse().usage.cache_read_input_tokens == first.cache_creation_input_tokens


def test_text_holding_the_render_mark_still_answers_uncached(client):
    system = [cached(words(100, 70) + "\ufdd0")]
    u = ask(client, system).parse().usage
    assert (u.cache_creation_input_tokens, u.cache_read_input_tokens) == (0, 0) and u.input_tokens > 500


def test_batch_items_read_the_standard_cache(client, server):
    system = [cached(words(100, 80))]
    warm = ask(client, system).parse().usage
    batch = client.messages.batches.create(requests=[{"custom_id": "a", "params": {
        "model": GA, "max_tokens": 4, "system": system,
        "messages": [{"role": "user", "content": "Go on."}]}}])
    for _ in range(600):
        batch = client.messages.batches.retrieve(batch.id)
        if batch.processing_status == "ended":
            break
        time.sleep(0.05)
    (result,) = list(client.messages.batches.results(batch.id))
    assert result.result.type == "succeeded"
    assert result.result.message.usage.cache_read_input_tokens == warm.cache_creation_input_tokens


def test_a_stream_left_before_its_prefix_was_computed_bills_no_cache_write(tiny):
    """message_start reports the planned write; the client leaves before the prompt reaches the
    breakpoint, so no entry is written: the usage row bills the prompt as plain input (and the
    same request again reads nothing, as billed)."""
    import httpx

    platform = Platform(Database())
    state = build_state({"tiny-random": tiny}, small_engine_config(), catalog=example_catalog(**CHANGES),
                        platform=platform)
    engine = state.backends["tiny-random"].engine
    step = engine.step

    def slow_step():  # one 32-token prompt chunk per 50 ms: the client leaves long before the breakpoint
        time.sleep(0.05)
        step()
    engine.step = slow_step
    body = {"model": GA, "max_tokens": 8, "stream": True, "system": [cached(words(250, 11))],
            "messages": [{"role": "user", "content": "Go on."}]}
    with running_server(state) as url:
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        with httpx.stream("POST", url + "/v1/messages", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            rid = r.headers["request-id"]
            for line in r.iter_lines():
                if line.startswith("data: "):
                    planned = json.loads(line[6:])["message"]["usage"]
                    break
        deadline = time.monotonic() + 10
        while not platform.db.query("SELECT 1 FROM usage WHERE request_id = ?", (rid,)) and time.monotonic() < deadline:
            time.sleep(0.05)
        row = ledger(platform, rid)
        engine.step = step
        again = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0).messages.create(
            **{**body, "stream": False}).usage
    assert planned["cache_creation_input_tokens"] > 256 and planned["cache_read_input_tokens"] == 0
    assert row["outcome"] == "canceled" and row["output_tokens"] == 0
    assert (row["cache_creation_5m_input_tokens"], row["cache_read_input_tokens"]) == (0, 0)
    assert row["uncached_input_tokens"] == planned["input_tokens"] + planned["cache_creation_input_tokens"]
    assert again.cache_read_input_tokens == 0
    assert again.cache_creation_input_tokens == planned["cache_creation_input_tokens"]
