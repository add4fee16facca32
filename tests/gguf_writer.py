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


def permute_rows(w, heads: int):
    """What llama.cpp's converter does to q/k rows (interleaved rope layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def hf_names(arch, sd):
    """Our state dict in Hugging Face Llama names."""
    h, kv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(arch.num_layers):
        o, p = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[o + "attn.qkv.weight"].split([h * d, kv * d, kv * d])
        gate, up = sd[o + "mlp.gate_up.weight"].split(arch.intermediate_size)
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": sd[o + "attn.o.weight"],
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": sd[o + "mlp.down.weight"],
                    p + "input_layernorm.weight": sd[o + "attn_norm.weight"],
                    p + "post_attention_layernorm.weight": sd[o + "mlp_norm.weight"]})
    return {k: v.contiguous() for k, v in out.items()}


def write_tiny_gguf(path, tok, arch, hf: dict, kind: str, embed_kind: str | None = None) -> None:
    """A Llama GGUF as llama.cpp writes it (names, q/k permutation, tokenizer metadata) from
    Hugging Face-named weights; matrices in `kind`, the embedding table in `embed_kind`."""
    vocab = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    from fastmode.weights.tiny import CHATML_TEMPLATE
    meta = {"general.architecture": "llama", "llama.block_count": arch.num_layers,
            "llama.context_length": arch.max_position, "llama.embedding_length": arch.hidden_size,
            "llama.feed_forward_length": arch.intermediate_size, "llama.attention.head_count": arch.num_heads,
            "llama.attention.head_count_kv": arch.num_kv_heads, "llama.rope.freq_base": arch.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": arch.rms_norm_eps, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.token_type": [3 if v.startswith("<|") else 1 for v in vocab],
            "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": tok.hf.token_to_id("<|im_end|>"),
            "tokenizer.chat_template": CHATML_TEMPLATE}
    t = {"token_embd.weight": (hf["model.embed_tokens.weight"], embed_kind or kind),
         "output_norm.weight": (hf["model.norm.weight"], "F32")}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        t[f"blk.{i}.attn_q.weight"] = (permute_rows(hf[p + "self_attn.q_proj.weight"], arch.num_heads), kind)
        t[f"blk.{i}.attn_k.weight"] = (permute_rows(hf[p + "self_attn.k_proj.weight"], arch.num_kv_heads), kind)
        for ours, theirs in [("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            t[f"blk.{i}.{ours}.weight"] = (hf[p + theirs + ".weight"], kind)
        for ours, theirs in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
            t[f"blk.{i}.{ours}.weight"] = (hf[p + theirs + ".weight"], "F32")
    write_gguf(path, meta, {k: (v.numpy(), ty) for k, (v, ty) in t.items()})
