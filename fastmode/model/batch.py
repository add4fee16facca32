"""The tensors one forward pass needs: flat token rows, cache slots, attention segments."""
from __future__ import annotations

import array
from dataclasses import dataclass, replace

import torch


@dataclass
class Segment:
    """The rows of one request in a forward pass.

    Rows [row_start, row_start + num_rows) hold the tokens at absolute positions
    [start_pos, start_pos + num_rows); `kv_slots` are the cache slots of positions
    [0, start_pos + num_rows), so row j attends to kv_slots[: start_pos + j + 1].
    """

    row_start: int
    num_rows: int
    start_pos: int
    kv_slots: torch.Tensor  # [start_pos + num_rows] int64
    is_prefill: bool
    mask: torch.Tensor | None = None  # [num_rows, start_pos + num_rows] bool, prefill only

    def to(self, device: torch.device) -> Segment:
        return replace(self, kv_slots=self.kv_slots.to(device),
                       mask=None if self.mask is None else self.mask.to(device))


@dataclass
class DecodeRows:
    """Where each row of a pass on the native kernels reads its keys (decode, draft and prefill
    rows alike): row r attends to `lengths[r]` keys whose cache slots start at `slots[offsets[r]]`."""

    slots: torch.Tensor  # int64, every segment's kv_slots back to back
    offsets: torch.Tensor  # [rows in the pass] int64 (padding rows attend to one key)
    lengths: torch.Tensor  # [rows in the pass] int64

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.slots, self.offsets, self.lengths


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64; rows >= num_real are padding
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [num_real] int64: where each real row's K/V is written
    num_real: int
    segments: list[Segment]
    logit_rows: torch.Tensor  # [R] int64, rows whose logits are returned (may repeat for padding)
    decode: DecodeRows | None = None  # set for models on the native kernels (every pass)
    every_row: bool = False  # logit_rows is every row, in order (the logits need no gather)

    def to(self, device: torch.device) -> ForwardBatch:
        """This batch with its tensors on `device` (itself when they are there already)."""
        if self.input_ids.device == device:
            return self
        return ForwardBatch(self.input_ids.to(device), self.positions.to(device), self.slot_mapping.to(device),
                            self.num_real, [seg.to(device) for seg in self.segments], self.logit_rows.to(device),
                            None if self.decode is None else DecodeRows(*(t.to(device) for t in self.decode.tensors)),
                            self.every_row)


@dataclass
class NativeRows:
    """A pass on the native kernels, as they read it: no torch tensors for the per-row values.

    `ints` holds `rows` int64 values four times over: the rows' token ids, their positions,
    where each row's keys start in `kv_slots` and how many it attends to (row j of a request
    attends to its first start_pos + j + 1 positions, so prefill rows are causal too)."""

    ints: array.array  # typecode "q", 4 * rows values
    rows: int
    slots: torch.Tensor  # [rows] int64: the cache slot each row's K/V go to
    kv_slots: torch.Tensor  # int64: each request's key slots, back to back
    logit_rows: list[int] | None  # the rows whose logits are wanted, in order (None: every row)
    decode: bool  # no prefill rows (the thread chooser times these passes)

    @property
    def num_logits(self) -> int:
        return self.rows if self.logit_rows is None else len(self.logit_rows)
