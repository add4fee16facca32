"""The draft corpus: a model's own answers, searched for the context's suffix to draft from.

A small model answers in its own stock phrases ("plays a crucial role in", "Here's a simple
example to illustrate"), and under greedy decoding the same context gives the same
continuation. So the model's answers to a few thousand training prompts (the ones
`fastmode train-head` collects) hold, for an open-ended request whose own text has nothing to
copy, continuations the model is likely to produce again. `DraftCorpus` finds the longest
suffix of the request's context (up to `max_ngram` tokens) that occurs in the corpus and
proposes the tokens that followed it there; where an n-gram was followed by different tokens,
it keeps an occurrence followed by the commonest one. How the n-gram's continuations agreed
(seen once; always the same token; the proposed one in at least half the cases; less) says
as much about a proposal's chances as the match length does: on held-out answers a 2-token
match was right first 55% of the time where its continuations agreed and 8% where the
proposed one was a minority, so the engine learns acceptance per (length, agreement).

The index is, per n-gram length, a sorted array of 64-bit n-gram hashes with one corpus
position each, built with numpy when first needed (0.4-0.6 s for 350k tokens); a lookup is a
binary search over n-gram lengths (an n-gram that occurs has every suffix occurring too), each
probe a `bisect` of the hashes. The lookups read the arrays through memoryviews, as Python
ints: right after a pass numpy's per-call overhead made a proposal cost 63 us (median of 900),
against 36 us so. A hash collision only costs a rejected draft: verification decides.
"""
from __future__ import annotations

import bisect
import threading
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fastmode.engine.speculation import PooledDraftLengthPolicy

MASK = (1 << 64) - 1
BASE = 0x100000001B3  # an odd 64-bit multiplier; hashes wrap modulo 2**64
SEPARATOR = -1  # between answers: no n-gram spans it and no proposal runs past it
# In the file, ids are 16-bit where the vocabulary allows (else 32-bit), SEPARATOR the largest value
# How an n-gram's continuations in the corpus agreed (a proposal's agreement class)
AGREEMENT = (ONCE, UNANIMOUS, MAJORITY, MINORITY) = range(4)


CORPUS_PRIOR = 0.3  # acceptance a kind of corpus proposal starts from: about its first-token rate


SAMPLED = 1 << 20  # added to the kind of a sampled request's proposals: the corpus holds greedy
# answers, which sampling follows less often, so sampled requests learn rates of their own


def proposal_kind(match: int, agreement: int, greedy: bool = True) -> int:
    """The key a draft policy learns a corpus proposal's acceptance under (0: no proposal)."""
    if not match:
        return 0
    return match * len(AGREEMENT) + agreement + (0 if greedy else SAMPLED)


def draft_policy(max_draft: int) -> PooledDraftLengthPolicy:
    """The draft-length policy corpus proposals are priced with: rates per kind (match length x
    agreement class) over all requests, scaled per request."""
    return PooledDraftLengthPolicy(max_draft, prior_acceptance=CORPUS_PRIOR)


class DraftCorpusError(ValueError):
    """A corpus file that cannot serve this model."""


class DraftCorpus:
    def __init__(self, tokens: np.ndarray, max_ngram: int = 8) -> None:
        """`tokens`: the answers' ids, each answer followed by SEPARATOR (see `from_answers`)."""
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be at least 1, not {max_ngram}")
        self.max_ngram = max_ngram
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.powers = [pow(BASE, n, 1 << 64) for n in range(max_ngram)]
        # the index, as memoryviews of its numpy arrays: lookups read Python ints, no numpy calls
        self.keys: list[memoryview] = []  # per n-gram length n (index n - 1): sorted hashes
        self.positions: list[memoryview] = []  # the corpus position just after an occurrence
        self.agreement: list[memoryview] = []  # its agreement class
        self._tokens = memoryview(self.tokens)
        self.indexed = False  # see index()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_answers(cls, answers: list[list[int]], max_ngram: int = 8) -> "DraftCorpus":
        flat: list[int] = []
        for ids in answers:
            flat.extend(ids)
            flat.append(SEPARATOR)
        return cls(np.asarray(flat, dtype=np.int64), max_ngram)

    @property
    def num_answers(self) -> int:
        return int((self.tokens == SEPARATOR).sum())

    def __len__(self) -> int:
        """Tokens in the corpus (separators not counted)."""
        return len(self.tokens) - self.num_answers

    def index(self, background: bool = False) -> None:
        """Build the index (once). With `background`, on a thread of its own: `indexed` turns
        true when it is done, and an engine drafts from the corpus from then on, so neither its
        start nor its first requests wait for it (about 0.5 s for the default model's corpus).
        Without, return once it is built (waiting for a build another thread started)."""
        if self.indexed:
            return
        if background:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self.index, name="fastmode-corpus-index", daemon=True)
                    self._thread.start()
            return
        with self._lock:
            if not self.indexed:
                self._build()
                self.indexed = True

    def _build(self) -> None:
        toks = self.tokens
        size = len(toks)
        h = np.zeros(size, dtype=np.uint64)
        ok = toks >= 0  # position i has a token to propose
        for n in range(1, self.max_ngram + 1):
            prev = np.full(size, SEPARATOR, dtype=np.int64)
            if n < size:
                prev[n:] = toks[:-n]
            ok &= prev >= 0  # the n tokens before i, none a separator
            h += (prev + 1).astype(np.uint64) * np.uint64(self.powers[n - 1])
            at = np.nonzero(ok)[0]
            if len(at) == 0:
                self.keys.append(memoryview(np.zeros(0, dtype=np.uint64)))
                self.positions.append(memoryview(np.zeros(0, dtype=np.int32)))
                self.agreement.append(memoryview(np.zeros(0, dtype=np.int8)))
                continue
            keys, nxt = h[at], toks[at]
            order = np.lexsort((at, nxt, keys))  # by hash, then next token, then position
            keys, nxt, at = keys[order], nxt[order], at[order]
            run = np.ones(len(keys), dtype=bool)  # where a (hash, next token) run starts
            run[1:] = (keys[1:] != keys[:-1]) | (nxt[1:] != nxt[:-1])
            starts = np.nonzero(run)[0]
            lengths = np.diff(np.append(starts, len(keys)))
            run_keys, run_pos = keys[starts], at[starts]
            pick = np.lexsort((-lengths, run_keys))  # per hash, its commonest next token first
            first = np.ones(len(pick), dtype=bool)
            first[1:] = run_keys[pick][1:] != run_keys[pick][:-1]
            top = lengths[pick][first]  # occurrences followed by the commonest token
            total = np.add.reduceat(lengths[pick], np.nonzero(first)[0])
            agreement = np.where(total == 1, ONCE, np.where(top == total, UNANIMOUS,
                                                            np.where(2 * top >= total, MAJORITY, MINORITY)))
            self.keys.append(memoryview(run_keys[pick][first]))
            self.positions.append(memoryview(run_pos[pick][first].astype(np.int32)))
            self.agreement.append(memoryview(agreement.astype(np.int8)))

    def _find(self, n: int, key: int) -> int:
        """The index of this n-gram hash in the length-n table, or -1."""
        keys = self.keys[n - 1]
        i = bisect.bisect_left(keys, key)
        return i if i < len(keys) and keys[i] == key else -1

    def propose(self, context: list[int], k: int) -> tuple[list[int], int, int]:
        """Up to k tokens that followed the longest suffix of `context` found in the corpus,
        that suffix's length and its agreement class (no tokens and 0, 0: none found)."""
        if k <= 0 or not context:
            return [], 0, 0
        self.index()
        hashes, h = [], 0
        for n in range(1, min(self.max_ngram, len(context)) + 1):
            h = (h + (context[-n] + 1) * self.powers[n - 1]) & MASK
            hashes.append(h)
        lo, hi, at = 0, len(hashes), -1  # the longest length found is in [lo, hi]; at: lo's entry
        while lo < hi:
            mid = (lo + hi + 1) // 2
            i = self._find(mid, hashes[mid - 1])
            if i >= 0:
                lo, at = mid, i
            else:
                hi = mid - 1
        if lo == 0:
            return [], 0, 0
        pos = self.positions[lo - 1][at]
        out = self._tokens[pos:pos + k].tolist()
        if SEPARATOR in out:
            out = out[:out.index(SEPARATOR)]
        return out, lo, self.agreement[lo - 1][at]

    def proposal(self, context: list[int], k: int, greedy: bool = True) -> tuple[int, list[int]]:
        """`propose`'s tokens with the kind its draft policy prices them by (`proposal_kind`)."""
        tokens, match, agreement = self.propose(context, k)
        return proposal_kind(match, agreement, greedy), tokens

    # ---- its file --------------------------------------------------------------------------
    def save(self, path: Path, vocab_size: int, meta: dict[str, str] | None = None) -> None:
        if (self.tokens >= vocab_size).any():
            raise DraftCorpusError(f"the corpus holds token ids outside a vocabulary of {vocab_size}")
        dtype = np.uint16 if vocab_size < np.iinfo(np.uint16).max else np.uint32
        stored = np.where(self.tokens < 0, np.iinfo(dtype).max, self.tokens).astype(dtype)
        save_file({"tokens": stored}, str(path),
                  metadata={"format": "fastmode-draft-corpus", "vocab_size": str(vocab_size),
                            "max_ngram": str(self.max_ngram), **(meta or {})})

    @classmethod
    def load(cls, path: Path, vocab_size: int) -> "DraftCorpus":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "fastmode-draft-corpus":
            raise DraftCorpusError(f"{path} is not a draft corpus")
        if int(meta.get("vocab_size", -1)) != vocab_size:
            raise DraftCorpusError(f"{path} was made for a vocabulary of {meta.get('vocab_size')} tokens, "
                                   f"this model has {vocab_size}")
        stored = load_file(str(path))["tokens"]
        if stored.dtype not in (np.uint16, np.uint32):
            raise DraftCorpusError(f"{path}: token ids stored as {stored.dtype}, not 16- or 32-bit")
        flat = np.where(stored == np.iinfo(stored.dtype).max, SEPARATOR, stored.astype(np.int64))
        if len(flat) and flat[-1] != SEPARATOR:
            raise DraftCorpusError(f"{path}: its tokens do not end with an answer's end")
        if (flat >= vocab_size).any():
            raise DraftCorpusError(f"{path} holds token ids outside this model's vocabulary of {vocab_size}")
        return cls(flat, int(meta.get("max_ngram", 8)))
