import torch

from fastmode.engine.request import SamplingParams
from fastmode.engine.sampler import probabilities, verify


def test_greedy_verify_accepts_the_matching_prefix_then_adds_the_target_token():
    logits = torch.full((4, 10), -5.0)
    for row, tok in enumerate([3, 4, 6, 8]):
        logits[row, tok] = 5.0
    params = SamplingParams(max_tokens=10)
    assert verify(logits, [3, 4, 5], params, None) == [3, 4, 6]  # third draft wrong: corrected to 6
    assert verify(logits, [3, 4, 6], params, None) == [3, 4, 6, 8]  # all accepted plus a bonus token
    assert verify(logits[:1], [], params, None) == [3]


def test_top_k_and_top_p_remove_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    pk = probabilities(logits, SamplingParams(max_tokens=1, temperature=1.0, top_k=2))
    assert torch.allclose(pk, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    pp = probabilities(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8))
    assert pp[0, 2] == 0 and pp[0, 3] == 0 and torch.isclose(pp.sum(), torch.tensor(1.0))


def test_a_top_p_below_float32s_range_keeps_the_top_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    for top_p in (1e-46, 1e-300, 1e-40):
        p = probabilities(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p))
        assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0]])), top_p


def test_rejection_sampling_preserves_the_target_distribution():
    """Draft token 1 for two positions; the emitted (first, second) pairs must follow p1 x p2.

    A chi-square test over 20,000 seeded trials: with 19 degrees of freedom the 99.9%
    quantile is 43.8, so a correct sampler fails this about once in a thousand seeds, and
    a sampler that accepts drafts too often (e.g. ignoring p(d)) fails by hundreds."""
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p2 = torch.tensor([0.25, 0.05, 0.6, 0.1])
    p3 = torch.tensor([0.7, 0.1, 0.1, 0.1])
    logits = torch.log(torch.stack([p1, p2, p3]))
    params = SamplingParams(max_tokens=10, temperature=1.0)
    gen = torch.Generator().manual_seed(1234)
    n = 20_000
    counts = torch.zeros(4, 5)  # second index 4: no second token (first draft rejected)
    for _ in range(n):
        out = verify(logits, [1, 1], params, gen)
        counts[out[0], out[1] if len(out) > 1 and out[0] == 1 else 4] += 1
    expected = torch.zeros(4, 5)
    for a in range(4):
        if a == 1:
            expected[a, :4] = n * p1[a] * p2
        else:
            expected[a, 4] = n * p1[a]
    mask = expected > 0
    chi2 = (((counts - expected) ** 2)[mask] / expected[mask]).sum().item()
    assert counts[~mask].sum() == 0
    assert chi2 < 43.8, chi2
