"""Hands out fixed-size KV cache blocks, shares cached ones by reference; plain Python, no torch."""
from __future__ import annotations

from collections import OrderedDict, deque


class BlockManager:
    """Blocks [0, num_blocks) of `block_size` token slots each; a request owns a list of them.

    A request's block list covers its whole budget (prompt + max_tokens) from admission on, so
    a running request never waits for memory and nothing is ever preempted.

    Prefix caching: a full block whose tokens are final can be *registered* under a hash that
    chains its tokens with everything before it (and the cache's namespace, see
    `prefix_cache.py`). Requests then share it by reference (`ref`); when no request holds a
    registered block it stays cached, oldest-released first in `lru`, until an allocation needs
    it: cached blocks always yield to new requests, so caching never makes a request wait.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))  # hold nothing anyone may read
        self.ref = [0] * num_blocks  # requests holding each block
        self.hash_of: dict[int, bytes] = {}  # registered block -> its chained hash
        self.by_hash: dict[bytes, int] = {}  # chained hash -> registered block
        self.lru: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; oldest first

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and cached ones no request holds."""
        return len(self.free) + len(self.lru)

    @property
    def num_cached(self) -> int:
        return len(self.hash_of)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def allocate(self, num_tokens: int) -> list[int]:
        return self.allocate_blocks(self.blocks_for(num_tokens))

    def allocate_blocks(self, n: int) -> list[int]:
        """`n` blocks: free ones first, then the least recently released cached ones."""
        if n > self.num_free:
            raise MemoryError(f"need {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.lru.popitem(last=False)
                del self.by_hash[self.hash_of.pop(b)]
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced registered blocks stay cached, the
        others are free. A request's last blocks are released first, so they are evicted first
        and a cached prefix wears away from its end."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None  # released later -> evicted later
                else:
                    self.free.append(b)
        blocks.clear()

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Registered blocks for the longest run of leading `hashes`."""
        out = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference to registered blocks found by `lookup`."""
        for b in blocks:
            if self.ref[b] == 0:
                del self.lru[b]
            self.ref[b] += 1

    def register(self, block: int, h: bytes) -> None:
        """Make a held, full block findable by `h`. If another block already holds the same
        tokens, that one stays the cached copy and this one is freed normally later."""
        if h in self.by_hash or block in self.hash_of:
            return
        self.hash_of[block] = h
        self.by_hash[h] = block

    def slot(self, blocks: list[int], position: int) -> int:
        """Cache slot of the token at `position` of a request owning `blocks`."""
        return blocks[position // self.block_size] * self.block_size + position % self.block_size
