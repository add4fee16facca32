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
        self.last_match = 0  # the n-gram length behind the latest proposal (0: none)

    def extend(self, new_ids: list[int]) -> None:
        for tok in new_ids:
            # Index the n-grams that end just before this token: they are now "followed".
            end = len(self.ids)
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self.next_pos[n][tuple(self.ids[end - n:end])] = end
            self.ids.append(tok)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens continuing the longest suffix seen before; `last_match` says how long."""
        self.last_match = 0
        if k <= 0:
            return []
        total = len(self.ids)
        for n in range(min(self.max_ngram, total), self.min_ngram - 1, -1):
            pos = self.next_pos[n].get(tuple(self.ids[total - n:]))
            if pos is not None:
                self.last_match = n
                return self.ids[pos:pos + k]
        return []


class DraftLengthPolicy:
    """Picks the draft length k that maximizes expected tokens per second of step time.

    With per-token acceptance rate a, a k-token draft yields E(k) = 1 + a + ... + a^k tokens
    (accepted drafts plus the verifier's own token); the step costs step_time(rows + k).
    Acceptance is learned per request and per match length (a proposal continuing a 4-gram is
    more often right than one continuing a single token), from every proposal, drafted or not:
    after a step the tokens the model produced show how many of the proposal's tokens would
    have been accepted, so a request that stopped drafting still sees when drafting would pay
    again. New requests start from the lane-wide rate for the match length. Step times are
    running averages of what was measured.
    """

    def __init__(self, max_draft: int, prior_acceptance: float = 0.5, decay: float = 0.8,
                 shared_decay: float = 0.97) -> None:
        self.max_draft = max_draft
        self.prior = prior_acceptance
        self.decay, self.shared_decay = decay, shared_decay
        self.acceptance: dict[tuple[str, int], float] = {}  # (request, match length) -> rate
        self.shared: dict[int, float] = {}  # match length -> rate over all requests

    def rate(self, request_id: str, match: int) -> float:
        return self.acceptance.get((request_id, match), self.shared.get(match, self.prior))

    def observe(self, request_id: str, match: int, proposal: list[int], produced: list[int]) -> None:
        """Compare a proposal (drafted or not) with the tokens the model then produced: each
        position up to the first mismatch is one observation of the conditional acceptance."""
        if match <= 0 or not proposal:
            return
        a = self.rate(request_id, match)
        for hit, _ in self._learn_shared(match, proposal, produced):
            a = self.decay * a + (1 - self.decay) * hit
        self.acceptance[(request_id, match)] = a

    def _learn_shared(self, match: int, proposal: list[int], produced: list[int]) -> list[tuple[float, float]]:
        """Update the lane-wide rate of this match length from each compared position, up to
        the first mismatch; return each position's (hit, the lane-wide rate before it)."""
        shared = self.shared.get(match, self.prior)
        steps = []
        for want, got in zip(proposal, produced):
            hit = 1.0 if want == got else 0.0
            steps.append((hit, shared))
            shared = self.shared_decay * shared + (1 - self.shared_decay) * hit
            if not hit:
                break
        self.shared[match] = shared
        return steps

    def forget(self, request_id: str) -> None:
        for key in [k for k in self.acceptance if k[0] == request_id]:
            del self.acceptance[key]

    def expected_drafts(self, request_id: str, match: int, k: int) -> float:
        """Accepted tokens expected of a k-token proposal at this match length: a + ... + a^k."""
        if match <= 0 or k <= 0:
            return 0.0
        a = self._capped_rate(request_id, match)
        return sum(a ** j for j in range(1, k + 1))

    def _capped_rate(self, request_id: str, match: int) -> float:
        return min(self.rate(request_id, match), 0.99)

    def choose(self, request_id: str, match: int, base_rows: int, step_time: "callable[[int], float]",
               limit: int) -> int:
        if match <= 0 or limit <= 0:
            return 0
        a = self._capped_rate(request_id, match)
        best_k, best_rate = 0, 1.0 / step_time(base_rows)
        expected = 1.0
        for k in range(1, min(self.max_draft, limit) + 1):
            expected += a ** k
            rate = expected / step_time(base_rows + k)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k


class PooledDraftLengthPolicy(DraftLengthPolicy):
    """A DraftLengthPolicy for a source with many kinds of proposal (the draft corpus: match
    length x agreement class), where one request sees too few proposals of each kind to learn
    their rates itself. A kind's acceptance is learned over all requests; a request scales it
    by a factor learned over all of its own proposals, of every kind (accepted tokens over the
    tokens the kinds' rates promised), so a request whose text the source fits badly (a
    summary, against the corpus's stock phrases) soon stops drafting from it.
    """

    def __init__(self, max_draft: int, prior_acceptance: float = 0.5, decay: float = 0.8,
                 shared_decay: float = 0.97) -> None:
        super().__init__(max_draft, prior_acceptance, decay, shared_decay)
        self.fit: dict[str, tuple[float, float]] = {}  # request -> decaying (accepted, promised)

    def rate(self, request_id: str, match: int) -> float:
        accepted, promised = self.fit.get(request_id, (0.0, 0.0))
        return self.shared.get(match, self.prior) * (accepted + 1.0) / (promised + 1.0)

    def observe(self, request_id: str, match: int, proposal: list[int], produced: list[int]) -> None:
        if match <= 0 or not proposal:
            return
        steps = self._learn_shared(match, proposal, produced)
        hits, promised = sum(hit for hit, _ in steps), sum(rate for _, rate in steps)
        accepted, before = self.fit.get(request_id, (0.0, 0.0))
        self.fit[request_id] = (self.decay * accepted + hits, self.decay * before + promised)

    def forget(self, request_id: str) -> None:
        self.fit.pop(request_id, None)


Proposal = tuple[DraftLengthPolicy, int, list[int]]  # (its source's policy, its match or kind, tokens)


def best_proposal(proposals: list[Proposal], request_id: str, rows: int, step_time: "callable[[int], float]",
                  room: int) -> tuple[int, int, float]:
    """Of several sources' proposals, the one that, drafted at the length its own policy prices
    best, promises the most tokens per second of pass: (its index, that length, the accepted
    tokens it is expected to yield); (-1, 0, 0.0) where drafting nothing is best."""
    best, best_k, best_gain, best_rate = -1, 0, 0.0, 0.0
    for i, (policy, match, tokens) in enumerate(proposals):
        k = policy.choose(request_id, match, rows, step_time, min(room, len(tokens)))
        if k == 0:
            continue
        gain = policy.expected_drafts(request_id, match, k)
        rate = (1.0 + gain) / step_time(rows + k)
        if rate > best_rate:
            best, best_k, best_gain, best_rate = i, k, gain, rate
    return best, best_k, best_gain
