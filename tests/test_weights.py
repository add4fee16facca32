"""GGUF and Hugging Face loading: dequantization, q/k un-permutation, tokenizer metadata."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gguf_writer import write_gguf
from fastmode.weights.gguf import GGUFFile
from fastmode.weights.loader import WeightsError
from fastmode.weights.registry import ModelNotFound, load_model
from fastmode.weights.tiny import CHATML_TEMPLATE, tiny_arch, tiny_state_dict, tiny_tokenizer


@pytest.mark.parametrize("kind,tol", [("F32", 0.0), ("F16", 1e-3), ("Q8_0", 0.02), ("Q4_0", 0.2), ("Q4_1", 0.1)])
def test_dequantize_round_trip(tmp_path, kind, tol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    write_gguf(tmp_path / "t.gguf", {"general.architecture": "llama"}, {"w": (x, kind)})
    got = GGUFFile(tmp_path / "t.gguf").load("w").numpy()
    assert got.shape == (8, 64)
    err = np.abs(got - x).max() / np.abs(x).max()
    assert err <= tol, err


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows (interleaved rope layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _hf_names(arch, sd):
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


def test_gguf_and_hf_directory_load_the_same_model(tmp_path):
    tok = tiny_tokenizer()
    arch = tiny_arch(tok.vocab_size)
    sd = tiny_state_dict(arch, seed=3)
    hf = _hf_names(arch, sd)
    # Hugging Face directory
    d = tmp_path / "hf"
    d.mkdir()
    save_file(hf, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads, "intermediate_size": arch.intermediate_size,
        "rope_theta": arch.rope_theta, "rms_norm_eps": arch.rms_norm_eps,
        "max_position_embeddings": arch.max_position, "tie_word_embeddings": True}))
    tok.hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>"}))
    # GGUF with llama.cpp's names and q/k permutation
    vocab = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    meta = {"general.architecture": "llama", "llama.block_count": arch.num_layers,
            "llama.context_length": arch.max_position, "llama.embedding_length": arch.hidden_size,
            "llama.feed_forward_length": arch.intermediate_size, "llama.attention.head_count": arch.num_heads,
            "llama.attention.head_count_kv": arch.num_kv_heads, "llama.rope.freq_base": arch.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": arch.rms_norm_eps, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.token_type": [3 if v.startswith("<|") else 1 for v in vocab],
            "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": tok.hf.token_to_id("<|im_end|>"),
            "tokenizer.chat_template": CHATML_TEMPLATE}
    t = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        t[f"blk.{i}.attn_q.weight"] = _permute(hf[p + "self_attn.q_proj.weight"], arch.num_heads)
        t[f"blk.{i}.attn_k.weight"] = _permute(hf[p + "self_attn.k_proj.weight"], arch.num_kv_heads)
        for ours, theirs in [("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
                             ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
            t[f"blk.{i}.{ours}.weight"] = hf[p + theirs + ".weight"]
    write_gguf(tmp_path / "m.gguf", meta, {k: (v.numpy(), "F32") for k, v in t.items()})

    a, b = load_model(str(d)), load_model(str(tmp_path / "m.gguf"))
    assert a.arch == dataclasses.replace(b.arch, rms_norm_eps=a.arch.rms_norm_eps)  # GGUF stores eps as f32
    assert b.arch.rms_norm_eps == pytest.approx(a.arch.rms_norm_eps)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    text = "<|im_start|>user\nhello, wörld 42<|im_end|>"
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    assert a.tokenizer.decode(a.tokenizer.encode(text)) == "user\nhello, wörld 42"
    assert a.tokenizer.eos_ids == b.tokenizer.eos_ids == [tok.hf.token_to_id("<|im_end|>")]


def test_clear_errors_for_bad_model_sources(tmp_path):
    with pytest.raises(ModelNotFound, match="nope"):
        load_model("nope")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\0" * 64)
    with pytest.raises(WeightsError, match="not a GGUF"):
        load_model(str(bad))
    write_gguf(tmp_path / "y.gguf", {"general.architecture": "mamba"}, {})
    with pytest.raises(WeightsError, match="mamba"):
        load_model(str(tmp_path / "y.gguf"))


def _bpe_meta(pre: str, extra_tokens: list[tuple[str, int]]) -> dict:
    tok = tiny_tokenizer()
    vocab = [tok.hf.id_to_token(i) for i in range(256)] + ["12", "123"] + [t for t, _ in extra_tokens]
    types = [1] * 258 + [ty for _, ty in extra_tokens]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": vocab,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": ["1 2", "12 3"]}


def test_pre_tokenizer_digit_grouping_per_family():
    from fastmode.tokenizer.tokenizer import Tokenizer

    def pieces(pre):
        t = Tokenizer.from_gguf_metadata(_bpe_meta(pre, []))
        return [t.hf.id_to_token(i) for i in t.encode("12345")]

    assert pieces("llama-bpe") == ["123", "4", "5"]  # digits in groups of up to three
    assert pieces("qwen2") == ["1", "2", "3", "4", "5"]  # one digit at a time
    assert pieces("smollm") == ["1", "2", "3", "4", "5"]


def test_user_defined_tokens_stay_in_decoded_text_control_tokens_do_not():
    from fastmode.tokenizer.tokenizer import Tokenizer

    t = Tokenizer.from_gguf_metadata(_bpe_meta("qwen2", [("<tool_call>", 4), ("<|im_end|>", 3)]))
    ids = t.encode("<tool_call>x<|im_end|>")
    assert len(ids) == 3
    assert t.decode(ids) == "<tool_call>x"


def test_incremental_decoder_holds_split_characters_and_flushes_at_the_end():
    from fastmode.tokenizer.tokenizer import IncrementalDecoder

    tok = tiny_tokenizer()
    ids = tok.encode("aé")  # byte tokens: 'a', then the two bytes of 'é'
    assert len(ids) == 3
    d = IncrementalDecoder(tok)
    assert d.push(ids[:1]) == "a"
    assert d.push(ids[1:2]) == ""  # the first byte of 'é' alone is held back
    assert d.push(ids[2:]) == "é"
    d2 = IncrementalDecoder(tok)
    assert d2.push(ids[:1]) == "a" and d2.push(ids[1:2]) == ""
    assert d2.flush() == "\ufffd"  # output cut inside a character: not silently dropped
