"""An engine request: token ids in, the counters the scheduler advances, token deltas out."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

from fastmode.engine.prefix_cache import CacheResult, CacheSpec


GREEDY_BELOW = 1e-3


class Lane(str, enum.Enum):
    STANDARD = "standard"
    FAST = "fast"


class Status(enum.IntEnum):
    """Ordered: every status after RUNNING is finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2  # EOS token
    FINISHED_LENGTH = 3  # max_tokens reached
    FINISHED_CONTEXT = 4  # context window full
    FINISHED_ABORTED = 5  # client gone, stop sequence hit, or shutdown
    FINISHED_ERROR = 6  # the engine failed while running it

    @property
    def finished(self) -> bool:
        return self > Status.RUNNING


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # at most GREEDY_BELOW: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        # Dividing logits by a near-zero temperature overflows; it is greedy in all but name.
        return self.temperature <= GREEDY_BELOW


@dataclass
class TokenDelta:
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]
    status: Status
    cache: CacheResult | None = None  # on the delta that reports the request's admission, and on its
    # last if it ended before writing every cache entry planned then (what it did write)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    lane: Lane
    on_delta: Callable[[TokenDelta], None]
    max_len: int  # context window: prompt + output never exceed it
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    # Tokens [0, num_computed_tokens) have K/V in the cache.
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    priority: int = 0  # within a lane, lower is admitted first (priority tier -1, batches 1)
    cache: CacheSpec | None = None  # prompt caching instructions (None: nothing read or written)
    cache_result: CacheResult | None = None  # what admission read and will write, for usage
    pool: str | None = None  # the draft pool scope it drafts from and adds its answer to (None: none)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end], without building the whole sequence."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_ids)

    @property
    def token_budget(self) -> int:
        """Most tokens this request may still hold: prompt + max_tokens, within the window."""
        return min(len(self.prompt_ids) + self.params.max_tokens, self.max_len)
