"""Read GGUF files: metadata, and tensors dequantized to float32 torch tensors."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9

# ggml tensor types we can read: type id -> (name, block size in elements, bytes per block)
TENSOR_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}


class GGUFError(ValueError):
    """The file is not a GGUF file we can read."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost first (GGUF stores innermost first)
    type_id: int
    offset: int  # absolute byte offset in the file

    @property
    def type_name(self) -> str:
        return TENSOR_TYPES[self.type_id][0]


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` dict and `tensors` by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._pos = 0
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors = self._read("<Q")
        n_kv = self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._read_string()
            self.metadata[key] = self._read_value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._read_string()
            n_dims = self._read("<I")
            dims = [self._read("<Q") for _ in range(n_dims)]
            type_id = self._read("<I")
            offset = self._read("<Q")
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = {n: TensorInfo(n, s, t, data_start + o) for n, s, t, o in infos}

    def _read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _read_string(self) -> str:
        n = self._read("<Q")
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _read_value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self._read_string()
        if vtype == _ARRAY:
            etype = self._read("<I")
            n = self._read("<Q")
            if etype in _SCALARS:  # read numeric arrays in one go
                fmt, size = _SCALARS[etype]
                arr = np.frombuffer(self._buf, dtype=np.dtype(fmt), count=n, offset=self._pos)
                self._pos += n * size
                return arr.tolist()
            return [self._read_value(etype) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype}")

    def load(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to float32, shaped as torch expects ([out, in] for matrices)."""
        info = self.tensors[name]
        if info.type_id not in TENSOR_TYPES:
            raise GGUFError(f"tensor {name}: ggml type {info.type_id} is not supported "
                            f"(supported: {', '.join(t[0] for t in TENSOR_TYPES.values())})")
        _, block, block_bytes = TENSOR_TYPES[info.type_id]
        numel = int(np.prod(info.shape))
        nbytes = numel // block * block_bytes
        raw = self._buf[info.offset:info.offset + nbytes]
        flat = dequantize(np.asarray(raw), info.type_id, numel)
        return flat.reshape(info.shape)

    def load_blocks(self, name: str) -> tuple[int, torch.Tensor] | None:
        """A matrix's raw Q4_1 or Q8_0 blocks as (ggml type id, uint8 [rows, row bytes]), Q4_0
        converted to Q4_1; None for other types (load() dequantizes those)."""
        info = self.tensors[name]
        kind = TENSOR_TYPES.get(info.type_id, ("?",))[0]
        if kind not in ("Q4_0", "Q4_1", "Q8_0") or len(info.shape) != 2:
            return None
        _, block, block_bytes = TENSOR_TYPES[info.type_id]
        rows, cols = info.shape
        raw = np.asarray(self._buf[info.offset:info.offset + rows * cols // block * block_bytes])
        blocks = raw.reshape(rows * cols // block, block_bytes)
        if kind == "Q4_0":
            blocks, kind = q4_0_to_q4_1(blocks), "Q4_1"
        type_id = next(t for t, v in TENSOR_TYPES.items() if v[0] == kind)
        return type_id, torch.from_numpy(blocks.reshape(rows, -1).copy())


def q4_0_to_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks [n, 18] -> the same values as Q4_1 blocks [n, 20] (m = -8 d, exact in f16)."""
    d = blocks[:, :2].copy().view(np.float16)
    m = (d.astype(np.float32) * -8.0).astype(np.float16)
    return np.concatenate([d.view(np.uint8), m.view(np.uint8), blocks[:, 2:18]], axis=1)


def dequantize(raw: np.ndarray, type_id: int, numel: int) -> torch.Tensor:
    """Raw bytes of one tensor -> flat float32 tensor of `numel` values."""
    name = TENSOR_TYPES[type_id][0]
    if name == "F32":
        return torch.from_numpy(raw.view(np.float32).copy())
    if name == "F16":
        return torch.from_numpy(raw.view(np.float16).astype(np.float32))
    if name == "BF16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
    _, block, block_bytes = TENSOR_TYPES[type_id]
    blocks = raw.reshape(numel // block, block_bytes)
    if name == "Q8_0":  # [d: f16][q: 32 x int8]; w = d * q
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return torch.from_numpy((d * q).reshape(-1))
    # 4-bit formats: 16 bytes of nibbles, low nibbles are elements 0..15, high 16..31
    header = 2 if name == "Q4_0" else 4
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, header:header + 16]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    if name == "Q4_0":  # w = d * (q - 8)
        w = d * (q - 8.0)
    else:  # Q4_1: [d: f16][m: f16]; w = d * q + m
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        w = d * q + m
    return torch.from_numpy(w.reshape(-1))


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """A float matrix [rows, k] (k a multiple of 32) -> its Q8_0 blocks, uint8 [rows, k / 32 * 34]:
    per 32 values an f16 scale d = max |w| / 127 and the values rounded to w / d (the inverse of
    `dequantize` up to that rounding)."""
    rows, k = w.shape
    if k % 32:
        raise ValueError(f"Q8_0 needs rows of a multiple of 32 values, not {k}")
    x = w.detach().float().cpu().numpy().reshape(rows * (k // 32), 32)
    d = (np.abs(x).max(axis=1, keepdims=True) / 127.0).astype(np.float16)
    scale = d.astype(np.float32)
    q = np.round(np.divide(x, scale, out=np.zeros_like(x), where=scale != 0)).clip(-127, 127).astype(np.int8)
    blocks = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(blocks).reshape(rows, (k // 32) * 34))
