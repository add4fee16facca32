"""A minimal GGUF v3 writer and ggml quantizers, for tests only."""
from __future__ import annotations

import struct

import numpy as np

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


def quantize(x: np.ndarray, kind: str) -> bytes:
    x = x.astype(np.float32).reshape(-1)
    if kind == "F32":
        return x.tobytes()
    if kind == "F16":
        return x.astype(np.float16).tobytes()
    blocks = x.reshape(-1, 32)
    out = bytearray()
    for b in blocks:
        if kind == "Q8_0":
            d = np.abs(b).max() / 127 or 1.0
            q = np.round(b / d).astype(np.int8)
            out += np.float16(d).tobytes() + q.tobytes()
        elif kind == "Q4_0":
            m = b[np.abs(b).argmax()]
            d = m / -8 or 1.0
            q = np.clip(np.round(b / d + 8), 0, 15).astype(np.uint8)
            out += np.float16(d).tobytes() + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
        elif kind == "Q4_1":
            lo, hi = b.min(), b.max()
            d = (hi - lo) / 15 or 1.0
            q = np.clip(np.round((b - lo) / d), 0, 15).astype(np.uint8)
            out += np.float16(d).tobytes() + np.float16(lo).tobytes() + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
    return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<Ii", 5, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _str(v)
    if isinstance(v, list):
        if all(isinstance(e, str) for e in v):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_str(e) for e in v)
        return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(type(v))


def write_gguf(path, metadata: dict, tensors: dict[str, tuple[np.ndarray, str]], align: int = 32) -> None:
    """tensors: name -> (array in torch order [out, in], ggml type name)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_str(k) + _value(v) for k, v in metadata.items())
    datas, offset, infos = [], 0, b""
    for name, (arr, kind) in tensors.items():
        raw = quantize(arr, kind)
        dims = list(reversed(arr.shape))
        infos += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", TYPE_IDS[kind], offset)
        pad = (-len(raw)) % align
        datas.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    blob = head + infos
    blob += b"\0" * ((-len(blob)) % align)
    with open(path, "wb") as f:
        f.write(blob + b"".join(datas))
