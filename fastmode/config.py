"""Frozen configuration dataclasses shared by every layer; imports nothing of ours."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelArch:
    """Shape of a Llama-family transformer (Llama, SmolLM2, Qwen2)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class DecodingDefaults:
    """Decoding used when a request does not (or, on API 2026-10-21, cannot) set it."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off


@dataclass(frozen=True)
class LaneConfig:
    """Scheduling limits of one lane (fast or standard)."""

    max_batch: int  # requests decoding together in one forward pass
    max_tokens_per_step: int  # prefill + decode tokens in one forward pass
    speculate: bool  # propose drafts and verify them

    def __post_init__(self) -> None:
        _at_least(self, max_batch=1, max_tokens_per_step=1)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: memory, threads, lanes."""

    num_threads: int = 0  # 0: torch's default (physical cores); native models then pick 1..that per pass size from measured pass times
    kv_cache_tokens: int = 65536
    block_size: int = 16
    prefill_chunk: int = 256  # prefill chunks end at multiples of this (absolute positions)
    max_waiting: int = 256  # a lane's queued requests beyond this are refused with 529 overloaded
    max_draft: int = 7  # most draft tokens verified in one step
    # Speculating lanes also draft with the model's trained draft head, if it has one. Off: on the
    # development CPU the packaged head's drafts did not pay for their cost (see the README).
    draft_head: bool = False
    # Speculating lanes also draft from the model's draft corpus (its own answers to training
    # prompts, searched for the context's suffix), if it has one.
    draft_corpus: bool = True
    # Speculating lanes also draft from the answers the engine gave earlier requests of the same
    # scope (the server's: organization, model, speed and end user; see engine/pool.py).
    draft_pool: bool = True
    # When both lanes are busy the fast lane gets enough passes per standard pass for its
    # requests to run at least `fast_share_target` times a standard stream's speed.
    fast_share_target: float = 2.5
    max_fast_steps_per_standard: int = 4
    invariant_numerics: bool = True  # pad rows so both lanes compute bit-identical logits
    fast: LaneConfig = field(default_factory=lambda: LaneConfig(4, 256, True))
    standard: LaneConfig = field(default_factory=lambda: LaneConfig(32, 256, False))
    # Where the float path runs and in what precision: "cpu" or "cuda" ("cuda:N"), and
    # "float32", "bfloat16" or "float16". The native kernels (quantized GGUF weights) are CPU
    # and float32 only; a model on them stays there.
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _at_least(self, num_threads=0, kv_cache_tokens=self.block_size, block_size=1, prefill_chunk=1,
                  max_waiting=0, max_draft=0, max_fast_steps_per_standard=1)
        if not self.fast_share_target > 0:
            raise ValueError(f"fast_share_target must be above 0, not {self.fast_share_target!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        base, _, index = self.device.partition(":") if isinstance(self.device, str) else ("", "", "")
        if base not in ("cpu", "cuda") or (index and (base == "cpu" or not index.isdigit())):
            raise ValueError(f"device must be \"cpu\", \"cuda\" or \"cuda:N\", not {self.device!r}")


DTYPES = ("float32", "bfloat16", "float16")


def _at_least(config: object, **least: int) -> None:
    """Each named setting a whole number of at least its least value."""
    for name, low in least.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number of at least {low}, not {value!r}")
