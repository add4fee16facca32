"""Draft proposals for the fast lane: prompt lookup, and a draft length chosen from measured cost."""
from __future__ import annotations

from collections import defaultdict


class PromptLookup:
    """Proposes the tokens that followed the latest earlier occurrence of the context's suffix.

    Keeps, for n = 1..max_ngram, a map from each n-gram to the position just after its most
    recent occurrence, updated as tokens arrive, so a lookup costs O(max_ngram).
    """

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.ids: list[int] = []
        self.next_pos: dict[int, dict[tuple[int, ...], int]] = defaultdict(dict)

    def extend(self, new_ids: list[int]) -> None:
        for tok in new_ids:
            # Index the n-grams that end just before this token: they are now "followed".
            end = len(self.ids)
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self.next_pos[n][tuple(self.ids[end - n:end])] = end
            self.ids.append(tok)

    def propose(self, k: int) -> list[int]:
        if k <= 0:
            return []
        total = len(self.ids)
        for n in range(min(self.max_ngram, total), self.min_ngram - 1, -1):
            pos = self.next_pos[n].get(tuple(self.ids[total - n:]))
            if pos is not None:
                return self.ids[pos:pos + k]
        return []


class DraftLengthPolicy:
    """Picks the draft length k that maximizes expected tokens per second of step time.

    With per-token acceptance rate a, a k-token draft yields E(k) = 1 + a + ... + a^k tokens
    (accepted drafts plus the verifier's own token); the step costs step_time(rows + k).
    Acceptance and step times are running averages of what was actually measured.
    """

    def __init__(self, max_draft: int, prior_acceptance: float = 0.6, decay: float = 0.8) -> None:
        self.max_draft = max_draft
        self.prior = prior_acceptance
        self.decay = decay
        self.acceptance: dict[str, float] = {}

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        rate = accepted / proposed
        old = self.acceptance.get(request_id, self.prior)
        self.acceptance[request_id] = self.decay * old + (1 - self.decay) * rate

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)

    def choose(self, request_id: str, base_rows: int, step_time: "callable[[int], float]", limit: int) -> int:
        a = min(self.acceptance.get(request_id, self.prior), 0.99)
        best_k, best_rate = 0, 1.0 / step_time(base_rows)
        expected = 1.0
        for k in range(1, min(self.max_draft, limit) + 1):
            expected += a ** k
            rate = expected / step_time(base_rows + k)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
