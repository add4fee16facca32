"""The paged KV cache tensors: one slot per token, blocks of `block_size` slots."""
from __future__ import annotations

import torch

from fastmode.config import ModelArch


class KVCache:
    def __init__(self, arch: ModelArch, num_blocks: int, block_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (arch.num_layers, num_blocks * block_size, arch.num_kv_heads, arch.head_dim)
        # Zero-filled: unwritten slots are never read, but must never hold NaN either. Filled by
        # writing, not by allocating zeroed memory: the system maps that lazily, and each page's
        # first write would then fault in the middle of a request (the first requests after a
        # start ran slower); writing now takes those faults at start-up.
        self.k = torch.empty(shape, device=device, dtype=dtype).fill_(0)  # [layers, slots, kv_heads, head_dim]
        self.v = torch.empty(shape, device=device, dtype=dtype).fill_(0)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)
