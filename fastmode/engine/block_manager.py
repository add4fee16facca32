"""Hands out fixed-size KV cache blocks; plain Python, no torch."""
from __future__ import annotations

from collections import deque


class BlockManager:
    """Blocks [0, num_blocks) of `block_size` token slots each; a request owns a list of them.

    A request's block list covers its whole budget (prompt + max_tokens) from admission on, so
    a running request never waits for memory and nothing is ever preempted. The block list is
    the unit a prefix cache can later share by reference.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self.free)

    def allocate(self, num_tokens: int) -> list[int]:
        n = self.blocks_for(num_tokens)
        if n > len(self.free):
            raise MemoryError(f"need {n} KV blocks, {len(self.free)} free")
        return [self.free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)
        blocks.clear()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def slot(self, blocks: list[int], position: int) -> int:
        """Cache slot of the token at `position` of a request owning `blocks`."""
        return blocks[position // self.block_size] * self.block_size + position % self.block_size
