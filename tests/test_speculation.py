import pytest

from fastmode.engine.speculation import DraftLengthPolicy, PooledDraftLengthPolicy, PromptLookup


def test_prompt_lookup_continues_the_latest_earlier_occurrence():
    pl = PromptLookup(max_ngram=3)
    pl.extend([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert pl.propose(3) == [4, 5, 9]
    pl.extend([7])  # no n-gram ending in 7 has occurred before: no draft
    assert pl.propose(2) == []
    pl.extend([1, 2])
    assert pl.propose(2) == [3, 7]  # [7, 1, 2] is new; [1, 2] last occurred at 6..7, followed by 3, 7


def test_prompt_lookup_prefers_longer_matches():
    pl = PromptLookup(max_ngram=2)
    pl.extend([5, 1, 8, 6, 1, 9, 6, 1])
    assert pl.propose(1) == [9]
    pl2 = PromptLookup(max_ngram=2)
    pl2.extend([4, 1, 8, 2, 1, 9, 4, 1])
    assert pl2.propose(1) == [8]  # [4, 1] -> 8 beats the more recent 1-gram [1] -> 9


def test_draft_length_follows_acceptance_and_cost():
    flat = lambda rows: 1.0  # verification is free up to the padded size
    steep = lambda rows: float(rows)  # every extra row costs a full step
    p = DraftLengthPolicy(max_draft=7, prior_acceptance=0.9)
    assert p.choose("a", 2, 1, flat, limit=100) == 7
    assert p.choose("a", 2, 1, flat, limit=3) == 3
    assert p.choose("a", 2, 1, steep, limit=100) == 0
    assert p.choose("a", 0, 1, flat, limit=100) == 0  # no match, nothing to draft
    for _ in range(20):
        p.observe("b", 2, [1, 2, 3], [9, 9])  # the first proposed token is always wrong
    assert p.rate("b", 2) < 0.05
    assert p.choose("b", 2, 1, lambda rows: 1.0 + 0.1 * rows, limit=100) == 0
    assert p.rate("b", 4) > 0.5  # a different match length keeps its own estimate


def test_acceptance_is_learned_from_proposals_that_were_not_drafted():
    """A request that stopped drafting keeps comparing proposals with what the model produced,
    and drafts again once they would be accepted."""
    cost = lambda rows: 1.0 + 0.3 * (rows - 1)
    p = DraftLengthPolicy(max_draft=7, prior_acceptance=0.5)
    for _ in range(10):
        p.observe("r", 3, [5, 6], [7])
    assert p.choose("r", 3, 1, cost, limit=7) == 0
    for _ in range(10):  # k = 0: only the verifier's token is compared, and it matches
        p.observe("r", 3, [5, 6, 7], [5])
    assert p.choose("r", 3, 1, cost, limit=7) > 0
    # a long run of matches counts every matched position, up to the first miss
    p.observe("s", 1, [1, 2, 3, 4], [1, 2, 3, 0, 8])
    assert 0.5 < p.rate("s", 1) < 1.0


def test_new_requests_start_from_the_lane_wide_rate():
    p = DraftLengthPolicy(max_draft=7, prior_acceptance=0.5)
    for i in range(50):
        p.observe(f"old{i}", 4, [1, 2, 3, 4], [1, 2, 3, 4])
    assert p.rate("new", 4) > 0.7
    assert p.rate("new", 1) == 0.5
    p.forget("old0")
    assert ("old0", 4) not in p.acceptance


def test_pooled_policy_learns_kinds_over_requests_and_a_fit_per_request():
    """Acceptance per kind is shared; a request whose proposals keep failing, whatever their
    kind, scales every kind down for itself only, and stops drafting."""
    cost = lambda rows: 1.0 + 0.05 * (rows - 1)
    p = PooledDraftLengthPolicy(max_draft=7, prior_acceptance=0.3)
    assert p.rate("new", 9) == 0.3
    for i in range(60):  # kind 8 is right, kind 5 is wrong, over many requests
        p.observe(f"r{i}", 8, [1, 2], [1, 2, 3])
        p.observe(f"r{i}", 5, [1, 2], [4])
    assert p.rate("fresh", 8) > 0.7 > 0.1 > p.rate("fresh", 5)
    assert p.choose("fresh", 8, 1, cost, limit=7) > 0
    for kind in (8, 9, 10, 11) * 4:  # this request's proposals miss, of every kind
        p.observe("summary", kind, [1, 2], [7])
    assert p.rate("summary", 8) < p.rate("fresh", 8) / 2
    assert p.choose("summary", 8, 1, lambda rows: 1.0 + 0.5 * (rows - 1), limit=7) == 0
    assert p.choose("fresh", 8, 1, lambda rows: 1.0 + 0.5 * (rows - 1), limit=7) > 0
    assert p.rate("summary", 12) < p.rate("fresh", 12)  # a kind it never saw is scaled down too
    p.observe("x", 0, [1], [1])  # no match: nothing learned
    assert "x" not in p.fit
    p.forget("summary")
    assert p.rate("summary", 8) == p.rate("fresh", 8)


def test_best_proposal_takes_the_source_promising_most_tokens_per_second():
    from fastmode.engine.speculation import best_proposal
    cost = lambda rows: 1.0 + 0.05 * (rows - 1)
    good, poor = DraftLengthPolicy(7, prior_acceptance=0.9), DraftLengthPolicy(7, prior_acceptance=0.2)
    proposals = [(poor, 2, [1, 2, 3]), (good, 3, [4, 5, 6, 7])]
    best, k, gain = best_proposal(proposals, "r", 1, cost, room=10)
    assert best == 1 and k == 4 and gain == pytest.approx(sum(0.9 ** j for j in range(1, 5)))
    assert best_proposal(proposals, "r", 1, cost, room=2)[:2] == (1, 2)  # the budget caps the draft
    assert best_proposal(proposals[:1] + [(good, 0, [])], "r", 1, lambda rows: float(rows), 10) == (-1, 0, 0.0)
    tie = [(DraftLengthPolicy(7, 0.9), 1, [1]), (DraftLengthPolicy(7, 0.9), 1, [2])]
    assert best_proposal(tie, "r", 1, cost, 10)[0] == 0  # a tie goes to the first source (prompt lookup)


def test_pass_cost_fits_one_line_to_every_pass_size():
    import random
    from fastmode.engine.runner import PassCost
    cost = PassCost(max_rows=16)
    assert not cost.known
    cost.observe(1, 0.003)  # one size seen: the prior slope (5% of a pass per row)
    assert cost(1) == pytest.approx(0.003) and cost(3) == pytest.approx(0.003 * 1.10)
    rng = random.Random(0)
    for _ in range(400):  # noisy passes of 1-8 rows on a line of 2 ms + 0.2 ms a row
        r = rng.randint(1, 8)
        cost.observe(r, (0.002 + 0.0002 * r) * rng.uniform(0.8, 1.2))
    a, b = cost.line()
    assert a == pytest.approx(0.002, rel=0.15) and b == pytest.approx(0.0002, rel=0.15)
    assert all(cost(r) < cost(r + 1) for r in range(1, 16))  # never cheaper for more rows
    cost.observe(64, 1.0)  # larger passes are not on the line
    assert cost.line() == (a, b)
    for _ in range(600):  # the machine slows down: recent passes win
        r = rng.randint(1, 8)
        cost.observe(r, 0.004 + 0.0004 * r)
    assert cost(4) == pytest.approx(0.0056, rel=0.05)


def test_pass_cost_never_gives_a_negative_slope():
    from fastmode.engine.runner import PassCost
    cost = PassCost()
    for _ in range(50):
        cost.observe(1, 0.004)
        cost.observe(4, 0.003)  # bigger passes measured faster (noise, a busy moment)
    assert cost.line()[1] == 0.0 and cost(4) == pytest.approx(cost(1))
