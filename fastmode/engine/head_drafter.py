"""The fast lane's drafts from a trained draft head: when to run it, how far to draft, what it learned."""
from __future__ import annotations

import time
from typing import Callable

import torch

from fastmode.engine.scheduler import Scheduled
from fastmode.model.draft_head import DraftHead

# A request whose other drafts (prompt lookup's or the draft corpus's) already expect this many
# accepted tokens does not run the draft head (its steps cost time in every pass; copied text
# wins there).
HEAD_SKIP = 1.0
# A request whose head drafts have stopped paying runs the head only every this many passes,
# to notice when they would pay again.
HEAD_EXPLORE = 8

StepTime = Callable[[int], float]  # estimated seconds of a pass with this many rows


class HeadDrafter:
    """Drafts with a `DraftHead` for the requests of a speculating lane.

    Keeps, per request, the tapped states at its latest position and the token the model
    produced there (where the head starts), and learns from verification: how many head drafts
    were accepted per one its confidences promised (a calibration over all requests), and how
    often each request's first head draft was accepted (whether running the head pays for it).
    """

    def __init__(self, head: DraftHead, max_draft: int) -> None:
        self.head, self.max_draft = head, max_draft
        self.features: dict[str, tuple[torch.Tensor, int]] = {}
        self.step_seconds = 0.0  # running average of one head step (a batch of rows)
        self.hits, self.promised = 1.0, 1.0  # decaying sums: accepted head drafts, what confidences promised
        self.pending: dict[str, float] = {}  # request -> tokens its head drafts of this pass promise
        self.first: dict[str, float] = {}  # request -> how often its first head draft was accepted
        self.first_all = 0.5  # the same over all requests (where a request starts)
        self.skipped: dict[str, int] = {}  # request -> passes since the head last ran for it

    @property
    def taps(self) -> tuple[int, ...]:
        return self.head.taps

    def remember(self, request_id: str, features: torch.Tensor, token: int) -> None:
        """The tapped states [taps, hidden] at the request's last kept position, and its token."""
        self.features[request_id] = (features, token)

    def wants(self, request_id: str, others_expected: float, rows: int, step: StepTime) -> bool:
        """Whether to run the head for this request this pass: it has a start, its other drafts
        (prompt lookup's or the corpus's, expected to yield `others_expected` accepted tokens)
        do not already expect HEAD_SKIP, and its first draft is expected to pay for its row and
        head step (from how often its first drafts were accepted); if not, the head still runs
        every HEAD_EXPLORE-th pass."""
        if request_id not in self.features or others_expected >= HEAD_SKIP:
            return False
        rate = self.first.get(request_id, self.first_all)
        cost = step(rows + 1) - step(rows) + self.step_seconds
        skipped = self.skipped.get(request_id, 0)
        if rate * step(rows) >= cost or skipped + 1 >= HEAD_EXPLORE:
            self.skipped[request_id] = 0
            return True
        self.skipped[request_id] = skipped + 1
        return False

    @torch.inference_mode()
    def draft(self, items: list[tuple[Scheduled, float]], rows: int, step: StepTime) -> list[list[int]]:
        """Run the head for these (item, tokens its other drafts are expected to yield), a step
        for all of them at a time; return each item's head drafts, empty where the others promise
        more. A row's next draft is kept while its probability of being accepted (the product
        of the head's calibrated confidences so far) pays for one more row and head step."""
        base = step(rows)
        ids = [item.request.request_id for item, _ in items]
        g = self.head.start(torch.stack([self.features[rid][0] for rid in ids]))
        tokens = torch.tensor([self.features[rid][1] for rid in ids])
        limit = [min(self.max_draft, item.request.token_budget - item.request.num_tokens - 1) for item, _ in items]
        calibration = min(max(self.hits / self.promised, 0.25), 2.0)
        drafts: list[list[int]] = [[] for _ in items]
        p = [1.0] * len(items)
        expected = [1.0] * len(items)
        active = [i for i in range(len(items)) if limit[i] > 0]
        extra = 0  # head rows added to the pass so far
        while active:
            t0 = time.perf_counter()
            g_next, conf, tok = self.head.step(g[active], tokens[active])
            dt = time.perf_counter() - t0
            self.step_seconds = dt if not self.step_seconds else 0.8 * self.step_seconds + 0.2 * dt
            g[active], tokens[active] = g_next, tok
            still = []
            for j, i in enumerate(active):
                p[i] *= float(conf[j])
                cost = step(rows + extra + 1) - step(rows + extra) + self.step_seconds
                gain = min(calibration * p[i], 1.0)
                if gain * base < cost * expected[i]:  # one more draft would lower this request's rate
                    continue
                drafts[i].append(int(tok[j]))
                expected[i] += gain
                extra += 1
                # go on while the head can still beat lookup (confidences only fall along a draft)
                best = expected[i] - 1.0 + gain * (limit[i] - len(drafts[i]))
                if len(drafts[i]) < limit[i] and best > items[i][1]:
                    still.append(i)
            active = still
        chosen = []
        for rid, (_, others_expected), d, e in zip(ids, items, drafts, expected):
            use = bool(d) and e - 1.0 > others_expected
            if use:
                self.pending[rid] = e - 1.0
            chosen.append(d if use else [])
        return chosen

    def observe(self, request_id: str, accepted: int) -> None:
        """Verification accepted this many of the request's head drafts of the last pass."""
        self.hits = 0.98 * self.hits + accepted
        self.promised = 0.98 * self.promised + self.pending.pop(request_id, 0.0)
        first = 1.0 if accepted else 0.0
        self.first[request_id] = 0.7 * self.first.get(request_id, self.first_all) + 0.3 * first
        self.first_all = 0.97 * self.first_all + 0.03 * first

    def forget(self, request_id: str) -> None:
        for table in (self.features, self.pending, self.first, self.skipped):
            table.pop(request_id, None)
