"""`tiny-random`: a small seeded random-weight Llama with a byte-level tokenizer, for tests."""
from __future__ import annotations

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from fastmode.config import ModelArch
from fastmode.tokenizer.tokenizer import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> Tokenizer:
    """256 byte tokens (no merges) followed by the three ChatML special tokens."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_chars.sort()
    vocab = {c: i for i, c in enumerate(byte_chars)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    eos = [hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|im_end|>")]
    return Tokenizer(hf, eos, None, CHATML_TEMPLATE)


def tiny_arch(vocab_size: int) -> ModelArch:
    return ModelArch(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5, max_position=2048,
                     tie_embeddings=True)


def tiny_state_dict(arch: ModelArch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights scaled so logits are peaked enough to make greedy output vary with input."""
    g = torch.Generator().manual_seed(seed)
    h, hd = arch.hidden_size, arch.head_dim

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"embed.weight": rnd(arch.vocab_size, h, std=1.0), "norm.weight": torch.ones(h)}
    for i in range(arch.num_layers):
        o = f"blocks.{i}."
        sd[o + "attn.qkv.weight"] = rnd((arch.num_heads + 2 * arch.num_kv_heads) * hd, h, std=h ** -0.5)
        sd[o + "attn.o.weight"] = rnd(h, arch.num_heads * hd, std=h ** -0.5)
        sd[o + "mlp.gate_up.weight"] = rnd(2 * arch.intermediate_size, h, std=h ** -0.5)
        sd[o + "mlp.down.weight"] = rnd(h, arch.intermediate_size, std=arch.intermediate_size ** -0.5)
        sd[o + "attn_norm.weight"] = torch.ones(h)
        sd[o + "mlp_norm.weight"] = torch.ones(h)
    return sd
