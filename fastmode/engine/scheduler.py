"""Decides, each step and per lane, which requests run and how many tokens each; no torch."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fastmode.config import EngineConfig, LaneConfig
from fastmode.engine.block_manager import BlockManager
from fastmode.engine.prefix_cache import PrefixCache
from fastmode.engine.request import Lane, Request, Status


@dataclass
class Scheduled:
    request: Request
    num_tokens: int  # tokens of the request's own sequence computed this step (drafts excluded)
    drafts: list[int]  # draft tokens appended after them (decode only)
    draft_source: str = ""  # where the drafts came from: "lookup", "corpus" or "head"


class Scheduler:
    """Two lanes over one block pool. Fast requests are admitted first; each lane has its own
    running batch. A prefill chunk always ends at a multiple of `prefill_chunk` (or at the
    prompt's end), so a prompt is cut the same way whatever else is running."""

    def __init__(self, config: EngineConfig, blocks: BlockManager, prefix: PrefixCache | None = None) -> None:
        self.config = config
        self.blocks = blocks
        self.prefix = prefix
        self.admitted: list[Request] = []  # admitted since the engine last looked (it reports cache use)
        self.waiting: dict[Lane, deque[Request]] = {Lane.FAST: deque(), Lane.STANDARD: deque()}
        self.running: dict[Lane, list[Request]] = {Lane.FAST: [], Lane.STANDARD: []}

    def lane_config(self, lane: Lane) -> LaneConfig:
        return self.config.fast if lane is Lane.FAST else self.config.standard

    def add(self, request: Request) -> None:
        """Queue behind every request of the same or a higher priority (lower number)."""
        queue = self.waiting[request.lane]
        if not queue or queue[-1].priority <= request.priority:
            queue.append(request)
            return
        at = next(i for i, r in enumerate(queue) if r.priority > request.priority)
        queue.insert(at, request)

    def has_work(self) -> bool:
        return any(self.waiting[l] or self.running[l] for l in Lane)

    def admit(self) -> None:
        for lane in (Lane.FAST, Lane.STANDARD):  # fast first: it takes memory before standard
            queue, running = self.waiting[lane], self.running[lane]
            while queue and len(running) < self.lane_config(lane).max_batch:
                req = queue[0]
                hit = self.prefix.match(req) if req.cache is not None and self.prefix is not None else None
                shared = hit.blocks if hit is not None else []
                fresh = self.blocks.blocks_for(req.token_budget) - len(shared)
                if fresh > self.blocks.num_free:
                    self.blocks.release(shared)  # cached again; retried next step
                    return  # keep arrival order: nothing behind it jumps ahead
                queue.popleft()
                req.block_ids = list(shared) + self.blocks.allocate_blocks(fresh)
                if hit is not None:
                    assert self.prefix is not None
                    req.num_computed_tokens = hit.reused
                    req.cache_result = self.prefix.admitted(req, hit)
                req.status = Status.RUNNING
                running.append(req)
                self.admitted.append(req)

    def schedule(self, lane: Lane) -> list[Scheduled]:
        """Decode rows for every decoding request, then aligned prefill chunks within budget."""
        self.admit()
        budget = self.lane_config(lane).max_tokens_per_step
        chunk = self.config.prefill_chunk
        plan = [Scheduled(r, 1, []) for r in self.running[lane] if not r.in_prefill]
        prefilling = False
        for r in self.running[lane]:
            if not r.in_prefill:
                continue
            end = min(len(r.prompt_ids), (r.num_computed_tokens // chunk + 1) * chunk)
            n = end - r.num_computed_tokens
            if n > budget and prefilling:
                break
            plan.append(Scheduled(r, n, []))
            budget -= n
            prefilling = True
        return plan

    def finish(self, request: Request, status: Status) -> None:
        """Mark finished (if not already) and give its blocks back at once."""
        if not request.status.finished:
            request.status = status
        for lane in Lane:
            if request in self.running[lane]:
                self.running[lane].remove(request)
            if request in self.waiting[lane]:
                self.waiting[lane].remove(request)
        self.blocks.release(request.block_ids)
