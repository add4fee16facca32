"""Native CPU kernels: weight-only quantized matrix products on GGUF blocks (`qmatmul.c`).

The C source ships with the package and is compiled at first use with the system's C
compiler into the fastmode cache (`$FASTMODE_CACHE/kernels`, by default
`~/.cache/fastmode/kernels`), keyed by the source, the compiler and the CPU, then loaded with
ctypes. Without a compiler, `load()` returns None and the model runs its float weights in torch.
"""
from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("fastmode.kernels")

SOURCE = Path(__file__).with_name("qmatmul.c")
Q4_1, Q8_0 = 3, 8  # ggml type ids the kernel reads
BLOCK = 32
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}
# -ffp-contract=off: the compiler must not fuse a*b+c on its own, differently in each code
# path; the fused multiply-adds the kernels want are written as intrinsics. Tried in order.
_COMMON = ["-O3", "-ffp-contract=off", "-Werror=implicit-function-declaration"]
_FLAG_SETS = ([*_COMMON, "-march=native", "-pthread"], [*_COMMON, "-march=native"], [*_COMMON, "-pthread"], _COMMON)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_local = threading.local()  # per calling thread: the kernels' thread count (see set_threads)


def threads() -> int:
    """Threads the kernels run on when called from this thread: `set_threads`'s count, else
    torch's."""
    return getattr(_local, "threads", 0) or torch.get_num_threads()


def set_threads(n: int) -> None:
    """From now on, calls from this thread run the kernels on n threads of the library's own
    pool (0: torch's thread count again). The pool is not torch's: a pass can run with torch
    on one thread, so that no idle OpenMP thread of torch's spins while the kernels work."""
    _local.threads = n


class KernelError(RuntimeError):
    """The native kernels were required but could not be built or loaded."""


def cache_dir() -> Path:
    root = os.environ.get("FASTMODE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fastmode") / "kernels"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> Path:
    """The compiled library for this source, compiler and CPU: the first flag set that builds a
    library that loads. A cached build of an earlier flag set wins over a later one, and a
    fallback build does not stop the next start from trying the better flags again."""
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + version.encode() + _cpu_signature().encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for i, flags in enumerate(_FLAG_SETS):
        target = folder / f"qmatmul-{key}-{hashlib.sha256(repr(flags).encode()).hexdigest()[:8]}.so"
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            out = Path(tmp) / "qmatmul.so"
            error = _compile(cc, flags, out)
            if error is None:
                os.replace(out, target)  # atomic: concurrent builders each write a whole file
                (log.info if i == 0 else log.warning)("built the native kernels (%s)", " ".join(flags))
                return target
            errors.append(error)
    raise KernelError("could not compile the native kernels:\n" + "\n".join(errors))


def _compile(cc: str, flags: list[str], out: Path) -> str | None:
    """Build this source into the library `out`; None if it built and loads (no unresolved
    symbols), else what went wrong."""
    cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return f"{' '.join(cmd)}: {r.stderr.strip()[-400:]}"
    try:
        ctypes.CDLL(str(out))
    except OSError as e:
        return f"{' '.join(cmd)}: built but does not load: {e}"
    return None


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None if it cannot be built."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cc = _compiler()
        if cc is None:
            log.warning("no C compiler found: quantized weights are dequantized to float32 (slower)")
            return None
        try:
            lib = _declare(ctypes.CDLL(str(_build(cc))))
        except (KernelError, OSError) as e:
            log.warning("%s; quantized weights are dequantized to float32 (slower)", e)
            return None
        _lib = lib
        return lib


def build_with(extra_flags: list[str], folder: Path) -> ctypes.CDLL | None:
    """This source built into `folder` with the first flag set plus `extra_flags` (e.g.
    ["-mno-avx512f"]: another instruction-set path of the same kernels, for comparing them);
    None if that does not build or load. Never cached or used by `load`."""
    cc = _compiler()
    if cc is None:
        return None
    out = folder / "qmatmul-variant.so"
    if _compile(cc, [*_FLAG_SETS[0], *extra_flags], out) is not None:
        return None
    return _declare(ctypes.CDLL(str(out)))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the C signatures of the library's entry points; returns it."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fm_linear.restype = lib.fm_rope_store.restype = lib.fm_attn_rows.restype = ctypes.c_int
    lib.fm_linear.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int, ctypes.c_int, ptr,
                              ctypes.c_float, ctypes.c_int, ptr]
    lib.fm_rope_store.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, i64]
    lib.fm_attn_rows.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float, ptr,
                                 ctypes.c_int]
    lib.fm_blocks.restype = ctypes.c_int
    lib.fm_blocks.argtypes = [ptr, i64, ptr, ctypes.c_float, ctypes.c_float, ptr, i64, ptr, ptr, ptr, ptr, i64,
                              ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.fm_embed_rows.restype = ctypes.c_int
    lib.fm_embed_rows.argtypes = [ptr, i64, i64, ptr, i64, ptr]
    lib.fm_argmax_rows.restype = None
    lib.fm_argmax_rows.argtypes = [ptr, i64, i64, i64, ptr]
    lib.fm_has_avx2.restype = lib.fm_has_avx512.restype = lib.fm_has_vnni512.restype = ctypes.c_int
    lib.fm_row_interleaved.restype = ctypes.c_int
    lib.fm_row_interleaved.argtypes = [i64]
    return lib


PRO_NONE, PRO_RMSNORM, PRO_SWIGLU = 0, 1, 2  # what a linear layer does to its input first
KV_DTYPE = torch.float16  # the KV cache the kernels write and read (as llama.cpp keeps it by default)
GROUP = 8  # blocks whose scales the kernel reads together


def pack(wtype: int, blocks: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """GGUF blocks [rows, row bytes] -> the layout of the kernel library `lib` (default: the
    one `load` gives), same bytes, same size.

    Where the kernel reads rows W at a time (W = 16 on AVX-512 VNNI builds with rows % 16 == 0,
    else 8 on AVX2 builds with rows % 8 == 0): per W rows and block, their W f16 scales d,
    (Q4_1) W minimums m, then the values in 4-byte chunks, chunk-major (see qmatmul.c).
    Otherwise, per row: groups of 8 blocks with their scales (and minimums) first, then the
    values; the last row-blocks % 8 blocks stay as they are."""
    size = BLOCK_BYTES[wtype]
    rows = blocks.shape[0]
    nb = blocks.shape[1] // size
    header = 4 if wtype == Q4_1 else 2  # f16 d (and m) before the values
    lib = lib or load()
    width = lib.fm_row_interleaved(rows) if lib is not None else 0
    if width:
        b = blocks.reshape(rows // width, width, nb, size).transpose(1, 2)  # [row groups, block, row, bytes]
        chunks = (size - header) // 4
        parts = [b[..., 0:2].reshape(rows // width, nb, width * 2)]
        if wtype == Q4_1:
            parts.append(b[..., 2:4].reshape(rows // width, nb, width * 2))
        values = b[..., header:].reshape(rows // width, nb, width, chunks, 4).transpose(2, 3)
        parts.append(values.reshape(rows // width, nb, width * (size - header)))
        return torch.cat(parts, dim=-1).reshape(rows, nb * size).contiguous()
    g = nb // GROUP
    b = blocks.reshape(rows, nb, size)
    head = b[:, :g * GROUP].reshape(rows, g, GROUP, size)
    parts = [head[..., 0:2].reshape(rows, g, GROUP * 2)]  # 8 scales d
    if wtype == Q4_1:
        parts.append(head[..., 2:4].reshape(rows, g, GROUP * 2))  # 8 minimums m
    parts.append(head[..., header:].reshape(rows, g, GROUP * (size - header)))  # 8 blocks of values
    grouped = torch.cat(parts, dim=-1).reshape(rows, -1)
    return torch.cat([grouped, b[:, g * GROUP:].reshape(rows, -1)], dim=1).contiguous()


def matmul(lib: ctypes.CDLL, wtype: int, weight: torch.Tensor, n: int, k: int, x: torch.Tensor,
           prologue: int = PRO_NONE, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           out: torch.Tensor | None = None, argmax: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, k] float32 @ W^T -> [M, n], W an [n, k] matrix's blocks in `pack`'s layout (uint8).

    `prologue` PRO_RMSNORM applies an RMS norm (`norm_weight`, `eps`) to each x row first;
    PRO_SWIGLU takes x [M, 2k] = [gate | up] and uses silu(gate) * up. With `out` (contiguous
    [M, n] float32) the product is added into it (a residual connection) and `out` returned.
    With `argmax` (contiguous int64 [M], not with `out`), each result row's argmax is written
    into it as `argmax_rows` gives it, by the threads that computed the row's columns."""
    x = x.contiguous()
    m = x.shape[0]
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != (2 * k if prologue == PRO_SWIGLU else k):
        raise KernelError(f"matmul: x must be float32 [M, {k}] (or [M, {2 * k}] for SwiGLU), got "
                          f"{x.dtype} {list(x.shape)}")
    if weight.dtype != torch.uint8 or not weight.is_contiguous() or weight.numel() != n * (k // BLOCK) * BLOCK_BYTES[wtype]:
        raise KernelError(f"matmul: weight must be contiguous uint8 blocks of an [{n}, {k}] matrix")
    if prologue == PRO_RMSNORM and (norm_weight is None or norm_weight.numel() != k or not norm_weight.is_contiguous()):
        raise KernelError(f"matmul: the RMS-norm prologue needs a contiguous weight of {k} values")
    if out is not None and (out.shape != (m, n) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise KernelError(f"matmul: out must be contiguous float32 [{m}, {n}]")
    if argmax is not None and (out is not None or argmax.shape != (m,) or argmax.dtype != torch.int64
                               or not argmax.is_contiguous()):
        raise KernelError(f"matmul: argmax must be contiguous int64 [{m}], and not with out")
    y = torch.empty(m, n, dtype=torch.float32) if out is None else out
    rc = lib.fm_linear(wtype, weight.data_ptr(), n, k, x.data_ptr(), m, y.data_ptr(), threads(),
                       prologue, None if norm_weight is None else norm_weight.data_ptr(), eps, out is not None,
                       None if argmax is None else argmax.data_ptr())
    if rc != 0:
        raise KernelError(f"fm_linear failed ({rc}) for type {wtype}, [{m}, {k}] x [{n}, {k}]")
    return y


def argmax_rows(lib: ctypes.CDLL, x: torch.Tensor) -> list[int]:
    """torch.argmax(x, -1).tolist() for float32 CPU rows x [rows, n] (the first index of the
    largest value, or of the first NaN), on the calling thread alone."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or x.stride(1) != 1 or x.shape[1] == 0:
        raise KernelError(f"argmax_rows: x must be float32 CPU rows with contiguous values, got {x.dtype} "
                          f"{list(x.shape)} on {x.device}")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.fm_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out.tolist()


def rope_store(lib: ctypes.CDLL, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
               signed_sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, num_real: int,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Rotate qkv's q and k heads in place (rotate-half rope, tables [max_position, head_dim])
    and store the first `num_real` rows' k and v at their cache slots."""
    ok = (qkv.dtype == torch.float32 and qkv.is_contiguous() and qkv.shape[1] == (heads + 2 * kv_heads) * head_dim
          and positions.dtype == slots.dtype == torch.int64 and positions.is_contiguous() and slots.is_contiguous()
          and len(positions) >= qkv.shape[0] and len(slots) >= num_real
          and cos.is_contiguous() and signed_sin.shape == cos.shape and signed_sin.is_contiguous()
          and k_cache.dtype == v_cache.dtype == KV_DTYPE
          and k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape)
    if not ok:
        raise KernelError("rope_store: tensors of the wrong type or shape")
    rc = lib.fm_rope_store(qkv.data_ptr(), qkv.shape[0], heads, kv_heads, head_dim, cos.data_ptr(),
                           signed_sin.data_ptr(), cos.shape[0], positions.data_ptr(), slots.data_ptr(), num_real,
                           k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0])
    if rc != 0:
        raise KernelError(f"fm_rope_store failed ({rc}): a position or cache slot out of range")


def attention_rows(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                   offsets: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention, row by row, straight from the paged cache (no gather).

    q [rows, heads, head_dim] (rows may be strided, heads and head_dim contiguous); k, v one
    layer's cache [slots, kv_heads, head_dim] (contiguous, KV_DTYPE); row r attends to the `lengths[r]`
    keys whose slots are `slots[offsets[r]:]` (int64). Returns [rows, heads, head_dim]."""
    rows, heads, dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != dim:
        q = q.contiguous()
    if not (q.dtype == torch.float32 and k.dtype == v.dtype == KV_DTYPE and k.is_contiguous() and v.is_contiguous()
            and all(t.dtype == torch.int64 and t.is_contiguous() for t in (slots, offsets, lengths))
            and len(offsets) >= rows and len(lengths) >= rows):
        raise KernelError("attention_rows: tensors of the wrong type or layout")
    out = torch.empty(rows, heads, dim, dtype=torch.float32)
    rc = lib.fm_attn_rows(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), slots.data_ptr(),
                          offsets.data_ptr(), lengths.data_ptr(), rows, heads, k.shape[1], dim, scale,
                          out.data_ptr(), threads())
    if rc != 0:
        raise KernelError(f"fm_attn_rows failed ({rc})")
    return out


LAYER_FIELDS = 11  # per layer in `blocks`' table (the FM_* fields of fm_blocks in qmatmul.c)


def layer_table(layers: list[dict[str, torch.Tensor | int | None]]) -> torch.Tensor:
    """The int64 table `blocks` reads: per layer the packed qkv, o, gate_up and down weights,
    their types, the two norm weights and the qkv bias (None: no bias). The tensors must stay
    alive and in place while the table is used (the table holds their addresses)."""
    rows = []
    for layer in layers:
        tensors = [layer[k] for k in ("qkv", "o", "gate_up", "down", "attn_norm", "mlp_norm")]
        bias = layer["qkv_bias"]
        for t in [*tensors, *([bias] if bias is not None else [])]:
            if not (isinstance(t, torch.Tensor) and t.is_contiguous()):
                raise KernelError("layer_table: every weight must be a contiguous tensor")
        ptrs = [t.data_ptr() for t in tensors]  # type: ignore[union-attr]
        rows.append([*ptrs[:4], *(int(layer[k]) for k in ("qkv_type", "o_type", "gate_up_type", "down_type")),  # type: ignore[arg-type]
                     ptrs[4], ptrs[5], 0 if bias is None else bias.data_ptr()])  # type: ignore[union-attr]
    return torch.tensor(rows, dtype=torch.int64)


def embed_rows(lib: ctypes.CDLL, table: torch.Tensor, ints: array.array, rows: int) -> torch.Tensor:
    """The pass's input rows [rows, hidden]: the rows of `table` (float32 [vocab, hidden]) at the
    token ids `ints[:rows]` (an int64 array, as `blocks` reads it)."""
    if not (table.dtype == torch.float32 and table.dim() == 2 and table.is_contiguous() and table.device.type == "cpu"
            and ints.typecode == "q" and 0 < rows <= len(ints)):
        raise KernelError("embed_rows: a contiguous float32 table and int64 ids are needed")
    x = torch.empty(rows, table.shape[1], dtype=torch.float32)
    if lib.fm_embed_rows(table.data_ptr(), table.shape[0], table.shape[1], ints.buffer_info()[0], rows, x.data_ptr()):
        raise KernelError(f"embed_rows: a token id outside the vocabulary of {table.shape[0]}")
    return x


def blocks(lib: ctypes.CDLL, table: torch.Tensor, dims: torch.Tensor, eps: float, scale: float, x: torch.Tensor,
           cos: torch.Tensor, signed_sin: torch.Tensor, ints: array.array, slots: torch.Tensor, kv_slots: torch.Tensor,
           k_cache: torch.Tensor, v_cache: torch.Tensor, first: int = 0, last: int | None = None) -> None:
    """Transformer blocks [first, last) (default: all) of one pass in one call (fm_blocks), x
    [T, hidden] updated in place.

    `table` from `layer_table`; `dims` int64 [hidden, heads, kv_heads, head_dim, intermediate,
    max_position, num_slots]; caches [layers, num_slots, kv_heads, head_dim] KV_DTYPE. `ints`
    (array of int64, 4 T values: the rows' token ids, positions, key offsets and key counts, as
    the runner lays them out) is read in place: row t is at its position, its K/V go to slots[t],
    and it attends to counts[t] keys at kv_slots[offsets[t]:]."""
    t = x.shape[0]
    layers = table.shape[0]
    last = layers if last is None else last
    if not (x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2 and x.shape[1] == int(dims[0])
            and ints.typecode == "q" and len(ints) >= 4 * t and 0 <= first < last <= layers
            and slots.dtype == kv_slots.dtype == torch.int64 and slots.is_contiguous() and kv_slots.is_contiguous()
            and len(slots) >= t and k_cache.dtype == v_cache.dtype == KV_DTYPE
            and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
            and table.dtype == torch.int64 and table.dim() == 2 and table.shape[1] == LAYER_FIELDS
            and table.is_contiguous()
            and k_cache.shape[0] == layers and k_cache.shape[1] == int(dims[6])):
        raise KernelError("blocks: tensors of the wrong type or shape")
    at, layer = ints.buffer_info()[0], k_cache.stride(0) * k_cache.element_size()
    rc = lib.fm_blocks(table.data_ptr() + first * LAYER_FIELDS * 8, last - first, dims.data_ptr(), eps, scale,
                       x.data_ptr(), t, cos.data_ptr(), signed_sin.data_ptr(), at + 8 * t, slots.data_ptr(), t,
                       k_cache.data_ptr() + first * layer, v_cache.data_ptr() + first * layer, kv_slots.data_ptr(),
                       len(kv_slots), at + 16 * t, at + 24 * t, threads())
    if rc != 0:
        raise KernelError(f"fm_blocks failed ({rc})" + (": a position or cache slot out of range" if rc == -1 else ""))
