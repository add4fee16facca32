"""Turn a weight source (GGUF file, Hugging Face directory, tiny-random) into our state dict."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmode.config import ModelArch
from fastmode.weights.gguf import GGUFError, GGUFFile

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")


class WeightsError(ValueError):
    """The weights cannot be loaded (unsupported architecture, missing tensor, bad file)."""


def arch_from_gguf(meta: dict[str, Any]) -> ModelArch:
    a = meta.get("general.architecture")
    if a not in SUPPORTED_GGUF_ARCHS:
        raise WeightsError(f"GGUF architecture {a!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHS)})")
    heads = int(meta[f"{a}.attention.head_count"])
    return ModelArch(
        vocab_size=int(meta.get(f"{a}.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        hidden_size=int(meta[f"{a}.embedding_length"]),
        num_layers=int(meta[f"{a}.block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{a}.attention.head_count_kv", heads)),
        intermediate_size=int(meta[f"{a}.feed_forward_length"]),
        rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta[f"{a}.attention.layer_norm_rms_epsilon"]),
        max_position=int(meta.get(f"{a}.context_length", 2048)),
        tie_embeddings=True,  # corrected below when the file has output.weight
        qkv_bias=a == "qwen2",
    )


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rope) back to rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class QuantWeight:
    """A linear layer's weight kept in GGUF blocks: ggml type id, uint8 [out rows, row bytes]."""

    type_id: int
    blocks: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]


Weight = torch.Tensor | QuantWeight


def load_gguf(path: Path, keep_quantized: bool = False) -> tuple[ModelArch, dict[str, Weight], dict[str, Any]]:
    """Return (arch, state dict in our names, GGUF metadata). With `keep_quantized`, the
    matrices of linear layers stored as Q4_0, Q4_1 or Q8_0 stay in their blocks (QuantWeight);
    everything else is dequantized to float32."""
    try:
        f = GGUFFile(path)
    except (GGUFError, OSError) as e:
        raise WeightsError(str(e)) from e
    arch = arch_from_gguf(f.metadata)
    tied = "output.weight" not in f.tensors
    arch = ModelArch(**{**arch.__dict__, "tie_embeddings": tied})
    permute = f.metadata["general.architecture"] == "llama"

    def get(name: str) -> torch.Tensor:
        if name not in f.tensors:
            raise WeightsError(f"{path}: tensor {name} is missing")
        return f.load(name)

    def matrix(names: list[str], heads: list[int | None]) -> Weight:
        """The row-wise concatenation of these matrices, q/k rows unpermuted; kept quantized
        when asked and all of them share one block type."""
        for name in names:
            if name not in f.tensors:
                raise WeightsError(f"{path}: tensor {name} is missing")
        parts = [f.load_blocks(n) for n in names] if keep_quantized else [None]
        if all(p is not None for p in parts) and len({p[0] for p in parts}) == 1:  # type: ignore[index]
            rows = [p[1] for p in parts]  # type: ignore[index]
            rows = [_unpermute(r, h) if h and permute else r for r, h in zip(rows, heads)]
            return QuantWeight(parts[0][0], torch.cat(rows), f.tensors[names[0]].shape[1])  # type: ignore[index]
        mats = [get(n) for n in names]
        mats = [_unpermute(m, h) if h and permute else m for m, h in zip(mats, heads)]
        return torch.cat(mats) if len(mats) > 1 else mats[0]

    sd: dict[str, Weight] = {"embed.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    sd["lm_head.weight"] = matrix(["token_embd.weight" if tied else "output.weight"], [None])
    if tied and not isinstance(sd["lm_head.weight"], QuantWeight):
        del sd["lm_head.weight"]  # the float table itself is the output projection
    for i in range(arch.num_layers):
        p, o = f"blk.{i}.", f"blocks.{i}."
        sd[o + "attn.qkv.weight"] = matrix([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
                                           [arch.num_heads, arch.num_kv_heads, None])
        if arch.qkv_bias:
            sd[o + "attn.qkv.bias"] = torch.cat([get(p + f"attn_{x}.bias") for x in "qkv"])
        sd[o + "attn.o.weight"] = matrix([p + "attn_output.weight"], [None])
        sd[o + "mlp.gate_up.weight"] = matrix([p + "ffn_gate.weight", p + "ffn_up.weight"], [None, None])
        sd[o + "mlp.down.weight"] = matrix([p + "ffn_down.weight"], [None])
        sd[o + "attn_norm.weight"] = get(p + "attn_norm.weight")
        sd[o + "mlp_norm.weight"] = get(p + "ffn_norm.weight")
    return arch, sd, f.metadata


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    mtype = cfg.get("model_type", "llama")
    if mtype not in ("llama", "qwen2", "mistral"):
        raise WeightsError(f"model_type {mtype!r} is not supported (supported: llama, qwen2, mistral)")
    heads = int(cfg["num_attention_heads"])
    return ModelArch(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        intermediate_size=int(cfg["intermediate_size"]),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mtype == "qwen2" or bool(cfg.get("attention_bias", False)),
    )


def load_hf_dir(path: Path) -> tuple[ModelArch, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise WeightsError(f"{path}: config.json is missing")
    arch = arch_from_hf_config(json.loads(cfg_path.read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no .safetensors files")
    hf: dict[str, torch.Tensor] = {}
    for fp in files:
        hf.update(load_file(str(fp)))

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise WeightsError(f"{path}: tensor {name} is missing")
        return hf[name].float()

    sd = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not arch.tie_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    for i in range(arch.num_layers):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        sd[o + "attn.qkv.weight"] = torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if arch.qkv_bias:
            sd[o + "attn.qkv.bias"] = torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        sd[o + "attn.o.weight"] = get(p + "self_attn.o_proj.weight")
        sd[o + "mlp.gate_up.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        sd[o + "mlp.down.weight"] = get(p + "mlp.down_proj.weight")
        sd[o + "attn_norm.weight"] = get(p + "input_layernorm.weight")
        sd[o + "mlp_norm.weight"] = get(p + "post_attention_layernorm.weight")
    return arch, sd
