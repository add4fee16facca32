"""The engine loop: admit, schedule a lane, run it, verify drafts, emit token deltas."""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Callable

import torch

from fastmode.config import EngineConfig
from fastmode.engine.block_manager import BlockManager
from fastmode.engine.corpus import SAMPLED, DraftCorpus
from fastmode.engine.corpus import draft_policy as corpus_draft_policy
from fastmode.engine.head_drafter import HeadDrafter
from fastmode.engine.pool import POOL_PRIOR, DraftPool
from fastmode.engine.prefix_cache import CacheSpec, PrefixCache
from fastmode.engine.request import Lane, Request, SamplingParams, Status, TokenDelta
from fastmode.engine.runner import Runner, ThreadChooser, max_threads
from fastmode.engine.sampler import greedy_tokens, probabilities, verify
from fastmode.engine.scheduler import Scheduled, Scheduler
from fastmode.engine.speculation import DraftLengthPolicy, PromptLookup, best_proposal
from fastmode.model.draft_head import DraftHead
from fastmode.model.kv_cache import KVCache
from fastmode.model.llama import Llama

log = logging.getLogger("fastmode.engine")


class EngineOverloaded(RuntimeError):
    """Too many requests are queued; the caller should answer 529 and the client retry."""


class RequestTooLarge(ValueError):
    """The request's prompt + max_tokens can never fit the KV cache."""


class Engine:
    """One model, one KV cache, two lanes. `add` and `abort` are thread-safe; `step` runs in
    the engine thread (started by `start`) or directly in tests."""

    def __init__(self, model: Llama, config: EngineConfig, eos_ids: list[int],
                 clock: Callable[[], float] = time.monotonic, draft_head: DraftHead | None = None,
                 draft_corpus: DraftCorpus | None = None) -> None:
        """`clock` times prompt-cache TTLs (tests inject one). `draft_head` and `draft_corpus`:
        the model's trained draft head and its corpus of answers, which speculating lanes draft
        from too (unless `config.draft_head` / `config.draft_corpus` is off)."""
        torch.set_num_threads(config.num_threads if config.num_threads > 0 else max_threads())
        self.config = config
        self.model = model
        self.eos = set(eos_ids)
        self.max_len = model.arch.max_position
        num_blocks = config.kv_cache_tokens // config.block_size
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
        model.place(self.device, dtype)
        self.cache = KVCache(model.arch, num_blocks, config.block_size, self.device, model.kv_dtype)
        # A lane's pass: its prefill budget (or one aligned chunk, if larger), plus decode rows.
        max_rows = max(max(lane.max_tokens_per_step, config.prefill_chunk)
                       + lane.max_batch * (1 + (config.max_draft if lane.speculate else 0))
                       for lane in (config.fast, config.standard))
        # The native kernels give the same results with any thread count: let measurements pick it.
        auto = config.num_threads == 0 and model.native and max_threads() > 1
        self.runner = Runner(model, self.cache, self.blocks, config.invariant_numerics, max_rows,
                             ThreadChooser(list(range(max_threads(), 0, -1))) if auto else None)
        self.prefix = PrefixCache(self.blocks, config.prefill_chunk, clock)
        self.scheduler = Scheduler(config, self.blocks, self.prefix)
        self.policy = DraftLengthPolicy(config.max_draft)  # prompt lookup's
        self._corpus = draft_corpus
        self.corpus: DraftCorpus | None = None
        self.use_draft_corpus(config.draft_corpus)
        self.corpus_policy = corpus_draft_policy(config.max_draft)  # the corpus's: rates of its own
        self.pool = DraftPool(clock=clock) if config.draft_pool else None
        self.pool_policy = DraftLengthPolicy(config.max_draft, POOL_PRIOR)  # the pool's, per match length
        self.lookups: dict[str, PromptLookup] = {}
        # request -> this step's proposals: (its policy and match length, or None for the head's; tokens)
        self.proposals: dict[str, list[tuple[tuple[DraftLengthPolicy, int] | None, list[int]]]] = {}
        self._drafter = HeadDrafter(draft_head, config.max_draft) if draft_head is not None else None
        self.drafter: HeadDrafter | None = None  # the head's drafter when in use (see use_draft_head)
        self.use_draft_head(config.draft_head)
        self.sink: tuple[tuple[int, ...], Callable[[str, torch.Tensor], None]] | None = None  # see tap_features
        self.generators: dict[str, torch.Generator] = {}
        self.requests: dict[str, Request] = {}
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inbox_adds = {lane: 0 for lane in Lane}  # per lane: requests added but not yet taken from the inbox
        self.stats = {"steps": 0, "drafted": 0, "accepted": 0, "head_drafted": 0, "head_accepted": 0,
                      "corpus_drafted": 0, "corpus_accepted": 0, "pool_drafted": 0, "pool_accepted": 0}
        self.tokens_per_pass: dict[str, float] = {}  # fast requests: running average of tokens a pass

    # ---- thread-safe API -------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, lane: Lane,
            on_delta: Callable[[TokenDelta], None], priority: int = 0, cache: CacheSpec | None = None,
            pool: str | None = None, max_len: int | None = None) -> None:
        """Queue a request. With `cache`, its admission is reported by a delta carrying a
        CacheResult before any token; `max_tokens` 0 with breakpoints pre-warms the cache. With
        `pool`, a speculating lane drafts from the answers earlier requests of that scope (and
        lane) were given, and the request's answer joins them (see engine/pool.py). `max_len`:
        a context window smaller than the model's (prompt + output stop there)."""
        window = self.max_len if max_len is None else min(max_len, self.max_len)
        req = Request(request_id, list(prompt_ids), params, lane, on_delta, window, priority=priority,
                      cache=cache, pool=None if pool is None or not self.scheduler.lane_config(lane).speculate
                      else f"{pool}\0{lane.value}")  # only a lane that drafts keeps a pool
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if req.token_budget > capacity:
            raise RequestTooLarge(f"prompt + max_tokens = {req.token_budget} tokens exceed the KV cache of "
                                  f"{capacity} tokens; lower max_tokens or start the server with a larger "
                                  f"--kv-cache-tokens")
        with self._lock:  # each lane's queue is bounded alone: a standard backlog does not refuse fast requests
            queued = len(self.scheduler.waiting[lane]) + self._inbox_adds[lane]
            if queued >= self.config.max_waiting:
                raise EngineOverloaded(f"{queued} {lane.value} requests are already queued")
            self._inbox_adds[lane] += 1
        self._inbox.put(("add", req))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def use_draft_corpus(self, on: bool) -> None:
        """From the next pass on, draft from the model's corpus (if it has one) or not; its
        index is built on a thread of its own, and drafts come from it once it is ready."""
        self.corpus = self._corpus if on else None
        if self.corpus is not None:
            self.corpus.index(background=True)

    def use_draft_head(self, on: bool) -> None:
        """From the next pass on, draft with the model's head (if it has one) or not (no head,
        no taps). Call between `step`s."""
        if self._drafter is not None:
            self._drafter.features.clear()  # a request's start is only valid while every pass taps
            if on and self.model.native and not self._drafter.head.native:
                self._drafter.head.use_native()  # its Q8_0 copies, made once, when first used
        self.drafter = self._drafter if on else None

    @property
    def head_taps(self) -> tuple[int, ...]:
        return self.drafter.taps if self.drafter is not None else ()

    def tap_features(self, taps: tuple[int, ...], sink: Callable[[str, torch.Tensor], None]) -> None:
        """From now on every pass also hands, per request, the residual stream after blocks
        `taps` at its logit rows to sink(request_id, [rows, len(taps), hidden]): a draft head's
        training data. Call before `start` (or between `step`s)."""
        if self.drafter is not None and taps != self.head_taps:
            raise ValueError(f"taps {taps} differ from the draft head's {self.head_taps}")
        self.sink = (taps, sink)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fastmode-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)
        self._drain_inbox()
        self.pool = None  # the engine thread may not have stopped: the pool is its alone
        for req in list(self.requests.values()):
            self._finish(req, Status.FINISHED_ABORTED, [])

    # ---- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.step()
            except Exception:  # fail the requests in flight, keep serving new ones
                log.exception("engine step failed; failing the requests in flight")
                for req in list(self.requests.values()):
                    if req.status is Status.RUNNING:
                        self._finish(req, Status.FINISHED_ERROR, [])

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._inbox_adds[item.lane] -= 1  # type: ignore[union-attr]
                self._admit_new(item)  # type: ignore[arg-type]
            elif (req := self.requests.get(item)) is not None:  # type: ignore[arg-type]
                self._finish(req, Status.FINISHED_ABORTED, [])

    def _admit_new(self, req: Request) -> None:
        prewarm = req.params.max_tokens == 0 and req.cache is not None and bool(req.cache.breakpoints)
        if prewarm:  # compute the prompt up to its last breakpoint, generate nothing
            assert req.cache is not None
            del req.prompt_ids[req.cache.breakpoints[-1].position:]
        if len(req.prompt_ids) >= req.max_len or (req.params.max_tokens <= 0 and not prewarm) or not req.prompt_ids:
            _emit(req, TokenDelta(req.request_id, [], Status.FINISHED_LENGTH))
            return
        self.requests[req.request_id] = req
        if req.lane is Lane.FAST or self.config.standard.speculate:
            lookup = PromptLookup()
            lookup.extend(req.prompt_ids)
            self.lookups[req.request_id] = lookup
        if not req.params.greedy:
            g = torch.Generator()
            g.manual_seed(req.params.seed if req.params.seed is not None else int(torch.randint(2**62, ()).item()))
            self.generators[req.request_id] = g
        self.scheduler.add(req)

    def fast_passes(self) -> int:
        """Fast passes per standard pass: a standard stream gains one token a round and a fast
        request its tokens-per-pass each pass, so the slowest fast request needs this many
        passes to hold the target ratio."""
        fast = self.scheduler.running[Lane.FAST]
        if not fast or not (self.scheduler.running[Lane.STANDARD] or self.scheduler.waiting[Lane.STANDARD]):
            return 1
        slowest = min(self.tokens_per_pass.get(r.request_id, 1.0) for r in fast)
        need = math.ceil(self.config.fast_share_target / max(slowest, 0.25) - 1e-9)
        return max(1, min(self.config.max_fast_steps_per_standard, need))

    def step(self) -> None:
        """One round: the fast lane (as many passes as `fast_passes`), then the standard lane."""
        self._drain_inbox()
        for _ in range(self.fast_passes()):
            if not self._step_lane(Lane.FAST):
                break
        self._step_lane(Lane.STANDARD)
        self.stats["steps"] += 1

    def _step_lane(self, lane: Lane) -> bool:
        plan = self.scheduler.schedule(lane)
        for req in self.scheduler.admitted:  # report what the prompt cache gave and will take
            if req.cache is not None and req.cache_result is not None:
                _emit(req, TokenDelta(req.request_id, [], Status.RUNNING, cache=req.cache_result))
        self.scheduler.admitted.clear()
        if not plan:
            return False
        speculate = self.scheduler.lane_config(lane).speculate
        if speculate:
            self._propose(plan)
        taps = self.sink[0] if self.sink is not None else self.head_taps if speculate else ()
        logits, ranges, features = self.runner.run(plan, taps)
        greedy = self.runner.greedy
        for item, (first, count) in zip(plan, ranges):
            if self.sink is not None and features is not None and count:
                self.sink[1](item.request.request_id, features[first:first + count])
            try:
                self._update(item, logits[first:first + count],
                             None if features is None or self.drafter is None else features[first:first + count],
                             None if greedy is None else greedy[first:first + count])
            except Exception:  # e.g. a sampling error: only this request fails
                log.exception("request %s failed", item.request.request_id)
                self._finish(item.request, Status.FINISHED_ERROR, [])
        return True

    def _propose(self, plan: list[Scheduled]) -> None:
        """Drafts for each decoding request: the proposal of prompt lookup or of the draft corpus
        that, at the length its policy prices best, promises the most tokens per second of pass,
        or the draft head's tokens where those promise more (HeadDrafter)."""
        rows = sum(item.num_tokens for item in plan)
        pool = self.pool  # once: shutdown may drop it from another thread
        # items the head drafts for, with the accepted tokens their other drafts are expected to yield
        for_head: list[tuple[Scheduled, float]] = []
        for item in plan:
            r = item.request
            if r.in_prefill:
                continue
            rid = r.request_id
            room = r.token_budget - r.num_tokens - 1  # drafts + the verifier's token fit the budget
            lookup = self.lookups[rid]
            looked = lookup.propose(self.config.max_draft)
            sources, proposals = ["lookup"], [(self.policy, lookup.last_match, looked)]
            if self.corpus is not None and self.corpus.indexed:
                kind, found = self.corpus.proposal(lookup.ids, self.config.max_draft, r.params.greedy)
                sources.append("corpus")
                proposals.append((self.corpus_policy, kind, found))
            if pool is not None and r.pool is not None:
                match, found = pool.proposal(r.pool, lookup.ids, self.config.max_draft)
                sources.append("pool")
                proposals.append((self.pool_policy, match if r.params.greedy or not match else match + SAMPLED, found))
            best, best_k, expected = best_proposal(proposals, rid, rows, self.runner.step_time, room)
            item.drafts, item.draft_source = [], ""
            if best >= 0:
                item.drafts, item.draft_source = proposals[best][2][:best_k], sources[best]
            self.proposals[rid] = [((policy, match), tokens) for policy, match, tokens in proposals if match]
            rows += best_k
            if self.drafter is not None and self.drafter.wants(rid, expected, rows, self.runner.step_time):
                for_head.append((item, expected))
        if for_head:
            assert self.drafter is not None
            for (item, _), drafts in zip(for_head, self.drafter.draft(for_head, rows, self.runner.step_time)):
                if drafts:
                    item.drafts, item.draft_source = drafts, "head"
                    self.proposals[item.request.request_id].append((None, drafts))

    def _update(self, item: Scheduled, logits: torch.Tensor, features: torch.Tensor | None = None,
                greedy: list[int] | None = None) -> None:
        """Take a pass's result for one plan item: `logits` its rows, `features` their tapped
        states (for the draft head), `greedy` their argmax where the pass computed it."""
        r = item.request
        if r.status.finished:
            return
        r.num_computed_tokens += item.num_tokens
        if r.cache is not None:
            self.prefix.computed(r)
        if logits.shape[0] == 0:  # a prefill chunk that does not reach the prompt's end
            return
        if r.params.max_tokens == 0:  # a pre-warm: its prompt is cached, nothing to generate
            self._finish(r, Status.FINISHED_LENGTH, [])
            return
        gen = self.generators.get(r.request_id)
        accepted = 0
        if item.drafts:
            new = verify(logits, item.drafts, r.params, gen, greedy if r.params.greedy else None)
            accepted = len(new) - 1
            self.stats["drafted"] += len(item.drafts)
            self.stats["accepted"] += accepted
            r.num_computed_tokens += accepted
        elif r.params.greedy:
            new = greedy[-1:] if greedy else greedy_tokens(logits[-1:])
        else:
            new = [int(torch.multinomial(probabilities(logits[-1:], r.params)[0], 1, generator=gen))]
        if features is not None and self.drafter is not None:  # the head starts at the last token kept
            self.drafter.remember(r.request_id, features[accepted], new[accepted])
        for source, proposal in self.proposals.pop(r.request_id, []):
            if source is None:  # the head's drafts
                self.stats["head_drafted"] += len(proposal)
                self.stats["head_accepted"] += accepted
                if self.drafter is not None:
                    self.drafter.observe(r.request_id, accepted)
                continue
            policy, match = source
            policy.observe(r.request_id, match, proposal, new)
        if item.draft_source in ("corpus", "pool"):
            self.stats[f"{item.draft_source}_drafted"] += len(item.drafts)
            self.stats[f"{item.draft_source}_accepted"] += accepted
        status = Status.RUNNING
        for i, tok in enumerate(new):
            if tok in self.eos:
                new, status = new[:i], Status.FINISHED_STOPPED
                break
        room = r.token_budget - r.num_tokens
        if len(new) >= room and status is Status.RUNNING:
            new = new[:room]
            full = r.token_budget >= len(r.prompt_ids) + r.params.max_tokens
            status = Status.FINISHED_LENGTH if full else Status.FINISHED_CONTEXT
        r.output_ids.extend(new)
        if r.lane is Lane.FAST:
            old = self.tokens_per_pass.get(r.request_id, 1.0)
            self.tokens_per_pass[r.request_id] = 0.7 * old + 0.3 * max(len(new), 1)
        if r.request_id in self.lookups:
            self.lookups[r.request_id].extend(new)
        if status.finished:
            self._finish(r, status, new)
        else:
            _emit(r, TokenDelta(r.request_id, new, status))

    def _finish(self, r: Request, status: Status, new: list[int]) -> None:
        # ended before writing every planned cache entry: its last delta says what was written
        cache = self.prefix.settled(r) if r.cache is not None else None
        self.scheduler.finish(r, status)
        self.requests.pop(r.request_id, None)
        self.lookups.pop(r.request_id, None)
        self.proposals.pop(r.request_id, None)
        if self.drafter is not None:
            self.drafter.forget(r.request_id)
        self.prefix.forget(r.request_id)
        self.runner.forget(r.request_id)
        self.generators.pop(r.request_id, None)
        self.policy.forget(r.request_id)
        self.corpus_policy.forget(r.request_id)
        self.pool_policy.forget(r.request_id)
        self.tokens_per_pass.pop(r.request_id, None)
        _emit(r, TokenDelta(r.request_id, new, r.status, cache=cache))
        pool = self.pool  # once: shutdown may drop it from another thread
        if pool is not None and r.pool is not None and status is not Status.FINISHED_ERROR:
            try:  # what it produced before it ended (also when aborted), after its last delta went out
                pool.add(r.pool, r.prompt_ids, r.output_ids)
            except Exception:
                log.exception("keeping the answer of %s in the draft pool failed", r.request_id)


def resolve_device(name: str) -> torch.device:
    """The torch device for EngineConfig.device, with its index ("cuda" -> "cuda:0"); an
    error saying so if this machine has no such device."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build or machine has no CUDA device")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def _emit(req: Request, delta: TokenDelta) -> None:
    """Hand a delta to the request's owner; a failing callback must not stop the engine."""
    try:
        req.on_delta(delta)
    except Exception:
        log.exception("delivering output of %s failed", req.request_id)
