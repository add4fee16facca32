from fastmode.config import EngineConfig, LaneConfig
from fastmode.engine.block_manager import BlockManager
from fastmode.engine.request import Lane, Request, SamplingParams, Status
from fastmode.engine.scheduler import Scheduler


def make(rid, n_prompt, lane=Lane.STANDARD, max_tokens=8):
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens), lane, lambda d: None, 10_000)


def sched(num_blocks=100, **kw):
    cfg = EngineConfig(block_size=16, prefill_chunk=kw.pop("chunk", 64), **kw)
    return Scheduler(cfg, BlockManager(num_blocks, 16))


def test_fast_requests_are_admitted_before_earlier_standard_ones():
    s = sched(num_blocks=1)  # room for exactly one request of <= 16 tokens
    s.add(make("std", 8, Lane.STANDARD))
    s.add(make("fast", 8, Lane.FAST))
    s.admit()
    assert [r.request_id for r in s.running[Lane.FAST]] == ["fast"]
    assert s.running[Lane.STANDARD] == [] and len(s.waiting[Lane.STANDARD]) == 1


def test_prefill_chunks_end_on_absolute_multiples_of_the_chunk():
    s = sched(chunk=64)
    r = make("a", 150)
    s.add(r)
    sizes = []
    while r.in_prefill:
        (item,) = s.schedule(Lane.STANDARD)
        sizes.append(item.num_tokens)
        r.num_computed_tokens += item.num_tokens
    assert sizes == [64, 64, 22]
    r2 = make("b", 150)
    r2.num_computed_tokens = 40  # e.g. resumed mid-chunk: the next chunk still ends at 64
    s.add(r2)
    plan = {i.request.request_id: i.num_tokens for i in s.schedule(Lane.STANDARD)}
    assert plan["b"] == 24


def test_decode_rows_come_first_and_prefill_respects_the_budget():
    cfg = EngineConfig(block_size=16, prefill_chunk=64, standard=LaneConfig(8, 64, False))
    s = Scheduler(cfg, BlockManager(100, 16))
    dec = make("dec", 10)
    p1, p2 = make("p1", 64), make("p2", 64)
    for r in (dec, p1, p2):
        s.add(r)
    s.admit()
    dec.num_computed_tokens = 10
    dec.output_ids = [1]
    plan = s.schedule(Lane.STANDARD)
    assert [(i.request.request_id, i.num_tokens) for i in plan] == [("dec", 1), ("p1", 64)]


def test_lane_batch_limit_and_finish_frees_blocks():
    cfg = EngineConfig(block_size=16, fast=LaneConfig(2, 256, True))
    s = Scheduler(cfg, BlockManager(100, 16))
    reqs = [make(f"f{i}", 8, Lane.FAST) for i in range(3)]
    for r in reqs:
        s.add(r)
    s.admit()
    assert len(s.running[Lane.FAST]) == 2 and len(s.waiting[Lane.FAST]) == 1
    s.finish(reqs[0], Status.FINISHED_ABORTED)
    assert reqs[0].status is Status.FINISHED_ABORTED and reqs[0].block_ids == []
    s.admit()
    assert [r.request_id for r in s.running[Lane.FAST]] == ["f1", "f2"]
    assert s.blocks.num_free == 100 - 2
