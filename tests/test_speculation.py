from fastmode.engine.speculation import DraftLengthPolicy, PromptLookup


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
    assert p.choose("a", 1, flat, limit=100) == 7
    assert p.choose("a", 1, flat, limit=3) == 3
    assert p.choose("a", 1, steep, limit=100) == 0
    for _ in range(20):
        p.observe("b", 7, 0)
    assert p.acceptance["b"] < 0.05
    assert p.choose("b", 1, lambda rows: 1.0 + 0.1 * rows, limit=100) == 0
