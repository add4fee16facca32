"""Token choice from logits: greedy, temperature/top-k/top-p sampling, and draft verification."""
from __future__ import annotations

import torch

from fastmode import kernels
from fastmode.engine.request import SamplingParams


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax, as torch.argmax gives it; for float32 CPU logits on the native
    kernels' serial scan (about twice torch's speed on one thread, and it starts no thread team)."""
    lib = kernels.load() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if lib is not None and logits.dim() == 2 and logits.shape[-1] > 0 and logits.stride(-1) == 1:
        return kernels.argmax_rows(lib, logits)
    return logits.argmax(-1).tolist()


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[rows, vocab] logits -> [rows, vocab] probabilities after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop[..., 0] = False  # also when top_p is below float32's smallest value
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def verify(logits: torch.Tensor, drafts: list[int], params: SamplingParams,
           generator: torch.Generator | None, targets: list[int] | None = None) -> list[int]:
    """Accept a prefix of `drafts` and append one token of the target model's own.

    logits: [len(drafts) + 1, vocab]; row i is the target's distribution for the token after
    the i-th input row. Greedy: accept while the draft equals the argmax. Sampling (drafts
    are a point mass q = 1 at the draft token): accept draft d with probability p(d); on
    rejection sample from the residual max(p - q, 0), i.e. p with d removed, renormalized.
    Either way the output has exactly the target's distribution (Leviathan et al. 2023).
    `targets`: each row's argmax where the pass computed it already (greedy only).
    """
    if params.greedy:
        if targets is None:
            targets = greedy_tokens(logits)
        out = []
        for i, d in enumerate(drafts):
            if d != targets[i]:
                break
            out.append(d)
        out.append(targets[len(out)])
        return out
    probs = probabilities(logits, params)
    out = []
    for i, d in enumerate(drafts):
        p = probs[i]
        if torch.rand((), generator=generator).item() < p[d].item():
            out.append(d)
            continue
        residual = p.clone()
        residual[d] = 0.0
        if residual.sum() <= 0:  # p was a point mass on d: unreachable after a rejection
            residual = p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=generator)))
    return out
