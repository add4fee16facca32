"""A Llama-family transformer in plain torch, reading and writing a paged KV cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmode.config import ModelArch
from fastmode.model.batch import ForwardBatch
from fastmode.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half layout (Hugging Face convention)."""

    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)  # [max_position, head_dim]
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim]
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.qkv = nn.Linear(arch.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=arch.qkv_bias)
        self.o = nn.Linear(self.h * self.d, arch.hidden_size, bias=False)
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, rope: Rotary, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = rope(q.view(t, self.h, self.d), batch.positions)
        k = rope(k.view(t, self.hkv, self.d), batch.positions)
        v = v.view(t, self.hkv, self.d)
        n = batch.num_real
        cache.write(self.layer, batch.slot_mapping, k[:n], v[:n])
        out = torch.zeros(t, self.h, self.d)
        group = self.h // self.hkv
        for seg in batch.segments:
            keys, values = cache.gather(self.layer, seg.kv_slots)  # [L, hkv, d]
            rows = slice(seg.row_start, seg.row_start + seg.num_rows)
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
                    qr = q[seg.row_start + j].view(self.hkv, group, self.d) * self.scale
                    p = torch.softmax(qr @ kt[:, :, :length], dim=-1)  # [hkv, group, L]
                    out[seg.row_start + j] = (p @ vt[:, :length]).view(self.h, self.d)
        return self.o(out.view(t, self.h * self.d))


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

    def forward(self, x: torch.Tensor, rope: Rotary, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
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

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Run the batch; return logits for `batch.logit_rows`: [len(logit_rows), vocab]."""
        x = self.embed(batch.input_ids)  # [T, hidden]
        for block in self.blocks:
            x = block(x, self.rope, batch, cache)
        x = self.norm(x[batch.logit_rows])
        return self.lm_head(x)
