"""The HTTP API on the tiny random model, through the official SDK and raw HTTP."""
import json
import time

import anthropic
import httpx
import pytest

from conftest import running_server, serve_asgi, small_engine_config
from fastmode.platform.service import Platform
from fastmode.server.app import Server, build_state, create_app

MODEL = "tiny-random"
V = {"anthropic-version": "2023-06-01", "x-api-key": "k"}


@pytest.fixture(scope="module")
def url(tiny_server):
    return tiny_server[0]


@pytest.fixture(scope="module")
def client(url):
    return anthropic.Anthropic(base_url=url, api_key="test-key", max_retries=0)


def test_create_reports_lane_in_usage_speed(client):
    msg = {"role": "user", "content": "hello hello hello"}
    std = client.messages.create(model=MODEL, max_tokens=12, messages=[msg])
    fast = client.messages.create(model=MODEL, max_tokens=12, messages=[msg], speed="fast")
    assert std.usage.speed == "standard" and fast.usage.speed == "fast"
    assert std.content[0].text == fast.content[0].text  # greedy default decoding on 2026-10-21
    assert std.usage.output_tokens == 12 and std.stop_reason == "max_tokens"
    assert std.id.startswith("msg_") and std._request_id.startswith("req_")


def test_stream_matches_create_and_carries_speed(client):
    kw = dict(model=MODEL, max_tokens=15, messages=[{"role": "user", "content": "abc abc"}])
    full = client.messages.create(**kw)
    with client.messages.stream(speed="fast", **kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == full.content[0].text == final.content[0].text
    assert final.usage.speed == "fast" and final.usage.output_tokens == 15


def test_beta_namespace_with_fast_mode_header(client):
    m = client.beta.messages.create(model=MODEL, max_tokens=5, speed="fast", betas=["fast-mode-2026-02-01"],
                                    messages=[{"role": "user", "content": "x"}])
    assert m.usage.speed == "fast"


def test_sse_event_sequence(url):
    body = {"model": MODEL, "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", url + "/v1/messages?beta=true", json=body, headers=V) as r:
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["request-id"].startswith("req_")
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    core = [e for e in events if e != "ping"]
    assert core[1] == "content_block_start" and core[-3] == "content_block_stop"
    assert set(core[2:-3]) == {"content_block_delta"}


def test_temperature_rules_per_api_version(url, client):
    body = {"model": MODEL, "max_tokens": 3, "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}]}
    ok = httpx.post(url + "/v1/messages", json=body, headers=V)
    assert ok.status_code == 200
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}],
                               extra_body={"temperature": 0.5})


def test_a_tool_result_answers_an_assistant_turn_split_in_two_messages(client):
    """Consecutive assistant messages are one turn: a result may answer a call in either."""
    msg = client.messages.create(model=MODEL, max_tokens=2, tools=[{"name": "a", "input_schema": {"type": "object"}}],
                                 messages=[{"role": "user", "content": "x"},
                                           {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "a",
                                                                              "input": {}}]},
                                           {"role": "assistant", "content": "checking"},
                                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                                         "content": "y"}]}])
    assert msg.usage.output_tokens == 2


def test_count_tokens_counts_prompts_longer_than_the_context_window(client):
    """Only a request that runs is held to the window; a count is refused (before tokenizing)
    only far beyond it."""
    n = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x" * 30000}])
    assert n.input_tokens > 30000  # at least 2308 tokens by length alone: over the window of 2048
    with pytest.raises(anthropic.BadRequestError, match="too long to count"):
        client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x" * 10 ** 6}])


CALLED = [{"role": "user", "content": "x"},  # a conversation whose last turn called tool a as t1
          {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "a", "input": {}}]}]


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens: Field required"),
    ({"model": MODEL, "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "messages": "hi"}, 400, "messages: Input should be a valid list"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, 400, "role"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "video"),
    ({"model": MODEL, "max_tokens": 5, "speed": "turbo", "messages": [{"role": "user", "content": "x"}]}, 400, "speed"),
    ({"model": MODEL, "max_tokens": 5, "stop_sequences": [1], "messages": [{"role": "user", "content": "x"}]}, 400, "stop_sequences"),
    ({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, 400, "image"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "prompt is too long"),
    # refused by its length in characters alone, before it is tokenized
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 10 ** 6}]}, 400,
     "prompt is too long: at least"),
    ({"model": MODEL, "max_tokens": 5, "stop_sequences": ["s"] * 65, "messages": [{"role": "user", "content": "x"}]},
     400, "at most 64 stop sequences"),
    ({"model": MODEL, "max_tokens": 5, "stop_sequences": ["s" * 1001], "messages": [{"role": "user", "content": "x"}]},
     400, "of at most 1000 characters"),
    ({"model": MODEL, "max_tokens": 10 ** 6, "messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]},
     400, "needs at least one tool"),
    ({"model": MODEL, "max_tokens": 5, "tools": [{"name": "a", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "b"},
      "messages": [{"role": "user", "content": "x"}]}, 400, "'b' is not one of the tools"),
    ({"model": MODEL, "max_tokens": 5, "tools": [{"name": "a", "input_schema": {}}, {"name": "a", "input_schema": {}}],
      "messages": [{"role": "user", "content": "x"}]}, 400, "tool names must be unique"),
    ({"model": MODEL, "max_tokens": 5, "metadata": {"user_id": 5}, "messages": [{"role": "user", "content": "x"}]},
     400, "metadata.user_id"),
    ({"model": MODEL, "max_tokens": 5, "metadata": "u1", "messages": [{"role": "user", "content": "x"}]}, 400, "metadata"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": ""}]}, 400, "non-empty content"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": []}]}, 400, "non-empty content"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
     400, "text content blocks must be non-empty"),
    ({"model": MODEL, "max_tokens": 5, "messages": [*CALLED,
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "y"}]}]},
     400, "messages.2.content.0: unexpected `tool_use_id`"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": "y"}]}]}, 400, "unexpected `tool_use_id`"),
    ({"model": MODEL, "max_tokens": 5, "messages": [*CALLED,  # a later turn answers only the turn before it
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "y"}]},
        {"role": "assistant", "content": "z"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "y"}]}]},
     400, "messages.4.content.0: unexpected `tool_use_id`"),
    ({"model": MODEL, "max_tokens": 5, "messages": [*CALLED,
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": "yes"}]}]},
     400, "is_error"),
    ({"model": MODEL, "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "x"}]}, 400, "tools.0.type: Anthropic-defined tools"),
    ({"model": MODEL, "max_tokens": 5, "temprature": 0.2, "messages": [{"role": "user", "content": "x"}]},
     400, "temprature: Extra inputs are not permitted"),
    ({"model": MODEL, "max_tokens": 5, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
      "messages": [{"role": "user", "content": "x"}]}, 400, "output_config.format: structured outputs"),
])
def test_bad_input_gets_a_4xx_anthropic_error(url, body, status, needle):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/messages", content=data, headers={**V, "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and needle in err["error"]["message"]
    assert r.headers["request-id"] == err["request_id"]


def test_headers_and_routes(url):
    r = httpx.post(url + "/v1/messages", json={}, headers={"x-api-key": "k"})
    assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/messages", json={}, headers={"x-api-key": "k", "anthropic-version": "1999-01-01"})
    assert r.status_code == 400
    r = httpx.get(url + "/v1/nothing-here", headers=V)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error" and "request-id" in r.headers
    r = httpx.get(url + "/v1/messages", headers=V)
    assert r.status_code == 405 and r.json()["type"] == "error"
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(url + "/v1/messages", json=body, headers={"authorization": "Bearer abc",
                                                             "anthropic-version": "2026-10-21",
                                                             "anthropic-beta": "some-future-beta,fast-mode-2026-02-01"})
    assert r.status_code == 200
    r = httpx.post(url + "/v1/messages/", json=body, headers=V)  # a trailing slash: an error, not a bare redirect
    assert r.status_code == 404 and r.json()["type"] == "error" and r.headers["request-id"].startswith("req_")


def test_count_tokens_takes_what_create_takes_but_max_tokens_stream_and_stop_sequences(url):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    for extra, version, needle in (({"max_tokens": 5}, "2023-06-01", "max_tokens: Extra inputs"),
                                   ({"stream": True}, "2023-06-01", "stream: Extra inputs"),
                                   ({"temperature": 0.5}, "2026-10-21", "temperature")):
        r = httpx.post(url + "/v1/messages/count_tokens", json={**base, **extra},
                       headers={**V, "anthropic-version": version})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    r = httpx.post(url + "/v1/messages/count_tokens", json={**base, "temperature": 0.5}, headers=V)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_count_tokens_and_models(client):
    n = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    m = client.messages.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "hello"}])
    assert n.input_tokens == m.usage.input_tokens > 0
    models = client.models.list()
    assert [x.id for x in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("other")


def test_stop_sequences_and_max_tokens_zero(client):
    base = client.messages.create(model=MODEL, max_tokens=30, messages=[{"role": "user", "content": "stop test"}])
    text = base.content[0].text
    stop = text[5:7]
    assert len(stop) == 2
    cut = client.messages.create(model=MODEL, max_tokens=30, stop_sequences=[stop],
                                 messages=[{"role": "user", "content": "stop test"}])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content) == text[: text.index(stop)]
    zero = client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert zero.content == [] and zero.usage.output_tokens == 0 and zero.stop_reason == "max_tokens"


def test_client_disconnect_frees_kv_blocks(tiny_server):
    url, state = tiny_server
    total = state.backends[MODEL].engine.blocks.num_blocks
    body = {"model": MODEL, "max_tokens": 2000, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with httpx.stream("POST", url + "/v1/messages", json=body, headers=V) as r:
        for line in r.iter_lines():
            if line.startswith("event: content_block_delta"):
                assert state.backends[MODEL].engine.blocks.num_free < total
                break
    deadline = time.monotonic() + 10
    while state.backends[MODEL].engine.blocks.num_free != total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.backends[MODEL].engine.blocks.num_free == total


def test_stopping_server_ends_running_requests_with_an_overloaded_error_after_its_grace(tiny):
    """Ctrl-C: requests still generating when the grace ends get an overloaded error (a stream
    as its last event, a request not streamed as a 529) and their usage rows, not a cut
    connection."""
    import threading

    state = build_state(tiny, small_engine_config())
    engine = state.backends[MODEL].engine
    step = engine.step

    def slow_step():  # a long generation: far longer than the grace
        time.sleep(0.01)
        step()
    engine.step = slow_step
    servers = []

    def make(config):
        servers.append(Server(state, config, grace=0.5))
        return servers[0]
    long = {"model": MODEL, "max_tokens": 1900, "messages": [{"role": "user", "content": "go"}]}
    with serve_asgi(create_app(state), server_class=make) as url:
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        plain: list[Exception] = []

        def not_streamed():
            try:
                c.messages.create(**long)
            except Exception as e:
                plain.append(e)
        other = threading.Thread(target=not_streamed)
        with c.messages.stream(**long) as stream:
            events = iter(stream)
            while next(events).type != "text":
                pass
            other.start()
            deadline = time.monotonic() + 10
            while len(state.live) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(state.live) == 2
            servers[0].should_exit = True
            with pytest.raises(anthropic.APIStatusError) as e:
                for _ in events:
                    pass
        other.join(timeout=20)
        assert e.value.body["error"]["type"] == "overloaded_error"
        assert len(plain) == 1 and getattr(plain[0], "status_code", None) == 529
    assert not state.live  # (once the server is gone: a stream leaves it after its last byte went out)
    rows = state.platform.db.query("SELECT outcome, output_tokens FROM usage")
    assert len(rows) == 2 and all(r["outcome"] == "error" and 0 < r["output_tokens"] < 1900 for r in rows)
    assert state.stopping


def test_after_the_cut_off_a_request_that_had_not_started_is_refused_with_529(tiny_server):
    url, state = tiny_server
    before = len(state.platform.db.query("SELECT 1 FROM usage"))
    state.stopping = True  # as the cut-off leaves it, for requests still reading their body or tokenizing
    try:
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as e:
            c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=True)
        assert e.value.status_code == 529 and "shutting down" in e.value.message
    finally:
        state.stopping = False
    assert len(state.platform.db.query("SELECT 1 FROM usage")) == before  # it never ran: no usage row


def test_api_keys_and_overload(tiny):
    platform = Platform(open_mode=False)
    platform.accounts.create_org("acme")
    _, secret = platform.accounts.create_key("acme")
    state = build_state(tiny, small_engine_config(max_waiting=0), platform=platform)
    with running_server(state) as url:
        bad = anthropic.Anthropic(base_url=url, api_key="bad", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])
        good = anthropic.Anthropic(base_url=url, api_key=secret, max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as e:  # 529 overloaded_error
            good.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"


def test_request_larger_than_the_kv_cache_is_a_clear_400(tiny):
    state = build_state(tiny, small_engine_config(kv_cache_tokens=64))
    with running_server(state) as url:
        c = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.BadRequestError, match="kv-cache-tokens"):
            c.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "x"}])


def test_random_malformed_bodies_never_get_a_5xx(url):
    """Replace one field at a time with values of every wrong type."""
    import random

    rng = random.Random(0)
    valid = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], "system": "s",
             "stop_sequences": ["x"], "stream": False, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
             "tools": [{"name": "t", "input_schema": {"type": "object"}}], "tool_choice": {"type": "auto"},
             "speed": "fast", "service_tier": "auto", "metadata": {"user_id": "u"}, "thinking": {"type": "disabled"}}
    junk = [None, True, -1, 0, 2.5, "", "x", [], [1], {}, {"type": "zzz"}, [{"role": "user"}], [{"type": "text"}],
            [{"role": "user", "content": [{"type": "tool_result"}]}], [{"role": "assistant", "content": "a"}]]
    for _ in range(150):
        body = json.loads(json.dumps(valid))
        for field in rng.sample(sorted(valid), rng.randrange(1, 3)):
            body[field] = rng.choice(junk)
        if rng.random() < 0.2:
            body.pop(rng.choice(sorted(body)))
        r = httpx.post(url + "/v1/messages", json=body, headers=V, timeout=60)
        assert r.status_code < 500, (body, r.text)
        if r.status_code != 200:
            assert r.json()["type"] == "error"


@pytest.mark.parametrize("content", [
    [{"type": "document", "source": "x"}],
    [{"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": 5}]}}],
    [{"type": "search_result", "title": 3, "source": "s", "content": []}],
    [{"type": "search_result", "title": "t", "source": "s", "content": None}],
    "lone surrogate \ud800 here",
])
def test_malformed_blocks_and_text_are_400s(url, content):
    for path, extra in (("/v1/messages", {"max_tokens": 3}), ("/v1/messages/count_tokens", {})):
        body = json.dumps({"model": MODEL, **extra, "messages": [{"role": "user", "content": content}]})
        r = httpx.post(url + path, content=body, headers={**V, "content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)


def test_deeply_nested_body_is_a_400(url):
    body = '{"model": "x", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(url + "/v1/messages", content=body, headers={**V, "content-type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


def test_near_zero_temperature_is_greedy(url, client):
    msg = [{"role": "user", "content": "temperature"}]
    greedy = client.messages.create(model=MODEL, max_tokens=10, messages=msg)
    body = {"model": MODEL, "max_tokens": 10, "temperature": 1e-45, "messages": msg}
    r = httpx.post(url + "/v1/messages", json=body, headers=V)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == greedy.content[0].text


def wait_all_free(state, timeout=15.0):
    deadline = time.monotonic() + timeout
    while state.backends[MODEL].engine.blocks.num_free != state.backends[MODEL].engine.blocks.num_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    return state.backends[MODEL].engine.blocks.num_free == state.backends[MODEL].engine.blocks.num_blocks


def test_leaving_right_after_message_start_or_mid_request_frees_blocks(tiny_server):
    url, state = tiny_server
    body = {"model": MODEL, "max_tokens": 2000, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with httpx.stream("POST", url + "/v1/messages", json=body, headers=V) as r:
        for line in r.iter_lines():
            if line.startswith("event: message_start"):
                break
    assert wait_all_free(state)
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(url + "/v1/messages", json=body, headers=V, timeout=0.3)
    assert wait_all_free(state)


def test_a_forced_tool_choice_starts_the_reply_with_the_tool_call(client):
    """tool_choice "tool" makes the reply start with that tool's call: a tool_use block when the
    model's arguments read as JSON, else text that starts with the call (tiny-random's random
    tokens); streamed or not, the same blocks."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}, {"name": "other", "input_schema": {}}]
    kw = dict(model=MODEL, max_tokens=12, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
              messages=[{"role": "user", "content": "weather?"}])
    m = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    first = m.content[0]
    if first.type == "tool_use":
        assert first.name == "get_weather" and m.stop_reason == "tool_use"
    else:
        assert first.text.startswith('<tool_call>{"name": "get_weather", "arguments": ')
    strip = lambda msg: [{k: v for k, v in b.model_dump().items() if k != "id"} for b in msg.content]
    assert strip(m) == strip(streamed) and m.stop_reason == streamed.stop_reason
    n = client.messages.count_tokens(**{k: v for k, v in kw.items() if k != "max_tokens"}).input_tokens
    assert n == m.usage.input_tokens  # the call's start is part of the prompt


def _upload(chunks: int, chunk_bytes: int, disconnect: bool = False, json_value: bytes = b"1"):
    """A Starlette request whose body arrives in `chunks` fresh chunks of spaces ending in
    `json_value` (with `disconnect`, the client leaves instead of sending the last)."""
    from starlette.requests import Request

    sent = 0

    async def receive():
        nonlocal sent
        if sent == chunks:
            return {"type": "http.disconnect"}
        sent += 1
        more = sent < chunks or disconnect
        return {"type": "http.request", "body": b" " * chunk_bytes + (b"" if more else json_value), "more_body": more}
    return Request({"type": "http", "method": "POST", "path": "/v1/messages", "headers": []}, receive)


def test_a_body_over_the_limit_is_a_413_read_without_keeping_it():
    import asyncio
    import tracemalloc

    from fastmode.server.errors import RequestTooLarge
    from fastmode.server.http import json_body

    mb = 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(RequestTooLarge, match="104857601 bytes exceeds the 8388608 byte limit"):
            asyncio.run(json_body(_upload(100, mb), limit=8 * mb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * mb  # the limit and a chunk or two, not the 100 MB sent
    assert asyncio.run(json_body(_upload(7, mb, json_value=b'{"a": [1]}'), limit=8 * mb)) == {"a": [1]}


def test_a_client_leaving_mid_upload_is_gone_not_a_server_error():
    import asyncio

    from fastmode.server.http import ClientGone, json_body

    with pytest.raises(ClientGone):
        asyncio.run(json_body(_upload(3, 1000, disconnect=True)))
