"""Prompt caching in the engine on the tiny random model: hits, lanes, TTLs, eviction, pre-warm."""
import random

import pytest

from fastmode.engine.block_manager import BlockManager
from fastmode.engine.prefix_cache import TTL_1H, TTL_5M, Breakpoint, CacheResult, CacheSpec, PrefixCache
from fastmode.engine.request import Lane, SamplingParams, Status


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tiny, clock=None, **overrides):
    from fastmode.engine.engine import Engine
    from tests.conftest import small_engine_config
    return Engine(tiny.model, small_engine_config(**overrides), tiny.tokenizer.eos_ids, clock=clock or Clock())


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


def spec(*positions, ttl=TTL_5M, org="org-a", lookups=()):
    return CacheSpec(org, tuple(Breakpoint(p, ttl) for p in positions), tuple(lookups))


class Run:
    """One request through `engine.step()`: its tokens, final status, cache report and the
    prompt tokens it started with already computed."""

    def __init__(self, engine, ids, lane=Lane.STANDARD, cache=None, max_tokens=12, rid=None):
        self.tokens, self.status, self.cache, self.deltas, self.cache_order = [], None, None, 0, None
        self.engine = engine
        self.rid = rid or f"r{random.random()}"
        engine.add(self.rid, ids, SamplingParams(max_tokens=max_tokens), lane, self.on, cache=cache)
        self.started_at = None

    def on(self, d):  # the engine swallows callback errors: record here, check in finish()
        self.deltas += 1
        if d.cache is not None:
            self.cache = d.cache
            if not d.status.finished:  # the admission report (an aborted request's last delta corrects it)
                self.cache_order = (self.deltas, len(d.token_ids))
                self.started_at = self.engine.requests[self.rid].num_computed_tokens
        self.tokens += d.token_ids
        if d.status.finished:
            self.status = d.status

    def finish(self):
        for _ in range(5000):
            if self.status is not None:
                if self.cache is not None:
                    assert self.cache_order == (1, 0), "the cache report comes first, alone"
                return self
            self.engine.step()
        raise AssertionError("request did not finish")


def test_a_repeat_reads_the_entry_starts_computed_and_gives_the_same_tokens(tiny):
    engine = make(tiny)
    ids = prompt(150)
    plain = Run(engine, ids).finish()
    first = Run(engine, ids, cache=spec(140)).finish()
    second = Run(engine, ids + [], cache=spec(140)).finish()
    assert first.cache == CacheResult(read=0, created_5m=140, created_1h=0)
    assert first.started_at == 0
    assert second.cache == CacheResult(read=140, created_5m=0, created_1h=0)
    assert second.started_at == 128  # the entry's KV up to the last prefill chunk boundary (32)
    assert plain.tokens == first.tokens == second.tokens and len(plain.tokens) == 12
    assert engine.prefix.stats["hits"] == 1


def test_different_continuation_reads_the_shared_prefix_only(tiny):
    engine = make(tiny)
    head = prompt(100)
    Run(engine, head + prompt(30, 1), cache=spec(100)).finish()
    other = Run(engine, head + prompt(30, 2), cache=spec(100, 130)).finish()
    assert other.cache == CacheResult(read=100, created_5m=30)
    changed = head[:50] + [head[50] % 255 + 1] + head[51:]
    miss = Run(engine, changed + prompt(30, 2), cache=spec(100)).finish()
    assert miss.cache == CacheResult(read=0, created_5m=100), "one changed token is a different prefix"


def test_lanes_and_organizations_never_share_entries(tiny):
    engine = make(tiny)
    ids = prompt(120)
    std = Run(engine, ids, Lane.STANDARD, spec(100)).finish()
    fast = Run(engine, ids, Lane.FAST, spec(100)).finish()
    other_org = Run(engine, ids, Lane.STANDARD, spec(100, org="org-b")).finish()
    assert std.cache.read == fast.cache.read == other_org.cache.read == 0
    assert fast.started_at == 0 and other_org.started_at == 0
    again_fast = Run(engine, ids, Lane.FAST, spec(100)).finish()
    assert again_fast.cache.read == 100 and again_fast.started_at == 96
    assert std.tokens == fast.tokens == again_fast.tokens


def test_ttl_expiry_and_refresh_on_an_injected_clock(tiny):
    clock = Clock()
    engine = make(tiny, clock)
    ids = prompt(80)
    Run(engine, ids, cache=spec(70)).finish()
    clock.now += TTL_5M - 1
    assert Run(engine, ids, cache=spec(70)).finish().cache.read == 70  # and refreshed for 5 more minutes
    clock.now += TTL_5M - 1
    assert Run(engine, ids, cache=spec(70)).finish().cache.read == 70
    clock.now += TTL_5M + 1
    expired = Run(engine, ids, cache=spec(70)).finish()
    assert expired.cache == CacheResult(read=0, created_5m=70) and expired.started_at == 0
    # a 1-hour entry outlives a 5-minute one
    long_ids = prompt(80, 5)
    Run(engine, long_ids, cache=spec(70, ttl=TTL_1H)).finish()
    clock.now += 30 * 60
    assert Run(engine, long_ids, cache=spec(70)).finish().cache.read == 70


def test_1h_then_5m_breakpoints_split_creation_by_ttl(tiny):
    engine = make(tiny)
    ids = prompt(200)
    bps = CacheSpec("o", (Breakpoint(64, TTL_1H), Breakpoint(100, TTL_1H), Breakpoint(180, TTL_5M)))
    first = Run(engine, ids, cache=bps).finish()
    assert first.cache == CacheResult(read=0, created_5m=80, created_1h=100)
    # the 1h prefix alone is still there when the 5m tail changed
    changed = ids[:150] + prompt(50, 3)
    second = Run(engine, changed, cache=bps).finish()
    assert second.cache == CacheResult(read=100, created_5m=80, created_1h=0)


def test_lookback_reads_an_earlier_turns_entry(tiny):
    """Automatic caching moves its breakpoint forward each turn; the previous turn's entry is
    found at a lookup position."""
    engine = make(tiny)
    turn1 = prompt(90)
    Run(engine, turn1, cache=spec(90)).finish()
    turn2 = turn1 + prompt(60, 8)
    hit = Run(engine, turn2, cache=spec(150, lookups=(40, 90))).finish()
    assert hit.cache == CacheResult(read=90, created_5m=60)
    assert Run(engine, turn2, cache=spec(150)).finish().cache.read == 150


def test_below_any_breakpoint_nothing_is_read(tiny):
    engine = make(tiny)
    ids = prompt(100)
    Run(engine, ids, cache=spec(90)).finish()
    # an entry is only read at or before the request's own last breakpoint
    assert Run(engine, ids, cache=spec(50)).finish().cache.read == 0
    assert Run(engine, ids, cache=CacheSpec("org-a", (), (90,))).finish().cache == CacheResult()


def test_pre_warm_computes_the_prefix_and_generates_nothing(tiny):
    engine = make(tiny)
    ids = prompt(140)
    warm = Run(engine, ids, cache=spec(130), max_tokens=0).finish()
    assert warm.tokens == [] and warm.status is Status.FINISHED_LENGTH
    assert warm.cache == CacheResult(created_5m=130)
    hit = Run(engine, ids, cache=spec(130)).finish()
    assert hit.cache.read == 130 and hit.started_at == 128
    assert hit.tokens == Run(engine, ids).finish().tokens
    # without breakpoints max_tokens 0 does nothing at all
    nothing = Run(engine, prompt(50, 4), max_tokens=0).finish()
    assert nothing.tokens == [] and nothing.cache is None


def test_cached_blocks_yield_to_new_requests_and_the_lost_entry_misses(tiny):
    # 32 blocks of 16 tokens; each request below needs 10 (150 prompt + 10 output)
    engine = make(tiny, kv_cache_tokens=512)
    prompts = [prompt(150, s) for s in range(5)]
    for p in prompts:
        r = Run(engine, p, cache=spec(144), max_tokens=10).finish()
        assert r.status is Status.FINISHED_LENGTH, "cached blocks must never make a request fail or wait"
    assert engine.blocks.num_free == 32  # everything is reusable, cached or free
    assert engine.blocks.num_cached > 0
    assert Run(engine, prompts[-1], cache=spec(144)).finish().cache.read == 144  # the newest survived
    assert Run(engine, prompts[0], cache=spec(144)).finish().cache.read == 0  # the oldest was evicted


def test_an_entry_whose_blocks_were_evicted_is_not_read_even_below_one_chunk(tiny):
    # prefill_chunk 128: a 100-token entry reuses no KV (below one chunk), yet it is only
    # billed as read while all of its blocks are still cached
    engine = make(tiny, kv_cache_tokens=512, prefill_chunk=128)
    ids = prompt(110)
    Run(engine, ids, cache=spec(100)).finish()
    assert Run(engine, ids, cache=spec(100)).finish().cache.read == 100
    Run(engine, prompt(100, 9), max_tokens=engine.blocks.num_free * 16 - 100).finish()  # evicts every block
    assert engine.blocks.num_cached == 0
    again = Run(engine, ids, cache=spec(100)).finish()
    assert again.cache == CacheResult(read=0, created_5m=100)


def test_a_read_keeps_the_entrys_ttl_a_longer_one_is_not_free(tiny):
    clock = Clock()
    engine = make(tiny, clock)
    ids = prompt(80)
    Run(engine, ids, cache=spec(70)).finish()  # a 5-minute entry
    assert Run(engine, ids, cache=spec(70, ttl=TTL_1H)).finish().cache == CacheResult(read=70)
    clock.now += TTL_5M + 1
    assert Run(engine, ids, cache=spec(70, ttl=TTL_1H)).finish().cache == CacheResult(created_1h=70)
    clock.now += 30 * 60
    assert Run(engine, ids, cache=spec(70)).finish().cache.read == 70


def test_entries_stay_bounded_by_the_pool(tiny):
    engine = make(tiny, kv_cache_tokens=512)  # 32 blocks: at most 128 entries
    for s in range(60):  # 180 entries written, over blocks that are evicted again and again
        Run(engine, prompt(48, 100 + s), cache=spec(16, 32, 48), max_tokens=1).finish()
        assert len(engine.prefix.entries) <= engine.prefix.max_entries
    engine.prefix._sweep(engine.prefix.clock())  # what is left refers to blocks still cached
    assert 0 < len(engine.prefix.entries) <= 3 * engine.blocks.num_cached


def test_blocks_held_by_a_running_request_are_not_evicted(tiny):
    engine = make(tiny, kv_cache_tokens=512)
    ids = prompt(150)
    Run(engine, ids, cache=spec(144)).finish()
    holder = Run(engine, ids, cache=spec(144), max_tokens=50)
    for _ in range(3):
        engine.step()
    assert holder.cache.read == 144
    # a big request takes every block not held by `holder`; holder's shared prefix stays intact
    big = Run(engine, prompt(100, 9), max_tokens=engine.blocks.num_free * 16 - 100)
    holder.finish(), big.finish()
    assert holder.status is Status.FINISHED_LENGTH and big.status is Status.FINISHED_LENGTH
    assert holder.tokens == Run(engine, ids, max_tokens=50).finish().tokens


def test_block_manager_refcounts_and_lru_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(4)  # blocks 0 and 1
    bm.register(a[0], b"h0")
    bm.register(a[1], b"h1")
    bm.register(a[1], b"dup")  # a block keeps its first hash
    b = bm.allocate(2)  # block 2
    bm.register(b[0], b"h0")  # same tokens as block 0: block 0 stays the cached copy
    assert b[0] not in bm.hash_of and bm.by_hash == {b"h0": a[0], b"h1": a[1]}
    assert bm.lookup([b"h0", b"h1", b"h2"]) == a
    held = bm.lookup([b"h0"])
    bm.acquire(held)
    bm.release(list(a))
    assert list(bm.lru) == [a[1]] and bm.num_free == 2  # block 0 is still held, block 1 cached
    bm.release(list(held))
    bm.release(b)
    assert list(bm.lru) == [a[1], a[0]] and list(bm.free) == [3, 2] and bm.num_cached == 2
    # free blocks go first, then the least recently released cached one
    assert bm.allocate_blocks(3) == [3, 2, a[1]]
    assert bm.by_hash == {b"h0": a[0]} and bm.lookup([b"h0", b"h1"]) == [a[0]]
    with pytest.raises(MemoryError):
        bm.allocate_blocks(2)


def test_prefill_chunk_must_be_a_multiple_of_block_size():
    with pytest.raises(ValueError, match="multiple of block_size"):
        PrefixCache(BlockManager(8, 16), align=24)


def test_a_request_aborted_while_computing_its_prompt_reports_the_writes_that_happened(tiny):
    """Its admission planned two entries; aborted between them, its last delta says only the
    first was written (the rest of the prompt is plain input), and a repeat reads that one."""
    engine = make(tiny)
    ids = prompt(300, seed=7)
    run = Run(engine, ids, cache=spec(96, 250))
    engine.step()
    while engine.requests[run.rid].num_computed_tokens < 96:
        engine.step()
    assert engine.requests[run.rid].num_computed_tokens < 250
    assert run.cache == CacheResult(read=0, created_5m=250, created_1h=0)  # the plan, at admission
    engine.abort(run.rid)
    run.finish()
    assert run.status is Status.FINISHED_ABORTED
    assert run.cache == CacheResult(read=0, created_5m=96, created_1h=0)
    again = Run(engine, ids, cache=spec(96, 250)).finish()
    assert again.cache == CacheResult(read=96, created_5m=154, created_1h=0)
    early = Run(engine, prompt(300, seed=8), cache=spec(96, 250))
    while early.cache is None:
        engine.step()
    engine.abort(early.rid)
    early.finish()  # aborted before its first entry: nothing written
    assert early.cache == CacheResult(read=0, created_5m=0, created_1h=0)
    done = Run(engine, prompt(300, seed=9), cache=spec(96, 250)).finish()
    assert done.cache == CacheResult(read=0, created_5m=250, created_1h=0)  # finished: the plan held


def test_usage_waits_for_what_a_request_left_while_queued_wrote(tiny):
    """The client leaves while its request is still queued, but the engine's step under way
    admits it and writes its first entry before it sees the abort: the usage the server
    bills (outcome.cache once settled) holds that write."""
    import asyncio
    import threading

    from fastmode.server.generation import Generation

    engine = make(tiny)
    ids = prompt(100, seed=3)

    async def main():
        gen = Generation(engine, tiny.tokenizer, ids, SamplingParams(max_tokens=8), Lane.STANDARD, [],
                         cache=spec(32, 96))
        gen.start()
        engine._drain_inbox()  # engine thread: a step begins and takes the request in
        gen.abort()  # the client left: no admission report has come yet

        def rest_of_the_step():  # the same step admits it and computes its first chunk; the next, the abort
            engine._step_lane(Lane.STANDARD)
            engine._drain_inbox()
        thread = threading.Thread(target=rest_of_the_step)
        thread.start()
        await gen.settled()
        thread.join()
        return gen.outcome.cache
    assert asyncio.run(main()) == CacheResult(read=0, created_5m=32, created_1h=0)
    assert len(engine.prefix.entries) == 1
