"""A small trained network that drafts tokens for the fast lane from the model's own features.

After a pass, the model's residual stream at a request's latest position (after a few of its
blocks, low, middle and last: the head's taps) and the token the model just produced there say
a lot about the token after that. The head fuses the tapped states into one feature g_t, maps
(g_t, embedding of token x_{t+1}) to a prediction of the next feature g_{t+1}, reads a draft
token off it with the model's own output matrix (restricted to the tokens the model commonly
produces), and goes on from its own prediction for further drafts:

    g_t = W_fuse [m_1(tap_1) ; ... ; m_n(tap_n)]          (m_i: RMS norms)
    z = W_in [g_t ; E[x_{t+1}]]
    z = z + W_down (silu(W_gate n1(z)) * W_up n1(z))
    g_{t+1} ~ n2(z),   x_{t+2} = argmax over the vocabulary subset of E_sub n2(z)

Drafts are only proposals: the model verifies them, so what the fast lane outputs does not
depend on the head (EAGLE-style drafting with fused multi-layer features, one MLP layer, no
attention).

On the native kernels its matrices run as Q8_0 (quantized once, at load) and the last norm is
fused into the output matrix, as in the model; otherwise in float32 torch.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastmode import kernels
from fastmode.model.llama import QLinear, RMSNorm

FORMAT = "fastmode-draft-head-1"


class DraftHeadError(ValueError):
    """A draft head file that does not fit its model."""


class DraftHead(nn.Module):
    def __init__(self, hidden: int, inter: int, vocab: torch.Tensor, embed: torch.Tensor, taps: tuple[int, ...],
                 eps: float = 1e-5) -> None:
        """`vocab`: the token ids drafts are chosen from; `embed`: the model's input embedding
        [vocab_size, hidden], which (tied to the output matrix, as in the models the heads are
        trained for) also gives the output rows; `taps`: the blocks (ascending) after which the
        head reads the model's residual stream."""
        super().__init__()
        if embed.dim() != 2 or embed.shape[1] != hidden:
            raise DraftHeadError(f"the model's embedding is {list(embed.shape)}; the head wants [*, {hidden}]")
        if vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= embed.shape[0]:
            raise DraftHeadError(f"the head's vocabulary does not fit the model's {embed.shape[0]} tokens")
        if not taps or list(taps) != sorted(set(taps)) or taps[0] < 0:
            raise DraftHeadError(f"taps must be ascending block indices, not {taps}")
        self.hidden, self.inter, self.eps, self.taps = hidden, inter, eps, tuple(taps)
        self.tap_norms = nn.ModuleList(RMSNorm(hidden, eps) for _ in taps)
        self.fuse = nn.Linear(len(taps) * hidden, hidden, bias=False)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.n1 = RMSNorm(hidden, eps)
        self.n2 = RMSNorm(hidden, eps)
        self.register_buffer("vocab", vocab.to(torch.long), persistent=False)
        self.embed = embed.detach()  # the model's, shared (not a parameter of the head)
        self.native: dict[str, QLinear] = {}

    # ---- the network -------------------------------------------------------------------------
    def features(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm z for features g [R, hidden] and tokens x [R] (float torch; trains too)."""
        z = self.fc(torch.cat([g, self.embed[x]], dim=-1))
        y = self.n1(z)
        gate, up = self.gate_up(y).split(self.inter, dim=-1)
        return z + self.down(F.silu(gate) * up)

    def out_rows(self) -> torch.Tensor:
        return self.embed[self.vocab]

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next features [R, hidden], logits over the vocabulary subset [R, len(vocab)])."""
        f = self.n2(self.features(g, x))
        return f, f @ self.out_rows().T

    def start(self, taps: torch.Tensor) -> torch.Tensor:
        """The feature g [R, hidden] the drafts start from, from the tapped states [R, taps, hidden]."""
        normed = torch.cat([norm(taps[:, i]) for i, norm in enumerate(self.tap_norms)], dim=-1)
        return self.native["fuse"].run(normed) if self.native else self.fuse(normed)

    @torch.inference_mode()
    def step(self, g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draft per row: (next features [R, hidden], the head's probability of its token
        [R], the token [R]), from features g [R, hidden] and the tokens x [R] that follow them."""
        if self.native:
            z = self.native["fc"].run(torch.cat([g, self.embed[x]], dim=-1))
            gate_up = self.native["gate_up"].run(z, kernels.PRO_RMSNORM, self.n1)
            self.native["down"].run(gate_up, kernels.PRO_SWIGLU, out=z)
            logits = self.native["out"].run(z, kernels.PRO_RMSNORM, self.n2)
            f = self.n2(z)
        else:
            f, logits = self(g, x)
        conf, best = torch.softmax(logits, dim=-1).max(dim=-1)
        return f, conf, self.vocab[best]

    @torch.inference_mode()
    def draft(self, taps: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
        """k greedy draft tokens per row [R, k] from tapped states [R, taps, hidden] and the
        tokens x [R] the model produced at those positions."""
        g = self.start(taps)
        out = torch.empty(x.shape[0], k, dtype=torch.long)
        for j in range(k):
            g, _, x = self.step(g, x)
            out[:, j] = x
        return out

    def use_native(self) -> bool:
        """Run on the native kernels (Q8_0 copies of the matrices) if they are available."""
        if kernels.load() is None or self.hidden % kernels.BLOCK or self.inter % kernels.BLOCK:
            return False
        from fastmode.weights.gguf import quantize_q8_0
        mats = {"fuse": self.fuse.weight, "fc": self.fc.weight, "gate_up": self.gate_up.weight, "down": self.down.weight,
                "out": self.out_rows()}
        self.native = {}
        for name, w in mats.items():
            w = w.detach().float().contiguous()
            self.native[name] = QLinear(kernels.Q8_0, quantize_q8_0(w), w.shape[0], w.shape[1])
        return True

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: Path, meta: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file
        tensors = {"fuse": self.fuse.weight, "fc": self.fc.weight, "gate_up": self.gate_up.weight,
                   "down": self.down.weight, "n1": self.n1.weight, "n2": self.n2.weight,
                   **{f"tap_norm{i}": n.weight for i, n in enumerate(self.tap_norms)}}
        out = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
        out["vocab"] = self.vocab.to(torch.int32).contiguous()
        save_file(out, str(path), metadata={"format": FORMAT, "eps": repr(self.eps),
                                            "taps": ",".join(map(str, self.taps)), **(meta or {})})

    @classmethod
    def load(cls, path: Path, embed: torch.Tensor) -> "DraftHead":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise DraftHeadError(f"{path} is not a fastmode draft head (format {meta.get('format')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        hidden, inter = t["fc"].shape[0], t["down"].shape[1]
        taps = tuple(int(v) for v in meta.get("taps", "").split(",") if v)
        head = cls(hidden, inter, t["vocab"].long(), embed, taps, float(meta.get("eps", "1e-5")))
        state = {f"{k}.weight": t[k].float() for k in ("fuse", "fc", "gate_up", "down", "n1", "n2")}
        state.update({f"tap_norms.{i}.weight": t[f"tap_norm{i}"].float() for i in range(len(taps))})
        try:
            head.load_state_dict(state)
        except RuntimeError as e:
            raise DraftHeadError(f"{path} does not fit: {e}") from None
        return head.requires_grad_(False).eval()

