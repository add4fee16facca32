"""The draft pool: the answers a server has given, drafted from for later requests of the same scope.

Requests repeat. A client regenerates an answer or retries after a timeout, an agent runs the
same step again, an evaluation sends its prompts once more, a template's answers share their
frame. Prompt lookup sees only the request's own text and the draft corpus only the model's
answers to its training prompts; the pool keeps, per scope, the latest answers a speculating
lane finished, each with the few prompt tokens before it (so that the first tokens of a
repeated answer are found too), and proposes what followed the longest suffix of a request's text in
them, as the corpus does. Verification decides what is kept: a pool changes how soon an
answer comes, never what it says.

A scope is whoever may draft from whose answers. The server makes it the organization, the
model, the speed and the end user (`metadata.user_id`; requests without one share their
organization's scope): answers are never drafted for another organization, another lane (as
prompt caches are never shared across speeds) or another end user, whose text would
otherwise show in how fast an answer comes. Organizations with zero data retention keep no
pool.

Each scope holds at most `max_tokens` tokens in two generations: answers go into the newer
one, and when it fills, the older one is dropped and the newer one takes its place. All
scopes together hold at most `max_total_tokens` (about 0.4 KB each, with their index) and
`max_scopes` scopes; beyond either, whole scopes are dropped, least recently added to first.
No answer is drafted from once its generation's latest answer is `max_age` seconds old (an
hour by default); such generations are dropped as the next answer is added. A lookup is a
dict probe per n-gram length, longest first; adding an answer indexes the n-grams that end
before each of its tokens, by their hash (1-2 us a token, when the request ends). A hash
collision only costs a rejected draft.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

SEPARATOR = -1  # after each answer: no proposal runs past it
# Acceptance a pool proposal's draft policy starts from, per match length. Low, with matches of
# at least 4 tokens: a user's other answers share short phrases and the prompt template's last
# tokens with a new one, and drafting those lost 2% on new prompts (with 2-token matches and a
# start of 0.5); a repeated answer's 8-token matches soon earn their rate.
POOL_PRIOR = 0.3


class _Generation:
    """Answers, one after another, and where each n-gram in them (by hash) was last followed."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.next_pos: dict[int, int] = {}
        self.last_added = float("-inf")  # when its latest answer came (the pool's clock)

    def add(self, lead_in: list[int], answer: list[int], min_ngram: int, max_ngram: int, now: float) -> None:
        self.last_added = now
        start = len(self.tokens)
        self.tokens += lead_in
        first = len(self.tokens)  # the answer's first token
        self.tokens += answer
        self.tokens.append(SEPARATOR)
        toks = self.tokens
        for pos in range(first, first + len(answer)):  # n-grams followed by an answer token
            for n in range(min_ngram, min(max_ngram, pos - start) + 1):
                self.next_pos[hash(tuple(toks[pos - n:pos]))] = pos

    def follow(self, key: int, k: int) -> list[int]:
        pos = self.next_pos.get(key)
        if pos is None:
            return []
        out = self.tokens[pos:pos + k]
        if SEPARATOR in out:
            out = out[:out.index(SEPARATOR)]
        return out


class _Scope:
    def __init__(self) -> None:
        self.newer, self.older = _Generation(), _Generation()

    def __len__(self) -> int:
        return len(self.newer.tokens) + len(self.older.tokens)


class DraftPool:
    def __init__(self, max_ngram: int = 8, min_ngram: int = 4, lead_in: int = 8, max_tokens: int = 32768,
                 max_total_tokens: int = 131072, max_scopes: int = 256, max_age: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram lengths {min_ngram}..{max_ngram}: need 1 <= min_ngram <= max_ngram")
        if max_tokens < 2 * (lead_in + 3) or max_total_tokens < max_tokens or max_scopes < 1:
            raise ValueError(f"a scope holds at least {2 * (lead_in + 3)} tokens (two answers of two tokens "
                             f"after their lead-ins), all scopes at least one scope's tokens, and 1 scope")
        self.max_ngram, self.min_ngram, self.lead_in = max_ngram, min_ngram, lead_in
        self.max_tokens, self.max_total_tokens, self.max_scopes = max_tokens, max_total_tokens, max_scopes
        self.max_age, self.clock = max_age, clock
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()  # least recently added to first
        self.total_tokens = 0  # over all scopes

    def _expire(self, now: float) -> None:
        """Drop every generation whose latest answer is older than max_age, and scopes left
        empty (a pass over at most max_scopes scopes, as an answer is added)."""
        for scope, s in list(self._scopes.items()):
            if now - s.newer.last_added > self.max_age:
                self.total_tokens -= len(s)
                del self._scopes[scope]
            elif now - s.older.last_added > self.max_age and s.older.tokens:
                self.total_tokens -= len(s.older.tokens)
                s.older = _Generation()

    def add(self, scope: str, prompt: list[int], answer: list[int]) -> None:
        """Keep `answer` (the tokens a request produced after `prompt`) for later drafts in
        `scope` (its first tokens, if longer than a generation's share). Answers shorter than two
        tokens are not kept."""
        half = self.max_tokens // 2  # a generation's share
        lead_in = prompt[max(0, len(prompt) - self.lead_in):] if self.lead_in else []
        answer = answer[:half - len(lead_in) - 1]
        if len(answer) < 2:
            return
        now = self.clock()
        self._expire(now)
        s = self._scopes.get(scope)
        if s is None:
            s = self._scopes[scope] = _Scope()
        self._scopes.move_to_end(scope)
        if len(s.newer.tokens) + len(lead_in) + len(answer) + 1 > half:
            self.total_tokens -= len(s.older.tokens)
            s.older, s.newer = s.newer, _Generation()
        s.newer.add(lead_in, answer, self.min_ngram, self.max_ngram, now)
        self.total_tokens += len(lead_in) + len(answer) + 1
        while len(self._scopes) > 1 and (len(self._scopes) > self.max_scopes
                                         or self.total_tokens > self.max_total_tokens):
            _, dropped = self._scopes.popitem(last=False)  # never the scope just added to: it is the newest
            self.total_tokens -= len(dropped)

    def proposal(self, scope: str, context: list[int], k: int) -> tuple[int, list[int]]:
        """(the length of the longest suffix of `context` found in the scope's answers, up to k
        tokens that followed it there; the newer generation first); (0, []) if none."""
        s = self._scopes.get(scope)
        if s is None or k <= 0:
            return 0, []
        now = self.clock()  # answers past max_age go at the next add; they are not drafted from meanwhile
        fresh = [g for g in (s.newer, s.older) if now - g.last_added <= self.max_age]
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            key = hash(tuple(context[len(context) - n:]))
            for g in fresh:
                found = g.follow(key, k)
                if found:
                    return n, found
        return 0, []

    def tokens(self, scope: str) -> int:
        """Tokens the scope holds (answers, their lead-ins and separators)."""
        s = self._scopes.get(scope)
        return 0 if s is None else len(s)

    def __len__(self) -> int:
        """Scopes held."""
        return len(self._scopes)
