"""The draft pool: earlier answers of the same scope drafted from, never across scopes, lanes or users."""
import itertools
import random

import anthropic
import pytest

from conftest import fixed_pass_cost, running_server, small_engine_config
from fastmode.engine.pool import DraftPool
from fastmode.engine.request import Lane, SamplingParams, Status
from fastmode.engine.speculation import PromptLookup
from fastmode.server.app import build_state

MODEL = "tiny-random"


def test_a_repeated_prompt_finds_its_answer_from_the_first_token():
    pool = DraftPool(max_ngram=4, min_ngram=2, lead_in=3)
    prompt, answer = [9, 8, 7, 6, 5], [10, 11, 12, 13, 14, 15]
    pool.add("s", prompt, answer)
    assert pool.proposal("s", [1, 2, 7, 6, 5], 4) == (3, [10, 11, 12, 13])  # the prompt's tail (lead-in) matched
    assert pool.proposal("s", [*prompt, 10, 11], 3) == (4, [12, 13, 14])  # longest suffix, up to max_ngram
    assert pool.proposal("s", [0, 14], 5) == (0, [])  # single tokens are below min_ngram
    assert pool.proposal("s", [13, 14], 5) == (2, [15])  # stops at the answer's end
    assert pool.proposal("s", [4, 3], 5) == (0, []) and pool.proposal("other", [7, 6, 5], 4) == (0, [])
    assert pool.proposal("s", [6, 5], 0) == (0, [])


def test_the_latest_answer_wins_and_old_answers_roll_out():
    pool = DraftPool(max_ngram=2, min_ngram=2, lead_in=0, max_tokens=24)
    pool.add("s", [], [1, 2, 3, 4])
    pool.add("s", [], [1, 2, 5, 6])
    assert pool.proposal("s", [1, 2], 2) == (2, [5, 6])  # the newer continuation
    for i in range(3):  # each kept as its first 11 tokens + a separator: a generation each
        pool.add("s", [], [20 + i] * 14)
    assert pool.proposal("s", [1, 2], 2) == (0, [])  # rolled out with the oldest generation
    assert pool.tokens("s") == 24 and pool.proposal("s", [21, 21], 2) == (2, [21])  # the latest occurrence
    assert pool.proposal("s", [22, 22], 2) == (2, [22]) and pool.proposal("s", [20, 20], 2) == (0, [])
    pool.add("s", [], [30])  # a one-token answer is not kept
    assert pool.proposal("s", [30], 1) == (0, [])


def test_scopes_beyond_the_limit_are_dropped_least_recently_used_first():
    pool = DraftPool(max_ngram=2, min_ngram=2, lead_in=0, max_scopes=2)
    pool.add("a", [], [1, 2, 3])
    pool.add("b", [], [4, 5, 6])
    pool.add("a", [], [7, 8, 9])  # a is now the most recent
    pool.add("c", [], [1, 2, 4])
    assert len(pool) == 2 and pool.tokens("b") == 0 and pool.proposal("a", [7, 8], 1) == (2, [9])
    with pytest.raises(ValueError):
        DraftPool(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError):
        DraftPool(max_tokens=1000, max_total_tokens=999)


def test_all_scopes_together_keep_within_their_token_budget():
    pool = DraftPool(max_ngram=2, min_ngram=2, lead_in=0, max_tokens=20, max_total_tokens=20)
    for scope in "abc":
        pool.add(scope, [], [1, 2, 3, 4, 5])  # 6 tokens each with the separator
    assert pool.total_tokens == 18 and len(pool) == 3
    pool.add("a", [], [6, 7])  # a is the most recent now
    pool.add("d", [], [1, 2, 3, 4, 5])  # 27 tokens: the least recently used go, b then c
    assert pool.total_tokens == 9 + 6 <= 20 and pool.tokens("b") == pool.tokens("c") == 0
    assert pool.proposal("a", [6], 1) == (0, []) and pool.proposal("a", [1, 2], 1) == (2, [3])
    pool.add("d", [], list(range(100, 130)))  # longer than a generation: its first 9 tokens kept
    assert pool.tokens("d") == pool.total_tokens == 6 + 10 and pool.tokens("a") == 0  # a made room
    assert pool.proposal("d", [106, 107], 5) == (2, [108]) and pool.proposal("d", [108, 109], 5) == (0, [])


_ids = itertools.count()


def _answer(engine, prompt, pool, lane=Lane.FAST, max_tokens=24, params=None):
    out, done = [], []
    engine.add(f"r{next(_ids)}", prompt, params or SamplingParams(max_tokens=max_tokens), lane,
               lambda d: (out.extend(d.token_ids), d.status.finished and done.append(d.status)), pool=pool)
    while not done:
        engine.step()
    return out


def _fast(engine, prompt, pool):
    return _answer(engine, prompt, pool)


def test_the_fast_lane_drafts_a_repeated_answer_from_the_pool_within_its_scope_only(make_engine, monkeypatch):
    monkeypatch.setattr(PromptLookup, "propose", lambda self, k: [])  # the pool the only source of drafts
    engine = fixed_pass_cost(make_engine())
    prompt = [5, 17, 33, 2, 41, 7, 19]
    standard = _answer(engine, prompt, "org", Lane.STANDARD)
    steps = engine.stats["steps"]
    first = _fast(engine, prompt, "org")  # the standard lane's answer is not in the fast lane's pool
    first_steps, steps = engine.stats["steps"] - steps, engine.stats["steps"]
    assert engine.stats["pool_drafted"] == 0 and engine.pool.tokens("org\0fast") > 0
    assert engine.pool.tokens("org\0standard") == 0  # a lane that does not draft keeps no pool
    other = _fast(engine, prompt, "other org")
    assert engine.stats["pool_drafted"] == 0
    steps = engine.stats["steps"]
    again = _fast(engine, prompt, "org")
    assert first == other == again == standard
    # the same answer again: every pool draft is right, and fewer passes make it
    assert engine.stats["pool_accepted"] == engine.stats["pool_drafted"] > 0, engine.stats
    assert engine.stats["steps"] - steps < first_steps
    drafted = engine.stats["pool_drafted"]
    assert _fast(engine, prompt, None) == standard and engine.stats["pool_drafted"] == drafted  # no scope: no pool


def test_a_pool_can_be_switched_off_and_a_failed_request_adds_nothing(make_engine):
    engine = make_engine(draft_pool=False)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert _fast(engine, prompt, "org") == _fast(engine, prompt, "org")
    assert engine.pool is None and engine.stats["pool_drafted"] == 0
    engine = make_engine()
    engine._finish(engine_request(engine, prompt, [10, 11, 12]), Status.FINISHED_ERROR, [])
    assert len(engine.pool) == 0


def test_sampled_and_aborted_requests_use_the_pool_too(make_engine, monkeypatch):
    monkeypatch.setattr(PromptLookup, "propose", lambda self, k: [])
    engine = fixed_pass_cost(make_engine())
    prompt = [7, 7, 1, 9, 3, 8, 2]
    rid = "partial"
    engine.add(rid, prompt, SamplingParams(max_tokens=200), Lane.FAST, lambda d: None, pool="org")
    for _ in range(6):
        engine.step()
    engine.abort(rid)
    engine.step()
    assert rid not in engine.requests and engine.pool.tokens("org\0fast") > 0  # the partial answer kept
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=5)
    first = _answer(engine, prompt, "user", params=sampled)
    assert _answer(engine, prompt, "user", params=sampled) == first  # seeded: the same tokens again
    assert engine.stats["pool_drafted"] > 0 and all(0 <= t < engine.model.arch.vocab_size for t in first)


def test_answers_older_than_the_age_limit_are_not_drafted_and_go(monkeypatch):
    now = [0.0]
    pool = DraftPool(max_ngram=2, min_ngram=2, lead_in=0, max_tokens=20, max_age=60.0, clock=lambda: now[0])
    pool.add("a", [], [1, 2, 3])
    now[0] = 30.0
    pool.add("b", [], [4, 5, 6])
    pool.add("a", [], [7, 8, 9, 10, 11, 12])  # a's first generation rolls over to older
    now[0] = 80.0  # a's older generation (at 0) is stale, its newer one (at 30) and b are not
    assert pool.proposal("a", [1, 2], 1) == (0, []) and pool.proposal("a", [7, 8], 1) == (2, [9])
    pool.add("c", [], [1, 2, 3])
    assert pool.tokens("a") == 7 and pool.total_tokens == 7 + 4 + 4
    now[0] = 100.0  # everything but c stale
    assert pool.proposal("b", [4, 5], 1) == (0, [])
    pool.add("c", [], [5, 6])
    assert len(pool) == 1 and pool.total_tokens == pool.tokens("c") == 7


def test_the_token_count_stays_the_sum_over_scopes_through_rollovers_evictions_and_expiry():
    rng, now = random.Random(3), [0.0]
    pool = DraftPool(max_ngram=4, min_ngram=2, lead_in=3, max_tokens=40, max_total_tokens=90, max_scopes=5,
                     max_age=50.0, clock=lambda: now[0])
    for _ in range(3000):
        now[0] += rng.random() * 3
        pool.add(f"s{rng.randrange(8)}", [rng.randrange(9) for _ in range(rng.randrange(6))],
                 [rng.randrange(9) for _ in range(rng.randrange(25))])
        held = sum(pool.tokens(f"s{i}") for i in range(8))
        assert pool.total_tokens == held <= 90 and len(pool) <= 5


def engine_request(engine, prompt, output):
    from fastmode.engine.request import Request
    r = Request("x", prompt, SamplingParams(max_tokens=8), Lane.FAST, lambda d: None, engine.max_len, pool="org\0fast")
    r.output_ids = list(output)
    return r


def test_the_server_scopes_the_pool_by_end_user(tiny):
    state = build_state(tiny, small_engine_config())
    engine = state.backends[MODEL].engine
    with running_server(state) as url:
        client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)

        def ask(user):
            return client.messages.create(model=MODEL, max_tokens=24, speed="fast", metadata={"user_id": user},
                                          messages=[{"role": "user", "content": "the pool test prompt"}])
        first = ask("alice")
        assert engine.stats["pool_drafted"] == 0
        assert ask("bob").content == first.content and engine.stats["pool_drafted"] == 0  # another end user
        assert ask("alice").content == first.content and engine.stats["pool_accepted"] > 0


def test_zero_data_retention_keeps_no_pool(tiny):
    import asyncio

    from fastmode.platform.accounts import Organization
    from fastmode.server.messages import prepare

    state = build_state(tiny, small_engine_config())
    body = {"model": MODEL, "max_tokens": 8, "metadata": {"user_id": "u1"}, "messages": [{"role": "user", "content": "hi"}]}
    for zdr in (False, True):
        org = Organization("org_1", "acme", fast_mode=True, zero_data_retention=zdr, priority_tier=False, limits={})
        prep = asyncio.run(prepare(state, body, "2023-06-01", set(), org))
        assert prep.pool == (None if zdr else f"org_1\0{MODEL}\0u1")
