"""Turns a lane's plan into one forward pass over the paged cache; owns the torch side."""
from __future__ import annotations

import time
from array import array
from collections import deque

import torch
import torch.nn.functional as F

from fastmode import kernels
from fastmode.engine.block_manager import BlockManager
from fastmode.engine.request import Request
from fastmode.engine.scheduler import Scheduled
from fastmode.model.batch import DecodeRows, ForwardBatch, NativeRows, Segment
from fastmode.model.kv_cache import KVCache
from fastmode.model.llama import Llama

_MAX_THREADS = torch.get_num_threads()  # torch's default for this machine, read at import


def max_threads() -> int:
    """The most threads a pass uses when none are configured: torch's default (physical cores)."""
    return _MAX_THREADS


PROBES = [*range(1, 17), 24, 32, 48, 64, 96, 128, 192, 256]


def invariant_row_counts(weights: list[torch.Tensor], probe_max: int) -> list[int]:
    """Row counts M (of PROBES, plus `probe_max`) for which every row of x[:M] @ W.T equals,
    bit for bit, the same row computed in a batch of `probe_max` rows, for every weight given.

    CPU GEMM libraries pick kernels by M (e.g. a matrix-vector path for M = 1), and their
    float results differ in the last bits. Padding every pass to one of these row counts
    makes a token's logits independent of what else was in its batch. `probe_max` is the
    largest pass the scheduler can build, so every pass pads to a probed size.
    """
    g = torch.Generator().manual_seed(0)
    ok = {m for m in PROBES if m < probe_max}
    for w in weights:
        x = torch.randn(probe_max, w.shape[1], generator=g).to(w.device, w.dtype)
        ref = F.linear(x, w)
        ok = {m for m in ok if torch.equal(F.linear(x[:m], w), ref[:m])}
    return sorted(ok | {probe_max})


class ThreadChooser:
    """The thread count for each pass size, from measured pass times.

    Two threads beat one on an idle 2-core machine, but when another process takes a core the
    threads wait on each other at every barrier and one thread is twice as fast. So each pass
    size keeps its pass time per thread count, the fastest is used, and every
    `explore_every`-th pass of a size tries another count, so a change in the machine's load is
    noticed within a few seconds.

    A count's time is the least of its last `window` passes: a pass is only ever slowed by
    what else the machine does, and a count that is not in use is measured once in
    `explore_every` passes.
    A running average kept one slow pass for hundreds: measured on the default model, a 1-row
    pass had been held at 5.4 ms on two threads (so it ran on one, at 3.1 ms) while two
    threads took 2.5 ms.
    """

    def __init__(self, options: list[int], explore_every: int = 50, window: int = 3) -> None:
        self.options = options
        self.explore_every = explore_every
        self.seconds: dict[tuple[int, int], float] = {}  # (threads, rows) -> least of the recent passes
        self.recent: dict[tuple[int, int], deque[float]] = {}
        self.window = window
        self.passes: dict[int, int] = {}
        self.best: dict[int, int] = {}  # rows -> pick_best(rows), kept by observe (read every pass)
        self.complete: set[int] = set()  # pass sizes every option has been measured at

    def pick(self, rows: int) -> int:
        n = self.passes[rows] = self.passes.get(rows, 0) + 1
        if rows not in self.complete:
            untried = [t for t in self.options if (t, rows) not in self.seconds]
            if untried:
                return untried[0]
        best = self.best[rows]
        if n % self.explore_every == 0:  # try the next count after the best, in turn
            others = [t for t in self.options if t != best]
            return others[(n // self.explore_every) % len(others)]
        return best

    def pick_best(self, rows: int) -> int | None:
        """The thread count with the fastest measured passes of this size (None: none measured)."""
        return self.best.get(rows)

    def observe(self, threads: int, rows: int, seconds: float) -> None:
        recent = self.recent.setdefault((threads, rows), deque(maxlen=self.window))
        recent.append(seconds)
        self.seconds[(threads, rows)] = min(recent)
        known = {t: self.seconds[(t, rows)] for t in self.options if (t, rows) in self.seconds}
        if known:
            self.best[rows] = min(known, key=known.__getitem__)
        if len(known) == len(self.options):
            self.complete.add(rows)


class PassCost:
    """Seconds of a decode pass of up to `max_rows` rows, as a line a + b * rows fitted to recent
    passes (least squares, each pass weighing `decay` times the next one's).

    The draft policies choose a draft length by comparing the costs of passes of nearby sizes.
    A separate running average per row count is noisy, and choosing by noisy estimates picks
    whichever size happens to look cheapest: measured on question answering, the sizes chosen
    had been estimated 7-10% below what they then took, and below a one-row pass. One line
    fitted to every pass shares the noise between all sizes. Until passes of two sizes are
    seen, the slope is `prior_slope` of a pass per row (the fit leans on it a little always).
    """

    def __init__(self, max_rows: int = 16, decay: float = 0.99, prior_slope: float = 0.05) -> None:
        self.max_rows, self.decay, self.prior_slope = max_rows, decay, prior_slope
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self._line: tuple[float, float] | None = None  # the fit, until the next observation

    def observe(self, rows: int, seconds: float) -> None:
        if rows > self.max_rows:
            return
        d = self.decay
        self.w, self.sx, self.sy = d * self.w + 1.0, d * self.sx + rows, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + rows * rows, d * self.sxy + rows * seconds
        self._line = None

    @property
    def known(self) -> bool:
        return self.w > 0

    def line(self) -> tuple[float, float]:
        """(a, b): seconds = a + b * rows."""
        if self._line is None:
            mx, my = self.sx / self.w, self.sy / self.w
            var, cov = self.sxx / self.w - mx * mx, self.sxy / self.w - mx * my
            slope = max((self.w * cov + self.prior_slope * my) / (self.w * max(var, 0.0) + 1.0), 0.0)
            self._line = (my - slope * mx, slope)
        return self._line

    def __call__(self, rows: int) -> float:
        a, b = self.line()
        return max(a + b * rows, 0.5 * self.sy / self.w)


class Runner:
    def __init__(self, model: Llama, cache: KVCache, blocks: BlockManager, invariant: bool, max_rows: int,
                 threads: ThreadChooser | None = None) -> None:
        """`max_rows`: the most rows a pass can have (prefill budget + decode and draft rows).
        `threads`: choose the thread count of passes without prefill rows (only for models
        whose results do not depend on it: the native kernels)."""
        self.model, self.cache, self.blocks = model, cache, blocks
        self.device = model.device
        self.threads = threads
        self.fixed_threads = torch.get_num_threads()  # for every other pass (the engine has set it)
        # Float matrices run on torch's GEMM, whose rows depend on the batch: pad for them.
        # Quantized layers (QLinear) are row-invariant by construction and need no padding.
        layers = [model.blocks[0].attn.qkv, model.blocks[0].attn.o, model.blocks[0].mlp.gate_up,
                  model.blocks[0].mlp.down, model.lm_head]
        mats = [m.weight.detach() for m in layers if not getattr(m, "row_invariant", False)]
        invariant = invariant and bool(mats)
        self.sizes = invariant_row_counts(mats, max(max_rows, 64)) if invariant else []
        self.pad_to = self._cheapest_padding(mats) if invariant else {}
        self.step_seconds: dict[int, float] = {}  # padded rows -> running average of pass time
        self.cost = PassCost()  # decode passes of up to 16 rows (where drafts are priced)
        self._slots: dict[str, tuple[list[int], torch.Tensor]] = {}  # request -> (its blocks, slots_of)
        # each logit row's argmax from the last pass, where the head computed it as it went (the
        # native kernels: the greedy choice without another scan of the logits); else None
        self.greedy: list[int] | None = None

    def _cheapest_padding(self, mats: list[torch.Tensor]) -> dict[int, int]:
        """For small row counts, the invariant size at or above it whose pass is fastest
        (a smaller padded size is not always faster: kernels differ by size)."""
        small = [s for s in self.sizes if s <= 16]
        cost = {}
        for s in small:
            x = [torch.randn(s, m.shape[1]).to(m.device, m.dtype) for m in mats]
            F.linear(x[0], mats[0])
            _sync(self.device)
            t0 = time.perf_counter()
            for _ in range(3):
                for xi, m in zip(x, mats):
                    F.linear(xi, m)
            _sync(self.device)
            cost[s] = time.perf_counter() - t0
        return {rows: min((s for s in small if s >= rows), key=lambda s: cost[s])
                for rows in range(1, max(small, default=0) + 1)}

    def padded(self, rows: int) -> int:
        if rows in self.pad_to:
            return self.pad_to[rows]
        for s in self.sizes:
            if s >= rows:
                return s
        return rows

    def step_time(self, rows: int) -> float:
        """Estimated seconds of a pass with `rows` rows: up to PassCost's 16 rows the line
        fitted to recent decode passes; beyond, running averages per size (neighbours fill
        the gaps)."""
        p = self.padded(rows)
        if p <= self.cost.max_rows and self.cost.known:
            return self.cost(p)
        if p in self.step_seconds:
            return self.step_seconds[p]
        known = sorted(self.step_seconds)
        if not known:
            return 1.0 + 0.01 * p  # before any measurement: roughly flat, growing slowly
        below = [k for k in known if k <= p]
        base = self.step_seconds[below[-1] if below else known[0]]
        return base * (1.0 + 0.01 * (p - (below[-1] if below else known[0])))

    def slots_of(self, r: Request) -> torch.Tensor:
        """The cache slots of every position a request may hold ([its blocks x block size],
        int64): its blocks are fixed from admission on, so this is made once per request."""
        held = self._slots.get(r.request_id)
        if held is not None and held[0] is r.block_ids:
            return held[1]
        bs = self.blocks.block_size
        table = torch.tensor(r.block_ids, dtype=torch.long)
        slots = (table[:, None] * bs + torch.arange(bs)).view(-1)
        self._slots[r.request_id] = (r.block_ids, slots)
        return slots

    def forget(self, request_id: str) -> None:
        """Drop what was kept for a finished request."""
        self._slots.pop(request_id, None)

    def _item_rows(self, item: Scheduled) -> tuple[int, list[int], torch.Tensor, int]:
        """A plan item's first position, its tokens (the scheduled ones, then its drafts), its
        request's cache-slot table, and how many of its last rows give logits: a prompt chunk's
        last row once the prompt is done, none before; every row of a decode."""
        r = item.request
        start = r.num_computed_tokens
        tokens = r.tokens(start, start + item.num_tokens) + item.drafts
        n = len(tokens)
        held = self.slots_of(r)
        if start + n > len(held):
            raise ValueError(f"request {r.request_id}: position {start + n - 1} is beyond its "
                             f"{len(held)} cache slots")
        if not r.in_prefill:
            return start, tokens, held, n
        return start, tokens, held, 1 if start + n == len(r.prompt_ids) else 0

    def build(self, plan: list[Scheduled]) -> tuple[ForwardBatch, list[tuple[int, int]]]:
        """Return the batch and, per plan item, its (first, count) range in the logits."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[torch.Tensor] = []
        segments: list[Segment] = []
        logit_rows: list[int] = []
        ranges: list[tuple[int, int]] = []
        for item in plan:
            start, tokens, held, wanted = self._item_rows(item)
            n = len(tokens)
            row0 = len(ids)
            ids += tokens
            pos += range(start, start + n)
            slots.append(held[start:start + n])
            kv_slots = held[:start + n]
            prefill = item.request.in_prefill
            mask = None
            if prefill:
                q_pos = torch.arange(start, start + n)[:, None]
                mask = torch.arange(start + n)[None, :] <= q_pos
            segments.append(Segment(row0, n, start, kv_slots, prefill, mask))
            ranges.append((len(logit_rows), wanted))
            logit_rows += range(row0 + n - wanted, row0 + n)
        real = len(ids)
        total = self.padded(real)
        ids += [0] * (total - real)
        pos += [0] * (total - real)
        n_logits = len(logit_rows)
        logit_rows += [0] * (self.padded(max(n_logits, 1)) - n_logits)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            slot_mapping=slots[0] if len(slots) == 1 else torch.cat(slots),
            num_real=real,
            segments=segments,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
            decode=_decode_rows(segments, total) if self.model.native else None,
            # rows come in order, each item's logit rows among its own: as many as there are rows
            # (no padding) means every row, in order
            every_row=n_logits == total,
        )
        return batch.to(self.device), ranges

    def build_native(self, plan: list[Scheduled]) -> tuple[NativeRows, list[tuple[int, int]]]:
        """`build` for a model whose passes run in one native call: the per-row values in one
        int64 array the kernels read in place (no padding: their rows do not depend on the
        batch), and per plan item its (first, count) range in the logits."""
        ids: list[int] = []
        pos: list[int] = []
        offsets: list[int] = []
        lengths: list[int] = []
        slots: list[torch.Tensor] = []
        kv_slots: list[torch.Tensor] = []
        logit_rows: list[int] = []
        ranges: list[tuple[int, int]] = []
        keys = 0  # kv_slots so far
        for item in plan:
            start, tokens, held, wanted = self._item_rows(item)
            n = len(tokens)
            ranges.append((len(logit_rows), wanted))
            logit_rows += range(len(ids) + n - wanted, len(ids) + n)
            ids += tokens
            pos += range(start, start + n)
            offsets += [keys] * n
            lengths += range(start + 1, start + n + 1)
            keys += start + n
            slots.append(held[start:start + n])
            kv_slots.append(held[:start + n])
        rows = NativeRows(array("q", ids + pos + offsets + lengths), len(ids),
                          slots[0] if len(slots) == 1 else torch.cat(slots),
                          kv_slots[0] if len(kv_slots) == 1 else torch.cat(kv_slots),
                          None if len(logit_rows) == len(ids) else logit_rows,
                          not any(item.request.in_prefill for item in plan))
        return rows, ranges

    def run(self, plan: list[Scheduled], taps: tuple[int, ...] = ()
            ) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor | None]:
        """One pass: the logits of the plan's logit rows, each item's (first, count) range in
        them and, with `taps`, the residual stream after those blocks at the same rows (what a
        draft head reads; None without taps)."""
        native = self.model.one_call
        if native:
            laid, ranges = self.build_native(plan)
            rows, decode, num_logits = laid.rows, laid.decode, laid.num_logits
        else:
            batch, ranges = self.build(plan)
            rows, num_logits = len(batch.input_ids), len(batch.logit_rows)
            decode = all(not s.is_prefill for s in batch.segments)
        threads = self.threads.pick(rows) if self.threads is not None and decode else self.fixed_threads
        torch_threads = torch.get_num_threads()
        # On the native kernels the kernels' own thread pool does a pass's work: torch runs on
        # one thread meanwhile (its part: embeddings, and a prefill chunk's attention), so that
        # none of its idle OpenMP threads spins for a core the kernels' threads need.
        quiet = self.model.native and torch_threads != 1
        if self.model.native:
            kernels.set_threads(threads)
        elif threads != torch_threads:
            torch.set_num_threads(threads)
        if quiet:
            torch.set_num_threads(1)
        argmax = torch.empty(num_logits, dtype=torch.long) if self.model.fuses_argmax else None
        self.greedy = None
        t0 = time.perf_counter()
        try:
            out = (self.model.forward_rows(laid, self.cache, taps, argmax) if native
                   else self.model(batch, self.cache, taps, argmax))
            logits, features = out if taps else (out, None)
            if not native:  # float32 on the CPU for sampling: on a GPU this copy is the pass's one host sync
                logits = logits.float().cpu()
                features = None if features is None else features.float().cpu()
        finally:
            if quiet:
                torch.set_num_threads(torch_threads)
            if self.model.native:
                kernels.set_threads(0)
        dt = time.perf_counter() - t0
        if argmax is not None:
            self.greedy = argmax.tolist()
        if decode:  # the draft policy prices decode passes, at the thread count in use
            if self.threads is None or threads == self.threads.pick_best(rows):
                self.cost.observe(rows, dt)
            if self.threads is not None:
                self.threads.observe(threads, rows, dt)
                dt = min(self.threads.seconds.get((t, rows), dt) for t in self.threads.options)
            old = self.step_seconds.get(rows)
            self.step_seconds[rows] = dt if old is None else 0.8 * old + 0.2 * dt
        return logits, ranges, features


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_rows(segments: list[Segment], total: int) -> DecodeRows:
    """Where each row of a native pass reads its keys (row j of a segment: its first start_pos + j + 1,
    so prefill rows are causal too); padding rows read one valid key."""
    offsets: list[int] = []
    lengths: list[int] = []
    at = 0
    for seg in segments:
        offsets += [at] * seg.num_rows
        lengths += range(seg.start_pos + 1, seg.start_pos + seg.num_rows + 1)
        at += len(seg.kv_slots)
    pad = total - len(offsets)
    slots = segments[0].kv_slots if len(segments) == 1 else torch.cat([seg.kv_slots for seg in segments])
    return DecodeRows(slots,
                      torch.tensor(offsets + [0] * pad, dtype=torch.long),
                      torch.tensor(lengths + [1] * pad, dtype=torch.long))
