"""A Llama-family transformer in plain torch, reading and writing a paged KV cache."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmode import kernels
from fastmode.config import ModelArch
from fastmode.model.batch import ForwardBatch, NativeRows
from fastmode.model.kv_cache import KVCache


class QLinear(nn.Module):
    """A linear layer whose weight stays in its GGUF block format (Q4_1 or Q8_0) and runs on
    the native kernel. Each output row depends only on its input row, so results are the same
    bit for bit in any batch: no padding is needed for batch invariance."""

    row_invariant = True

    def __init__(self, wtype: int, raw: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        lib = kernels.load()
        if lib is None:
            raise kernels.KernelError("the native kernels are not available")
        self.lib, self.wtype = lib, wtype
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("raw", kernels.pack(wtype, raw))  # [out_features, row bytes] uint8, packed
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def run(self, x: torch.Tensor, prologue: int = kernels.PRO_NONE, norm: RMSNorm | None = None,
            out: torch.Tensor | None = None, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """The layer with a fused prologue (kernels.PRO_*; `norm` for PRO_RMSNORM) and, with
        `out`, the result added into `out` in place (a residual connection). With `argmax`
        (int64, one per row; not for a biased layer), each result row's argmax goes into it."""
        if self.bias is not None and (out is not None or argmax is not None):
            raise ValueError("a biased layer cannot accumulate or give its argmax")
        y = kernels.matmul(self.lib, self.wtype, self.raw, self.out_features, self.in_features, x, prologue,
                           None if norm is None else norm.weight, 0.0 if norm is None else norm.eps, out, argmax)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half layout (Hugging Face convention)."""

    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv)
        self.register_buffer("cos", torch.cat([freqs, freqs], dim=-1).cos().float(), persistent=False)
        # sin with the rotate-half sign folded in: x * cos + swap_halves(x) * signed_sin
        self.register_buffer("signed_sin", torch.cat([-freqs, freqs], dim=-1).sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at these positions, [T, 1, head_dim], for every layer of a pass."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim]
        half = x.shape[-1] // 2  # tables stay float32; the result takes x's dtype
        return (x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.qkv = nn.Linear(arch.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=arch.qkv_bias)
        self.o = nn.Linear(self.h * self.d, arch.hidden_size, bias=False)
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch,
                cache: KVCache) -> torch.Tensor:
        t, h, hkv, d = x.shape[0], self.h, self.hkv, self.d
        qkv = self.qkv(x)
        qk = Rotary.apply(qkv[:, :(h + hkv) * d].view(t, h + hkv, d), *rope)  # q and k heads together
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
        n = batch.num_real
        cache.write(self.layer, batch.slot_mapping, k[:n], v[:n])
        return self.o(self.attend(q, batch, cache, None).view(t, h * d))

    def attend(self, q: torch.Tensor, batch: ForwardBatch, cache: KVCache, lib: Any) -> torch.Tensor:
        """Attention of rotated queries q [T, heads, head_dim] over the cache (this pass's keys
        already written) -> [T, heads, head_dim]. With `lib` (a native model, whose passes all
        carry DecodeRows) every row attends straight from the cache in one kernel call."""
        t, h, hkv, d = q.shape[0], self.h, self.hkv, self.d
        if lib is not None:
            if batch.decode is None:
                raise ValueError("a pass on the native kernels needs its DecodeRows (Runner.build makes them)")
            return kernels.attention_rows(lib, q, cache.k[self.layer], cache.v[self.layer], *batch.decode.tensors,
                                          self.scale)
        out = q.new_zeros(t, h, d)
        group = h // hkv
        for seg in batch.segments:
            rows = slice(seg.row_start, seg.row_start + seg.num_rows)
            keys, values = cache.gather(self.layer, seg.kv_slots)  # [L, hkv, d], in the weights' dtype
            if seg.is_prefill:
                # One causal attention over the chunk; chunks are aligned to absolute
                # positions, so both lanes see identical shapes for the same prompt.
                qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
                ks = keys.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0)
                vs = values.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask)
                out[rows] = o[0].transpose(0, 1)
            else:
                # One query row at a time over exactly the keys it may see: the shapes,
                # and so the float results, do not depend on how many rows are verified.
                kt = keys.permute(1, 2, 0)  # [hkv, d, L]
                vt = values.transpose(0, 1)  # [hkv, L, d]
                for j in range(seg.num_rows):
                    length = seg.start_pos + j + 1
                    qr = q[seg.row_start + j].reshape(hkv, group, d) * self.scale
                    p = torch.softmax(qr @ kt[:, :, :length], dim=-1)  # [hkv, group, L]
                    out[seg.row_start + j] = (p @ vt[:, :length]).view(h, d)
        return out


class MLP(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.inter = arch.intermediate_size
        self.gate_up = nn.Linear(arch.hidden_size, 2 * self.inter, bias=False)
        self.down = nn.Linear(self.inter, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.attn = Attention(arch, layer)
        self.mlp_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward_native(self, x: torch.Tensor, rope: Rotary, batch: ForwardBatch, cache: KVCache,
                       lib: Any) -> torch.Tensor:
        """The block on the native kernels, updating x in place: norms fused into the next
        projection, rope and the cache write in one call, residuals added by the projections."""
        a, mlp, t = self.attn, self.mlp, x.shape[0]
        qkv = a.qkv.run(x, kernels.PRO_RMSNORM, self.attn_norm)  # type: ignore[operator]
        kernels.rope_store(lib, qkv, a.h, a.hkv, a.d, rope.cos, rope.signed_sin, batch.positions,
                           batch.slot_mapping, batch.num_real, cache.k[a.layer], cache.v[a.layer])
        out = a.attend(qkv[:, :a.h * a.d].view(t, a.h, a.d), batch, cache, lib)
        a.o.run(out.view(t, a.h * a.d), out=x)  # type: ignore[operator]
        gate_up = mlp.gate_up.run(x, kernels.PRO_RMSNORM, self.mlp_norm)  # type: ignore[operator]
        mlp.down.run(gate_up, kernels.PRO_SWIGLU, out=x)  # type: ignore[operator]
        return x

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch,
                cache: KVCache) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, batch, cache)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.blocks = nn.ModuleList(Block(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = Rotary(arch.head_dim, arch.max_position, arch.rope_theta)
        self.native = False  # every block runs on the native kernels (see `use_native`)
        self._table: torch.Tensor | None = None  # the blocks' weights for kernels.blocks
        self._dims: torch.Tensor | None = None
        self._num_slots = -1  # the cache slots _dims holds
        self._eps, self._scale = arch.rms_norm_eps, 0.0  # the blocks' norm eps and attention scale (use_native)

    def use_native(self) -> bool:
        """Run blocks on the native kernels if every block projection is a bias-free QLinear;
        returns whether it does."""
        layers = [m for b in self.blocks for m in (b.attn.qkv, b.attn.o, b.mlp.gate_up, b.mlp.down)]
        # o and down add into the residual in place, which a bias would spoil (qkv may have one)
        self.native = (kernels.load() is not None and self.arch.head_dim % 8 == 0
                       and all(isinstance(m, QLinear) for m in layers)
                       and all(b.attn.o.bias is None and b.mlp.down.bias is None for b in self.blocks))
        if self.native:
            self._table = kernels.layer_table([{
                "qkv": b.attn.qkv.raw, "o": b.attn.o.raw, "gate_up": b.mlp.gate_up.raw, "down": b.mlp.down.raw,
                "qkv_type": b.attn.qkv.wtype, "o_type": b.attn.o.wtype, "gate_up_type": b.mlp.gate_up.wtype,
                "down_type": b.mlp.down.wtype, "attn_norm": b.attn_norm.weight.data,
                "mlp_norm": b.mlp_norm.weight.data, "qkv_bias": None if b.attn.qkv.bias is None else b.attn.qkv.bias.data,
            } for b in self.blocks])  # type: ignore[union-attr]
            a = self.arch
            self._dims = torch.tensor([a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size,
                                       a.max_position, 0], dtype=torch.int64)
            self._num_slots = -1
            self._eps, self._scale = self.blocks[0].attn_norm.eps, self.blocks[0].attn.scale
        return self.native

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the float model to `device` in `dtype` (the rotary tables stay float32). A
        model on the native kernels runs on the CPU in float32 only."""
        if any(isinstance(m, QLinear) for m in self.modules()):  # native models among them
            if device.type != "cpu" or dtype != torch.float32:
                raise ValueError(f"a model on the native kernels runs on the CPU in float32, not {device} "
                                 f"{str(dtype).removeprefix('torch.')}: load it without native kernels")
            return
        self.to(device=device, dtype=dtype)
        self.rope.float()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV cache's dtype: f16 on the native kernels, else the weights' dtype."""
        return kernels.KV_DTYPE if self.native else self.embed.weight.dtype

    @property
    def fuses_argmax(self) -> bool:
        """Whether `forward` can write each logit row's argmax as it computes the logits (the
        head on the native kernels)."""
        return isinstance(self.lm_head, QLinear) and self.lm_head.bias is None

    @property
    def one_call(self) -> bool:
        """Whether passes run every block in one native call (`forward_rows`); else `forward`."""
        return self.native and self._table is not None and self._dims is not None

    def forward_rows(self, rows: NativeRows, cache: KVCache, taps: tuple[int, ...] = (),
                     argmax: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`forward` on the native kernels for a pass the runner laid out as NativeRows: the
        embedding rows, every block in one kernel call (one per tap range) and the head, with no
        torch op per row. Returns logits for `rows.logit_rows` (none: an empty tensor, the head
        is not run) and, with `taps`, the residual stream after those blocks at those rows."""
        if not self.one_call:
            raise ValueError("forward_rows needs a model on the native kernels (use_native)")
        lib = kernels.load()
        assert lib is not None and self._table is not None and self._dims is not None
        if self._num_slots != cache.k.shape[1]:
            self._num_slots = self._dims[6] = cache.k.shape[1]
        x = kernels.embed_rows(lib, self.embed.weight, rows.ints, rows.rows)
        picked = None if rows.logit_rows is None else torch.tensor(rows.logit_rows, dtype=torch.long)
        tapped: list[torch.Tensor] = []
        start = 0
        for end in dict.fromkeys([*(t + 1 for t in taps), len(self.blocks)]):
            if end > start:
                kernels.blocks(lib, self._table, self._dims, self._eps, self._scale, x, self.rope.cos,
                               self.rope.signed_sin, rows.ints, rows.slots, rows.kv_slots, cache.k, cache.v, start, end)
            if end - 1 in taps:
                tapped.append(x.clone() if picked is None else x[picked])
            start = end
        head_in = x if picked is None else x[picked]
        if len(head_in) == 0:  # a prompt chunk short of the prompt's end: no logits wanted
            logits = torch.empty(0, self.arch.vocab_size)
        elif isinstance(self.lm_head, QLinear):  # the final norm fused into the head
            logits = self.lm_head.run(head_in, kernels.PRO_RMSNORM, self.norm, argmax=argmax)
        else:
            with torch.no_grad():  # a float head (the blocks' weights quantized, the head's not)
                logits = self.lm_head(self.norm(head_in))
        return (logits, torch.stack(tapped, dim=1)) if taps else logits

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache, taps: tuple[int, ...] = (),
                argmax: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the batch; return logits for `batch.logit_rows`: [len(logit_rows), vocab]. With
        `taps` (block indices, ascending), also the residual stream after each of those blocks
        at the logit rows: (logits, [len(logit_rows), len(taps), hidden]). With `argmax` (int64
        [len(logit_rows)]; only where `fuses_argmax`), each logit row's argmax is written into it.
        On the native kernels this is the block-by-block path (the runner uses `forward_rows`)."""
        if argmax is not None and not self.fuses_argmax:
            raise ValueError("this model's head cannot give the logits' argmax")
        x = torch.index_select(self.embed.weight, 0, batch.input_ids)  # [T, hidden]
        lib = kernels.load() if self.native else None
        tapped: list[torch.Tensor] = []
        rope = None if lib is not None else self.rope.tables(batch.positions)
        for i, block in enumerate(self.blocks):
            x = block.forward_native(x, self.rope, batch, cache, lib) if lib is not None else block(x, rope, batch, cache)
            if i in taps:
                tapped.append(x[batch.logit_rows])
        if isinstance(self.lm_head, QLinear):  # the final norm fused into the head, on the native kernel
            logits = self.lm_head.run(x if batch.every_row else x[batch.logit_rows], kernels.PRO_RMSNORM, self.norm,
                                      argmax=argmax)
        else:
            logits = self.lm_head(self.norm(x[batch.logit_rows]))
        return (logits, torch.stack(tapped, dim=1)) if taps else logits
