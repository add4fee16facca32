"""Prompt caching: cache entries (a prompt prefix ending at a `cache_control` breakpoint, with a
TTL) over KV blocks the block manager shares by reference; plain Python, no torch.

Two levels:
- blocks: every full block of a cacheable prefix is registered under a hash chaining its tokens
  with all tokens before it, seeded with the namespace (organization) and the lane, so a fast
  request never finds a block a standard one wrote, nor one of another organization.
- entries: what the API bills. An entry exists for each breakpoint position whose prefix was
  computed, until its TTL runs out (each hit refreshes it). A request reads the longest live
  entry among its lookup positions, if the entry's blocks have not been evicted meanwhile.

A hit reuses the entry's KV only up to a multiple of `align` (the prefill chunk): the rest of
the prompt is then cut into exactly the chunks an uncached run uses, so a hit computes
bit-identical logits. Usage still reports the whole entry as read, as the API defines it.
"""
from __future__ import annotations

import hashlib
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from fastmode.engine.block_manager import BlockManager

if TYPE_CHECKING:
    from fastmode.engine.request import Request

TTL_5M, TTL_1H = 300.0, 3600.0
SWEEP_EVERY_S = 30.0


@dataclass(frozen=True)
class Breakpoint:
    position: int  # prompt tokens [0, position) are the prefix this breakpoint caches
    ttl: float  # seconds: TTL_5M or TTL_1H


@dataclass(frozen=True)
class CacheSpec:
    """A request's caching instructions, from its cache_control breakpoints."""

    namespace: str  # who may share entries (the organization); the engine adds the lane
    breakpoints: tuple[Breakpoint, ...]  # where entries are written: ascending, each at least the model's minimum
    lookups: tuple[int, ...] = ()  # positions where an earlier entry may be read (breakpoints are always looked up)


@dataclass(frozen=True)
class CacheResult:
    """What the API reports: prompt tokens read from an entry, and written to new ones by TTL."""

    read: int = 0
    created_5m: int = 0
    created_1h: int = 0

    @property
    def created(self) -> int:
        return self.created_5m + self.created_1h


@dataclass
class Entry:
    ttl: float
    expires_at: float
    last_block: bytes  # hash of its last full block: once that is evicted the entry is gone


@dataclass
class Hit:
    blocks: list[int]  # held (acquired) blocks covering [0, reused)
    reused: int  # tokens whose KV the request starts with
    read: int  # the entry's length, as billed
    key: bytes | None  # the entry read, if any


@dataclass
class _Tracked:
    """Per admitted request: its chained block hashes and what it still has to register."""

    seed: bytes
    chain: list[bytes]  # hash of each full prompt block up to the last breakpoint
    end: int  # last breakpoint: blocks beyond it are not registered
    registered: int = 0  # leading blocks registered (or found) so far
    pending: list[Breakpoint] = field(default_factory=list)  # entries to write once computed
    read: int = 0  # the prompt tokens read from an entry at admission


def _billed(breakpoints: list[Breakpoint], read: int) -> CacheResult:
    """The API's usage split for a prompt that read `read` tokens from an entry and wrote
    entries at `breakpoints`: each token written at the longest TTL of an entry holding it."""
    last_1h = max((b.position for b in breakpoints if b.ttl >= TTL_1H), default=0)
    last_5m = max((b.position for b in breakpoints if b.ttl < TTL_1H), default=0)
    return CacheResult(read, max(0, last_5m - max(read, last_1h)), max(0, last_1h - read))


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


def _tokens(ids: list[int]) -> bytes:
    return array("q", ids).tobytes()


class PrefixCache:
    def __init__(self, blocks: BlockManager, align: int, clock: Callable[[], float] = time.monotonic) -> None:
        if align % blocks.block_size:
            raise ValueError(f"prefill_chunk ({align}) must be a multiple of block_size ({blocks.block_size})")
        self.blocks, self.align, self.clock = blocks, align, clock
        self.entries: dict[bytes, Entry] = {}  # in write order
        # every live entry holds at least one block of its own or shares a prefix: bound them by
        # the pool's size (times the 4 breakpoints a request may have)
        self.max_entries = 4 * blocks.num_blocks
        self._tracked: dict[str, _Tracked] = {}
        self._next_sweep = clock() + SWEEP_EVERY_S
        self.stats = {"hits": 0, "misses": 0, "tokens_reused": 0}

    # ---- hashing ---------------------------------------------------------------------------
    def _track(self, req: Request) -> _Tracked:
        t = self._tracked.get(req.request_id)
        if t is None:
            spec, bs = req.cache, self.blocks.block_size
            assert spec is not None
            end = max((b.position for b in spec.breakpoints), default=0)
            seed = _digest(spec.namespace.encode(), b"\0", req.lane.value.encode())
            chain, prev = [], seed
            for i in range(end // bs):
                prev = _digest(prev, _tokens(req.prompt_ids[i * bs:(i + 1) * bs]))
                chain.append(prev)
            t = self._tracked[req.request_id] = _Tracked(seed, chain, end)
        return t

    def _key(self, t: _Tracked, ids: list[int], position: int) -> bytes:
        """An entry's key: the chained hash of the prefix's full blocks, its tail tokens, its length."""
        n = position // self.blocks.block_size
        head = t.chain[n - 1] if n else t.seed
        return _digest(head, _tokens(ids[n * self.blocks.block_size:position]), position.to_bytes(8, "little"))

    # ---- admission (engine thread) ---------------------------------------------------------
    def match(self, req: Request) -> Hit:
        """The longest live entry this request may read; its blocks are acquired (give them
        back with `BlockManager.release` if the request is not admitted after all)."""
        t = self._track(req)
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        spec = req.cache
        assert spec is not None
        limit = min(t.end, len(req.prompt_ids))
        candidates = {p for p in spec.lookups if 0 < p <= limit} | {b.position for b in spec.breakpoints if b.position <= limit}
        for p in sorted(candidates, reverse=True):
            key = self._key(t, req.prompt_ids, p)
            entry = self.entries.get(key)
            if entry is None:
                continue
            if entry.expires_at <= now:
                del self.entries[key]
                continue
            full = p // self.blocks.block_size
            found = self.blocks.lookup(t.chain[:full])
            if full == 0 or len(found) < full:  # some of its KV was evicted: the entry is gone
                del self.entries[key]
                continue
            reused = min(p, len(req.prompt_ids) - 1) // self.align * self.align
            found = found[:reused // self.blocks.block_size]
            self.blocks.acquire(found)
            return Hit(found, reused, p, key)
        return Hit([], 0, 0, None)

    def admitted(self, req: Request, hit: Hit) -> CacheResult:
        """Account a request admitted with `hit`: refresh the entry read, plan the entries
        to write, and return the usage split the API reports."""
        t = self._track(req)
        spec = req.cache
        assert spec is not None
        now = self.clock()
        if hit.key is not None:
            entry = self.entries[hit.key]
            entry.expires_at = now + entry.ttl  # a hit refreshes the entry's own TTL at no cost
            self.stats["hits"] += 1
            self.stats["tokens_reused"] += hit.reused
        else:
            self.stats["misses"] += 1
        t.registered, t.read = len(hit.blocks), hit.read
        # entries to write: past the one read (which keeps its TTL: a longer one is not free)
        t.pending = [b for b in spec.breakpoints if hit.read < b.position <= len(req.prompt_ids)]
        return _billed(spec.breakpoints, hit.read)

    def settled(self, req: Request) -> CacheResult | None:
        """For a request ending before its prompt reached every entry it was to write (aborted
        while computing it): what it read and the writes that did happen, the rest being plain
        input; None when every planned entry was written (the admission's CacheResult holds)."""
        t = self._tracked.get(req.request_id)
        if t is None or not t.pending or req.cache is None:
            return None
        unwritten = {b.position for b in t.pending}
        return _billed([b for b in req.cache.breakpoints if b.position not in unwritten], t.read)

    # ---- as the request computes (engine thread) ------------------------------------------
    def computed(self, req: Request) -> None:
        """Register the request's newly computed prefix blocks and write the entries whose
        prefix is now complete."""
        t = self._tracked.get(req.request_id)
        if t is None:
            return
        full = min(req.num_computed_tokens, t.end) // self.blocks.block_size
        for i in range(t.registered, full):
            self.blocks.register(req.block_ids[i], t.chain[i])
        t.registered = max(t.registered, full)
        now = self.clock()
        while t.pending and t.pending[0].position <= req.num_computed_tokens:
            b = t.pending.pop(0)
            if b.position < self.blocks.block_size:  # no full block to keep: nothing to cache
                continue
            key = self._key(t, req.prompt_ids, b.position)
            old = self.entries.pop(key, None)  # re-inserted last: the dict stays in write order
            ttl = max(b.ttl, old.ttl) if old is not None and old.expires_at > now else b.ttl
            self.entries[key] = Entry(ttl, now + ttl, t.chain[b.position // self.blocks.block_size - 1])
        if len(self.entries) > self.max_entries:
            self._sweep(now)

    def forget(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)

    def _sweep(self, now: float) -> None:
        """Drop expired entries and those whose last block was evicted; past `max_entries`,
        the oldest written go too. O(entries), and entries are at most `max_entries`."""
        for key in [k for k, e in self.entries.items()
                    if e.expires_at <= now or e.last_block not in self.blocks.by_hash]:
            del self.entries[key]
        for key in list(self.entries)[:max(0, len(self.entries) - self.max_entries)]:
            del self.entries[key]
        self._next_sweep = now + SWEEP_EVERY_S
