"""Bridges the engine thread to asyncio and turns token deltas into text with stop handling."""
from __future__ import annotations

import asyncio
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import AsyncIterator

from fastmode.engine.engine import Engine
from fastmode.engine.prefix_cache import CacheResult, CacheSpec
from fastmode.engine.request import Lane, SamplingParams, Status, TokenDelta
from fastmode.server.errors import new_id
from fastmode.server.prompt import TOOL_CLOSE, TOOL_OPEN, read_call
from fastmode.tokenizer.tokenizer import IncrementalDecoder, Tokenizer

_STOP_REASONS = {
    Status.FINISHED_STOPPED: "end_turn",
    Status.FINISHED_LENGTH: "max_tokens",
    Status.FINISHED_CONTEXT: "model_context_window_exceeded",
}
_SPACE = re.compile(r"\s*")
SETTLE_S = 2.0  # how long usage waits for an aborted request's report of its cache writes


class GenerationFailed(RuntimeError):
    """The engine failed while running this request."""


class GenerationAborted(GenerationFailed):
    """The engine dropped the request (shutdown); the client should retry."""


@dataclass
class Outcome:
    """Filled in as a generation runs; complete once the iterator ends."""

    text: str = ""  # all text emitted, stop sequence excluded
    tail: str = ""  # text held back from streaming (a tool call), parsed at the end
    output_tokens: int = 0
    stop_reason: str | None = None
    stop_sequence: str | None = None
    cache: CacheResult | None = None  # what the prompt cache read and writes, once admitted


class Generation:
    """One request's run through the engine, as an async iterator of text deltas."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                 lane: Lane, stop_sequences: list[str], tool_names: Collection[str] = (), priority: int = 0,
                 cache: CacheSpec | None = None, prefix: str = "", pool: str | None = None,
                 single_tool_call: bool = False, max_len: int | None = None) -> None:
        """`tool_names`: the tools the model may call (none: no tool calls). A tool call is
        held back from streaming (parsed at the end), and the reply ends once its tool calls
        are done (see `_after_tool_calls`): after the first that reads with `single_tool_call`
        (parallel tool use off). `max_len`: the model entry's context window, when smaller
        than the weights'."""
        self.engine, self.tokenizer = engine, tokenizer
        self.prompt_ids, self.params, self.lane = prompt_ids, params, lane
        self.stops = stop_sequences
        self.tool_names = frozenset(tool_names)
        self.hold_tool_calls = bool(self.tool_names)
        self.single_tool_call = single_tool_call
        # where the text's first tool call opens (-1: none yet), how much of the text has been
        # searched for tool-call tags, where each close found ends, and the close last judged
        self._open, self._scanned, self._closes, self._judged = -1, 0, [], -1
        self.max_len = max_len
        self.prefix = prefix  # text the prompt ends with that the output continues (a forced tool call's start)
        self.priority = priority
        self.cache = cache
        self.pool = pool  # the engine's draft pool scope
        self.request_id = new_id("gen_")
        self.outcome = Outcome()
        self.failed = False  # the engine failed or dropped it (as opposed to a client leaving)

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that may start a stop sequence or tool call."""
        marks = self.stops + ([TOOL_OPEN] if self.hold_tool_calls else [])
        best = 0
        if not text:
            return 0
        last = text[-1]
        for s in marks:  # the prefixes of s ending in the text's last character, longest first
            at = s.rfind(last, 0, min(len(s) - 1, len(text)))
            while at + 1 > best:
                if text.endswith(s[:at + 1]):
                    best = at + 1
                    break
                at = s.rfind(last, 0, at)
        return best

    def start(self) -> None:
        """Queue the request in the engine; raises EngineOverloaded before anything is sent."""
        loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._admitted = asyncio.Event()
        self._ended = asyncio.Event()  # the engine's last delta for it has come
        self._tokens_came = False
        if self.cache is None:
            self._admitted.set()  # nothing to report before the first token
        self.engine.add(self.request_id, self.prompt_ids, self.params, self.lane,
                        lambda d: loop.call_soon_threadsafe(self._deliver, d), self.priority, self.cache, self.pool,
                        max_len=self.max_len)

    def _deliver(self, delta: TokenDelta) -> None:
        if delta.cache is not None:  # the admission report (no tokens), or a last delta's correction
            self.outcome.cache = delta.cache
            self._admitted.set()
            if not delta.status.finished:
                return
        if delta.status.finished:
            self._admitted.set()
            self._ended.set()
        self._tokens_came = self._tokens_came or bool(delta.token_ids)
        self._inbox.put_nowait(delta)

    async def admitted(self) -> None:
        """Wait until the engine has admitted the request (and `outcome.cache` is known) or
        dropped it."""
        await self._admitted.wait()

    def abort(self) -> None:
        """Stop the request in the engine and free its KV blocks (safe to repeat)."""
        self.engine.abort(self.request_id)

    async def settled(self, timeout: float = SETTLE_S) -> None:
        """Once it ended here (aborted): if it has cache breakpoints and no token came (so its
        prompt may have reached some, or none, of them, even if it was still queued when this
        side let go), wait for the engine's last delta, after which `outcome.cache` says what it
        read and wrote, so that its usage bills just that; at most `timeout` seconds (then the
        admission's plan stands). Returns at once otherwise."""
        if self.cache is None or not self.cache.breakpoints or self._tokens_came or self._ended.is_set():
            return
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def stream(self) -> AsyncIterator[str]:
        inbox = self._inbox
        decoder = IncrementalDecoder(self.tokenizer)
        out, text, sent = self.outcome, self.prefix, 0  # text[:sent] has been yielded
        finished = cut = False  # cut: ended here (a stop sequence or tool calls), not by the engine
        try:
            while not finished:
                delta = await inbox.get()
                if delta.status in (Status.FINISHED_ERROR, Status.FINISHED_ABORTED):
                    self.failed = True
                if delta.status is Status.FINISHED_ERROR:
                    raise GenerationFailed("the engine failed while generating")
                if delta.status is Status.FINISHED_ABORTED:
                    raise GenerationAborted("the server is shutting down; retry the request")
                for token in delta.token_ids:  # one at a time: tokens after a stop sequence are not counted
                    out.output_tokens += 1
                    text += decoder.push([token])
                    end = self._find_stop(text, sent)
                    if end is None and self.hold_tool_calls:
                        end = self._after_tool_calls(text)
                    if end is not None:
                        text, finished, cut = end, True, True
                        break
                if delta.status.finished and not finished:
                    finished = True
                    out.stop_reason = _STOP_REASONS[delta.status]
                    text += decoder.flush()
                limit = len(text) if finished else len(text) - self._holdback(text)
                if self.hold_tool_calls and 0 <= self._first_open(text) < max(limit, sent):
                    limit = min(limit, self._open)
                if limit > sent:
                    chunk, sent = text[sent:limit], limit
                    yield chunk
        finally:
            if not finished or cut:
                self.abort()  # client gone, or ended here: free the KV blocks now
        out.text, out.tail = text[:sent], text[sent:]

    def _first_open(self, text: str) -> int:
        """Where the text's first tool call opens (-1: none), searching only what is new."""
        if self._open < 0:
            self._open = text.find(TOOL_OPEN, max(0, self._scanned - len(TOOL_OPEN) + 1))
        return self._open

    def _after_tool_calls(self, text: str) -> str | None:
        """Text up to the end of the reply's tool calls, once they are done and one reads (a
        known tool's name and an arguments object): a call's close followed by text that is
        not another call, or, with `single_tool_call`, the first close of a call that reads.
        The model would otherwise go on writing what the reply drops; its stop reason is
        then tool_use. Calls that do not read end nothing: the reply stays text. Each call
        searches only the text that is new since the last."""
        opened = self._first_open(text)
        if opened >= 0:
            at = text.find(TOOL_CLOSE, max(opened, self._scanned - len(TOOL_CLOSE) + 1))
            while at >= 0:
                self._closes.append(at + len(TOOL_CLOSE))
                at = text.find(TOOL_CLOSE, at + 1)
        self._scanned = len(text)
        if not self._closes:
            return None
        if self.single_tool_call:
            ends = [e for e in self._closes if e > self._judged]
            self._judged = self._closes[-1]
            end = next((e for e in ends if self._reads(text[text.rfind(TOOL_OPEN, 0, e):e])), None)
        else:
            end = self._closes[-1]
            after = _SPACE.match(text, end).end()
            if after == len(text) or TOOL_OPEN.startswith(text[after:after + len(TOOL_OPEN)]) or end == self._judged:
                return None  # nothing after the close yet, another call, or judged already
            self._judged = end
            if not self._reads(text[opened:end]):
                return None
        if end is None:
            return None
        self.outcome.stop_reason = "tool_use"
        return text[:end]

    def _reads(self, calls: str) -> bool:
        """Whether one of the tool calls in `calls` reads as a call of a known tool."""
        parts = calls.split(TOOL_OPEN)[1:]
        return any((call := read_call(p.split(TOOL_CLOSE)[0].strip())) is not None and call[0] in self.tool_names
                   for p in parts)

    def _find_stop(self, text: str, sent: int) -> str | None:
        """Text up to the earliest stop sequence, if one has appeared; records which."""
        if not self.stops:
            return None
        longest = max(len(s) for s in self.stops)
        start = max(len(self.prefix), sent - longest)  # a stop sequence is looked for in the output only
        hits = [(text.find(s, start), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.outcome.stop_reason, self.outcome.stop_sequence = "stop_sequence", s
        return text[:i]
