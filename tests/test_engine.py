"""Engine behaviour on the tiny random model: lanes, losslessness, limits, aborts."""
import random

import torch

from fastmode.engine.request import Lane, SamplingParams, Status
from fastmode.engine.scheduler import Scheduled
from fastmode.engine.speculation import PromptLookup


def run(engine, prompts, lane, max_tokens=40, params=None):
    """Run prompts concurrently in one lane; return {index: output ids} and final statuses."""
    outs, status = {}, {}

    def cb(i):
        def on(d):
            outs.setdefault(i, []).extend(d.token_ids)
            if d.status.finished:
                status[i] = d.status
        return on

    for i, p in enumerate(prompts):
        engine.add(f"{lane.value}-{i}-{random.random()}", p, params or SamplingParams(max_tokens=max_tokens), lane, cb(i))
    for _ in range(10_000):
        if len(status) == len(prompts):
            break
        engine.step()
    return [outs.get(i, []) for i in range(len(prompts))], [status[i] for i in range(len(prompts))]


def prompts(n=8, seed=0):
    """Random prompts with repeated spans, so prompt lookup finds drafts that verify."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        span = [rng.randrange(256) for _ in range(rng.randrange(4, 12))]
        body = [rng.randrange(256) for _ in range(rng.randrange(5, 60))]
        out.append(body + span * rng.randrange(2, 6) + body[:7])
    return out


def test_fast_and_standard_give_identical_greedy_tokens(make_engine):
    engine = make_engine()
    ps = prompts(10)
    std, _ = run(engine, ps, Lane.STANDARD)
    fast, _ = run(engine, ps, Lane.FAST)
    assert std == fast
    assert engine.stats["accepted"] > 0, "no draft was ever accepted: the test did not exercise verification"


def test_lanes_agree_when_drafts_are_often_wrong(make_engine, monkeypatch):
    """Corrupt half the drafts so verification rejects at every position in turn."""
    rng = random.Random(42)
    honest = PromptLookup.propose

    def noisy(self, k):
        draft = honest(self, k)
        if not draft:  # invent one, as if from a short match
            draft, self.last_match = [rng.randrange(256) for _ in range(k)], 1
        if draft and rng.random() < 0.5:
            draft[rng.randrange(len(draft))] = rng.randrange(256)
        return draft

    monkeypatch.setattr(PromptLookup, "propose", noisy)
    engine = make_engine()
    ps = prompts(8, seed=9)
    std, _ = run(engine, ps, Lane.STANDARD)
    fast, _ = run(engine, ps, Lane.FAST)
    assert std == fast
    assert 0 < engine.stats["accepted"] < engine.stats["drafted"]


def test_output_does_not_depend_on_batch_company(make_engine):
    engine = make_engine()
    ps = prompts(6, seed=1)
    together, _ = run(engine, ps, Lane.STANDARD)
    alone = [run(engine, [p], Lane.STANDARD)[0][0] for p in ps]
    assert together == alone


def test_long_prompt_prefills_in_chunks_and_matches_across_lanes(make_engine):
    engine = make_engine(prefill_chunk=16)
    p = prompts(1, seed=3)[0] * 3  # > several chunks
    assert len(p) > 48
    std, _ = run(engine, [p], Lane.STANDARD, max_tokens=20)
    fast, _ = run(engine, [p], Lane.FAST, max_tokens=20)
    assert std == fast and len(std[0]) == 20


def test_max_tokens_eos_and_context_window(make_engine, tiny):
    engine = make_engine()
    p = prompts(1, seed=4)[0]
    (out,), (st,) = run(engine, [p], Lane.FAST, max_tokens=5)
    assert len(out) == 5 and st is Status.FINISHED_LENGTH
    # make the first generated token an end-of-sequence token: generation stops before it
    eos_engine = make_engine()
    eos_engine.eos = {out[0]}
    (out2,), (st2,) = run(eos_engine, [p], Lane.STANDARD, max_tokens=5)
    assert out2 == [] and st2 is Status.FINISHED_STOPPED
    small = make_engine()
    small.max_len = len(p) + 3
    (out3,), (st3,) = run(small, [p], Lane.STANDARD, max_tokens=50)
    assert len(out3) == 3 and st3 is Status.FINISHED_CONTEXT


def test_abort_frees_kv_blocks_at_once(make_engine):
    engine = make_engine()
    total = engine.blocks.num_free
    got = []
    engine.add("r1", prompts(1)[0], SamplingParams(max_tokens=500), Lane.FAST, got.append)
    engine.step()
    engine.step()
    assert engine.blocks.num_free < total
    engine.abort("r1")
    engine.step()
    assert engine.blocks.num_free == total
    assert got[-1].status is Status.FINISHED_ABORTED


def test_sampling_lanes_are_seeded_and_in_range(make_engine, tiny):
    engine = make_engine()
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=7)
    p = prompts(1, seed=5)[0]
    a, _ = run(engine, [p], Lane.STANDARD, params=params)
    b, _ = run(engine, [p], Lane.STANDARD, params=params)
    c, _ = run(engine, [p], Lane.FAST, params=params)
    assert a == b  # same seed, same lane: same tokens
    assert len(c[0]) == 30 and all(0 <= t < tiny.arch.vocab_size for t in c[0])


def _verify_vs_sequential(engine, prompt):
    """Logits of 4 positions from one verification pass, and from 4 one-token passes."""
    engine.add("probe", prompt, SamplingParams(max_tokens=50), Lane.STANDARD, lambda d: None)
    engine.step()  # admits and prefills (the prompt fits one chunk) and samples t0
    req = engine.requests["probe"]
    assert not req.in_prefill and len(req.output_ids) == 1
    n, t0 = len(prompt), req.output_ids[0]
    drafts = [5, 17, 99]
    verified = engine.runner.run([Scheduled(req, 1, list(drafts))])[0][:4]
    sequential = []
    for j, tokens in enumerate([[t0], [t0, 5], [t0, 5, 17], [t0, 5, 17, 99]]):
        req.output_ids, req.num_computed_tokens = tokens, n + j
        sequential.append(engine.runner.run([Scheduled(req, 1, [])])[0][0])
    return verified, torch.stack(sequential)


def test_verification_logits_equal_one_token_decoding_bit_for_bit(make_engine):
    p = prompts(1, seed=6)[0][:30]
    verified, sequential = _verify_vs_sequential(make_engine(), p)
    assert torch.equal(verified, sequential)
    plain = make_engine(invariant_numerics=False)
    if 1 not in make_engine().runner.sizes:  # this machine's GEMM differs at 1 row: padding is what saves us
        v2, s2 = _verify_vs_sequential(plain, p)
        assert not torch.equal(v2, s2)


def test_invariant_row_counts_are_really_invariant(make_engine):
    engine = make_engine()
    r = engine.runner
    w = engine.model.blocks[0].mlp.gate_up.weight
    x = torch.randn(64, w.shape[1])
    ref = torch.nn.functional.linear(x, w)
    for rows in range(1, 17):
        m = r.padded(rows)
        assert m >= rows
        assert torch.equal(torch.nn.functional.linear(x[:m], w), ref[:m])


def test_fast_lane_gets_enough_passes_to_hold_its_target_ratio(make_engine):
    engine = make_engine()
    engine.add("f", prompts(1)[0], SamplingParams(max_tokens=50), Lane.FAST, lambda d: None)
    engine.step()
    assert engine.fast_passes() == 1  # standard lane idle: nothing to share with
    engine.add("s", prompts(1)[0], SamplingParams(max_tokens=50), Lane.STANDARD, lambda d: None)
    engine.step()
    engine.tokens_per_pass["f"] = 1.0  # no draft accepted: three passes per standard pass for 2.5x
    assert engine.fast_passes() == 3
    engine.tokens_per_pass["f"] = 3.8  # copy-heavy: speculation alone holds the ratio
    assert engine.fast_passes() == 1
    engine.tokens_per_pass["f"] = 0.1
    assert engine.fast_passes() == engine.config.max_fast_steps_per_standard


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(make_engine):
    import threading

    engine = make_engine()
    real_run = engine.runner.run
    engine.runner.run = lambda plan: (_ for _ in ()).throw(RuntimeError("boom"))
    done = {}
    events = {k: threading.Event() for k in ("a", "b")}

    def cb(key):
        def on(d):
            if d.status.finished:
                done[key] = d.status
                events[key].set()
        return on

    engine.start()
    try:
        engine.add("a", prompts(1)[0], SamplingParams(max_tokens=5), Lane.FAST, cb("a"))
        assert events["a"].wait(30) and done["a"] is Status.FINISHED_ERROR
        engine.runner.run = real_run
        engine.add("b", prompts(1)[0], SamplingParams(max_tokens=5), Lane.FAST, cb("b"))
        assert events["b"].wait(30) and done["b"] is Status.FINISHED_LENGTH
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.shutdown()


def test_each_lanes_queue_limit_counts_requests_not_yet_seen_by_the_engine(make_engine):
    import pytest

    from fastmode.engine.engine import EngineOverloaded

    engine = make_engine(max_waiting=2)
    for i in range(2):
        engine.add(f"q{i}", [1, 2, 3], SamplingParams(max_tokens=2), Lane.STANDARD, lambda d: None)
    with pytest.raises(EngineOverloaded):
        engine.add("q2", [1, 2, 3], SamplingParams(max_tokens=2), Lane.STANDARD, lambda d: None)
    # each lane's queue is bounded alone: a full standard queue leaves the fast lane open
    for i in range(2):
        engine.add(f"f{i}", [1, 2, 3], SamplingParams(max_tokens=2), Lane.FAST, lambda d: None)
    with pytest.raises(EngineOverloaded):
        engine.add("f2", [1, 2, 3], SamplingParams(max_tokens=2), Lane.FAST, lambda d: None)
    engine._drain_inbox()  # taken in, the requests wait in their lanes' queues, still counted there
    with pytest.raises(EngineOverloaded):
        engine.add("q3", [1, 2, 3], SamplingParams(max_tokens=2), Lane.STANDARD, lambda d: None)
    with pytest.raises(EngineOverloaded):
        engine.add("f3", [1, 2, 3], SamplingParams(max_tokens=2), Lane.FAST, lambda d: None)


def test_drafts_are_priced_by_the_line_fitted_to_decode_passes(make_engine):
    engine = make_engine()
    run(engine, prompts(4), Lane.FAST)
    assert engine.runner.cost.known  # decode passes were timed
    times = [engine.runner.step_time(r) for r in range(1, engine.runner.cost.max_rows + 1)]
    assert times == sorted(times) and times[0] > 0


def test_request_tokens_slices_prompt_and_output():
    from fastmode.engine.request import Request
    r = Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=8), Lane.FAST, lambda d: None, 100)
    r.output_ids.extend([5, 6, 7])
    for start in range(8):
        for end in range(start, 9):
            assert r.tokens(start, end) == r.token_ids[start:end]


def test_runner_slot_tables_follow_each_request_and_are_dropped_when_it_ends(make_engine):
    engine = make_engine()
    bs = engine.blocks.block_size
    seen = {}
    real = engine.runner.build

    def build(plan):  # every pass's slots must be where the block manager puts each position
        for item in plan:
            r = item.request
            held = engine.runner.slots_of(r)
            assert held.tolist() == [engine.blocks.slot(r.block_ids, p) for p in range(len(r.block_ids) * bs)]
            seen[r.request_id] = list(r.block_ids)
        return real(plan)

    engine.runner.build = build
    ps = prompts(3, seed=5)
    first, _ = run(engine, ps, Lane.FAST, max_tokens=30)
    assert len(seen) == 3 and not engine.runner._slots  # all finished: nothing kept
    ids, blocks_before = list(seen), dict(seen)
    # the same request ids again, after other requests moved the free blocks around
    engine.add("other", ps[0], SamplingParams(max_tokens=200), Lane.STANDARD, lambda d: None)
    engine.step()
    again = {}
    for rid, p in zip(ids, ps):
        engine.add(rid, p, SamplingParams(max_tokens=30), Lane.FAST, lambda d, rid=rid: again.setdefault(rid, []).extend(d.token_ids))
    for _ in range(500):
        engine.step()
        if all(rid not in engine.requests for rid in ids):
            break
    assert [again[rid] for rid in ids] == first
    assert any(seen[rid] != blocks_before[rid] for rid in ids)  # new blocks, new slot tables
    engine.abort("other")
    engine.step()
    assert not engine.runner._slots


def test_a_pass_beyond_a_requests_blocks_is_refused(make_engine):
    engine = make_engine()
    engine.add("r", prompts(1)[0], SamplingParams(max_tokens=4), Lane.STANDARD, lambda d: None)
    engine.step()
    r = engine.requests["r"]
    too_many = len(r.block_ids) * engine.blocks.block_size - r.num_computed_tokens
    try:
        engine.runner.build([Scheduled(r, 1, [0] * too_many)])
    except ValueError as e:
        assert "cache slots" in str(e)
    else:
        raise AssertionError("a pass past the request's blocks was built")
