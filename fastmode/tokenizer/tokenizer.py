"""Text <-> token ids, built from GGUF metadata or a tokenizer.json, plus incremental decoding."""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` name.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PATTERN = _QWEN2_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")  # numbers in groups of up to 3 digits
_CONTROL = 3  # GGUF token type of control (special) tokens
_USER_DEFINED = 4


class Tokenizer:
    """A byte-level BPE tokenizer with the model's special tokens and chat template."""

    def __init__(self, hf: HFTokenizer, eos_ids: list[int], bos_id: int | None, chat_template: str | None,
                 add_bos: bool = False) -> None:
        self.hf = hf
        self.eos_ids = eos_ids
        self.bos_id = bos_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: its vocabulary entry's length (a
        byte-level entry has a character per byte, a character takes a byte at least, and a
        byte-fallback entry such as <0x41> is longer than its one byte)."""
        return max((len(t) for t in self.hf.get_vocab(with_added_tokens=True)), default=1) or 1

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), without tokenizing: the text as the tokenizer's
        normalizer leaves it (which may shorten it, e.g. NFC), in characters, over
        max_token_chars."""
        normalizer = self.hf.normalizer
        n = len(normalizer.normalize_str(text)) if normalizer is not None else len(text)
        return -(-n // self.max_token_chars)

    def token_text(self, token_id: int) -> str:
        return self.hf.id_to_token(token_id) or ""

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_ends(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and, per token, the offset in `text` (in characters) where it ends."""
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, [end for _, end in enc.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre in ("qwen2", "llama3", "llama-bpe", "smaug-bpe"):
            split = pre_tokenizers.Split(Regex(_QWEN2_PATTERN if pre == "qwen2" else _LLAMA3_PATTERN),
                                         behavior="isolated")
            hf.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            seq = [pre_tokenizers.Split(Regex(_GPT2_PATTERN), behavior="isolated")]
            if pre == "smollm":  # SmolLM splits every digit on its own
                seq.insert(0, pre_tokenizers.Digits(individual_digits=True))
            seq.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
            hf.pre_tokenizer = pre_tokenizers.Sequence(seq)
        hf.decoder = decoders.ByteLevel()
        # Control tokens are special (skipped when decoding); user-defined ones, such as
        # Qwen's <tool_call>, are whole tokens that stay in the text.
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t == _CONTROL])
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, t in enumerate(types) if t == _USER_DEFINED])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [int(eos)] if eos is not None else []
        for extra in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            if extra in vocab and vocab[extra] not in eos_ids and extra_is_end(extra, meta):
                eos_ids.append(vocab[extra])
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(hf, eos_ids, int(bos) if bos is not None else None, meta.get("tokenizer.chat_template"),
                   bool(meta.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise ValueError(f"{path}: tokenizer.json is missing")
        hf = HFTokenizer.from_file(str(tok_file))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        eos_ids = []
        for key in ("eos_token",):
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok and hf.token_to_id(tok) is not None:
                eos_ids.append(hf.token_to_id(tok))
        gen_file = path / "generation_config.json"
        if gen_file.exists():
            gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
            for e in gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []:
                if e not in eos_ids:
                    eos_ids.append(int(e))
        bos = cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return cls(hf, eos_ids, hf.token_to_id(bos) if bos else None, template, bool(cfg.get("add_bos_token", False)))


def extra_is_end(token: str, meta: dict[str, Any]) -> bool:
    """Chat-turn end tokens end generation when the chat template uses them."""
    return token in (meta.get("tokenizer.chat_template") or "")


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already emitted
        self.read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete multi-byte character: wait for more tokens
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]
