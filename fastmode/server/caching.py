"""cache_control breakpoints -> the engine's CacheSpec: token positions, TTLs and look-back."""
from __future__ import annotations

from bisect import bisect_right

from fastmode.engine.prefix_cache import TTL_1H, TTL_5M, Breakpoint, CacheSpec
from fastmode.server.prompt import Rendered

LOOKBACK_BLOCKS = 20  # a breakpoint finds an earlier entry this many blocks back at most
TTL_SECONDS = {"5m": TTL_5M, "1h": TTL_1H}


def cache_spec(rendered: Rendered, token_ends: list[int], offset: int, automatic: str | None, namespace: str,
               min_tokens: int) -> CacheSpec | None:
    """The engine's caching instructions for a prompt rendered with block ends.

    `token_ends[k]` is where token k ends in `rendered.text`; `offset` tokens (a BOS) precede
    them. A block's prefix is every token that ends within it. `automatic` (the top-level
    cache_control's TTL) puts a breakpoint on the last block. Breakpoints below `min_tokens`
    cache nothing; None when no breakpoint is left.
    """
    positions = [offset + bisect_right(token_ends, end) for end in rendered.ends]
    ttls = list(rendered.ttls)
    if automatic is not None and ttls and ttls[-1] is None:
        ttls[-1] = automatic
    marked = [i for i, ttl in enumerate(ttls) if ttl is not None]
    by_position: dict[int, float] = {}
    for i in marked:
        if positions[i] >= min_tokens:
            by_position[positions[i]] = max(by_position.get(positions[i], 0.0), TTL_SECONDS[ttls[i]])  # type: ignore[index]
    if not by_position:
        return None
    lookups = {positions[j] for i in marked for j in range(max(0, i - LOOKBACK_BLOCKS + 1), i + 1)}
    return CacheSpec(namespace, tuple(Breakpoint(p, ttl) for p, ttl in sorted(by_position.items())),
                     tuple(sorted(p for p in lookups if p >= min_tokens and p > 0)))
