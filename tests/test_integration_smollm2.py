"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) served for real, with the official SDK as client."""
import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import pytest

from conftest import running_server
from fastmode.bench.runner import WORKLOADS
from fastmode.config import EngineConfig
from fastmode.server.app import build_state
from fastmode.weights.registry import DEFAULT_MODEL, load_model


@pytest.fixture(scope="module")
def served():
    # with the packaged draft corpus (on by default) and draft head (off by default): their
    # drafts must keep the lanes identical
    state = build_state(load_model(DEFAULT_MODEL), EngineConfig(kv_cache_tokens=16384, draft_head=True))
    with running_server(state) as url:
        yield state, anthropic.Anthropic(base_url=url, api_key="test", max_retries=0)


@pytest.fixture(scope="module")
def client(served):
    return served[1]


def test_create_answers_sensibly(client):
    # A 135M model at 4 bits sits near a tie on some questions, and a tie can flip with the
    # kernels' rounding: a working model answers most of these, a broken one none.
    questions = [("What is the capital of France?", "Paris"), ("What is the capital of Germany?", "Berlin"),
                 ("Which city is the capital of France? Answer in one word.", "Paris")]
    right = 0
    for question, answer in questions:
        m = client.messages.create(model=DEFAULT_MODEL, max_tokens=30,
                                   messages=[{"role": "user", "content": question}])
        right += answer in m.content[0].text
        assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.speed == "standard"
        assert m.usage.input_tokens > 10 and 0 < m.usage.output_tokens <= 30
    assert right >= 2, f"{right}/3 questions answered"


def test_stream_and_beta_fast_give_the_same_text(client):
    kw = dict(model=DEFAULT_MODEL, max_tokens=40, messages=[{"role": "user", "content": "Name three colors."}])
    with client.messages.stream(**kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    fast = client.beta.messages.create(speed="fast", betas=["fast-mode-2026-02-01"], **kw)
    assert streamed == final.content[0].text == fast.content[0].text
    assert final.usage.speed == "standard" and fast.usage.speed == "fast"


def test_tools_are_accepted(client):
    tools = [{"name": "get_weather", "description": "Current weather for a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    m = client.messages.create(model=DEFAULT_MODEL, max_tokens=40, tools=tools,
                               messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    assert m.stop_reason in ("end_turn", "max_tokens", "tool_use") and m.content


def test_a_forced_tool_choice_gets_a_tool_use_block_in_both_lanes(client):
    """The reply starts with the named tool's call, so the model writes its arguments (the
    default model's greedy arguments read as JSON here) and the reply is a tool_use block."""
    tools = [{"name": "get_weather", "description": "Current weather for a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
             {"name": "get_time", "description": "Current time in a time zone",
              "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}]
    kw = dict(model=DEFAULT_MODEL, max_tokens=80, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
              messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    replies = [client.messages.create(**kw), client.messages.create(speed="fast", **kw)]
    with client.messages.stream(**kw) as s:
        replies.append(s.get_final_message())
    for m in replies:
        assert m.stop_reason == "tool_use", m.content
        assert [b.type for b in m.content] == ["tool_use"] and m.content[0].name == "get_weather"
        assert isinstance(m.content[0].input, dict)
    assert replies[0].content[0].input == replies[1].content[0].input == replies[2].content[0].input


def test_greedy_outputs_identical_across_lanes_on_benchmark_prompts(served):
    state, client = served
    items = [json.loads(line) for line in (WORKLOADS / "dev.jsonl").read_text().splitlines() if line.strip()]

    def ask(item, speed):
        kw = dict(model=DEFAULT_MODEL, max_tokens=48, messages=item["messages"])
        if item.get("system"):
            kw["system"] = item["system"]
        m = client.messages.create(speed=speed, **kw)
        assert m.usage.speed == speed
        return m.content[0].text if m.content else ""

    with ThreadPoolExecutor(4) as pool:  # several requests share each lane's batch
        standard = list(pool.map(lambda it: ask(it, "standard"), items))
        fast = list(pool.map(lambda it: ask(it, "fast"), items))
    assert len(items) >= 15
    for item, s, f in zip(items, standard, fast):
        assert s == f, f"lanes differ on a {item['category']} prompt"
    engine = state.backends[DEFAULT_MODEL].engine
    stats = engine.stats  # the packaged draft corpus and head drafted, and were right at times
    assert stats["corpus_drafted"] > 0 and stats["corpus_accepted"] > 0, stats
    assert stats["head_drafted"] > 0 and stats["head_accepted"] > 0, stats
    assert engine.drafter.head.native or not engine.model.native  # on the native kernels once switched on


def test_a_question_asked_again_is_drafted_from_the_draft_pool(served):
    state, client = served
    engine = state.backends[DEFAULT_MODEL].engine
    kw = dict(model=DEFAULT_MODEL, max_tokens=80, speed="fast", metadata={"user_id": "pool-test"},
              messages=[{"role": "user", "content": "Why do leaves change colour in autumn?"}])
    first = client.messages.create(**kw)
    before = dict(engine.stats)
    again = client.messages.create(**kw)
    assert again.content[0].text == first.content[0].text and again.usage.output_tokens > 20
    accepted = engine.stats["pool_accepted"] - before["pool_accepted"]
    assert accepted >= again.usage.output_tokens // 2, engine.stats  # most of the answer came from the pool


def test_prompt_cache_hit_reads_the_prefix_and_answers_the_same(client):
    doc = " ".join(f"Line {i}: the ledger of port {i % 7} lists grain, salt and timber." for i in range(90))
    system = [{"type": "text", "text": doc, "cache_control": {"type": "ephemeral"}}]
    kw = dict(model=DEFAULT_MODEL, max_tokens=24, system=system,
              messages=[{"role": "user", "content": "Which goods does the ledger list?"}])
    cold = client.messages.create(**kw)
    warm = client.messages.create(**kw)
    fast = client.messages.create(speed="fast", **kw)
    total = client.messages.count_tokens(model=DEFAULT_MODEL, system=system, messages=kw["messages"]).input_tokens
    p = cold.usage.cache_creation_input_tokens
    assert 1024 <= p < total and cold.usage.input_tokens == total - p  # the question stays uncached
    assert (warm.usage.cache_read_input_tokens, warm.usage.input_tokens) == (p, total - p)
    assert fast.usage.cache_read_input_tokens == 0 and fast.usage.cache_creation_input_tokens == p
    assert cold.content[0].text == warm.content[0].text == fast.content[0].text


def test_breakpoints_fall_where_their_blocks_end_with_the_real_tokenizer():
    from fastmode.server.messages import _prompt
    from fastmode.server.validate import parse_messages_request

    state = build_state(load_model(DEFAULT_MODEL), EngineConfig(kv_cache_tokens=1024))
    backend = next(iter(state.backends.values()))
    cc = {"type": "ephemeral"}
    blocks = {"system": "You are terse. Ünïcode ✓ too.",
              "first": "Here is a city list: Paris, Lyon, Nice.", "second": " Which is largest?"}
    body = {"model": DEFAULT_MODEL, "max_tokens": 5, "system": [{"type": "text", "text": blocks["system"], "cache_control": cc}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}, "cache_control": cc}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": blocks["first"], "cache_control": cc},
                                                      {"type": "text", "text": blocks["second"], "cache_control": cc}]}]}
    ids, spec = _prompt(parse_messages_request(body, "2023-06-01"), backend, "org", 1, 8192)
    tok = backend.loaded.tokenizer
    positions = [b.position for b in spec.breakpoints]
    assert len(positions) == 4 and positions == sorted(positions) and positions[-1] < len(ids)
    prefixes = [tok.hf.decode(ids[:p], skip_special_tokens=False) for p in positions]
    assert prefixes[0].endswith('"input_schema": {"type": "object"}}') and blocks["system"] not in prefixes[0]
    assert prefixes[1].endswith(blocks["system"])
    assert prefixes[2].endswith(blocks["first"]) and prefixes[3].endswith(blocks["second"])
