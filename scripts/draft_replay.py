"""How good the fast lane's draft lengths are: replay the greedy outputs a `fastmode bench
--compare` run recorded through the same prompt lookup, draft corpus (where the model has one;
`--no-corpus` leaves it out) and draft-length policies the engine uses, cost every pass with
the pass times that run measured by rows, and compare with the source and draft length chosen
knowing which drafts the model will accept (same proposals). The draft head is not replayed.
Deterministic: no timing noise, so policy changes can be judged here before they are measured
for real.

    .venv/bin/python scripts/draft_replay.py bench-results/compare.json [--config default]
        [--workload fastmode/bench/workloads/heldout.jsonl] [--corpus FILE]

With a workload other than the run's (e.g. the held-out prompts, which no draft source was
made from), the outputs are the model's greedy answers to its prompts on the native kernels,
made here first; `--corpus` replays another draft corpus file (`fastmode train-head
--corpus-only --out ...` writes one). Prints, per category, the median over its prompts of
standard time / fast time for: the policy (what the fast lane should measure), perfect draft
lengths, and the pass-cost ceiling.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastmode.config import EngineConfig
from fastmode.engine.corpus import DraftCorpus, draft_policy
from fastmode.engine.speculation import DraftLengthPolicy, PromptLookup, Proposal, best_proposal

# (proposals, request, the output, the position in it, room) -> (the proposal drafted or -1, its length)
Choose = Callable[[list[Proposal], str, list[int], int, int], tuple[int, int]]


def interpolate(pass_ms: dict[int, float]) -> Callable[[int], float]:
    """Pass time for any row count from the measured ones (linear between, flat beyond)."""
    known = sorted(pass_ms)

    def cost(rows: int) -> float:
        if rows in pass_ms:
            return pass_ms[rows]
        if rows <= known[0]:
            return pass_ms[known[0]]
        if rows >= known[-1]:
            return pass_ms[known[-1]]
        lo = max(r for r in known if r <= rows)
        hi = min(r for r in known if r >= rows)
        return pass_ms[lo] + (pass_ms[hi] - pass_ms[lo]) * (rows - lo) / (hi - lo)
    return cost


def policy_choice(cost: Callable[[int], float]) -> Choose:
    def choose(proposals, rid, output, pos, room):
        best, k, _ = best_proposal(proposals, rid, 1, cost, room)
        return best, k
    return choose


def right_tokens(tokens: list[int], output: list[int], pos: int, room: int) -> int:
    right = 0
    while right < min(room, len(tokens)) and tokens[right] == output[pos + right]:
        right += 1
    return right


def perfect_choice(cost: Callable[[int], float]) -> Choose:
    """The source and draft length that maximize tokens per pass time, knowing how many will be
    accepted."""
    def choose(proposals, rid, output, pos, room):
        options = [(i, k) for i, (_, _, tokens) in enumerate(proposals)
                   for k in range(right_tokens(tokens, output, pos, room) + 1)]
        return max(options, key=lambda o: (o[1] + 1) / cost(1 + o[1]), default=(-1, 0))
    return choose


def replay(prompts: list[list[int]], outputs: list[list[int]], cost: Callable[[int], float], choose: Choose,
           max_draft: int, corpus: DraftCorpus | None = None) -> list[float]:
    """Standard time / fast time per prompt, the requests one after another in one lane (as the
    bench runs them: the policies' lane-wide rates carry from one request to the next)."""
    policy = DraftLengthPolicy(max_draft)
    corpus_policy = draft_policy(max_draft)
    ratios = []
    for i, (ids, out) in enumerate(zip(prompts, outputs)):
        rid = f"replay-{i}"
        lookup = PromptLookup()
        lookup.extend(ids)
        lookup.extend(out[:1])  # the first token comes from the prompt's pass, undrafted
        pos, fast = 1, 0.0
        while pos < len(out):
            tokens = lookup.propose(max_draft)
            proposals: list[Proposal] = [(policy, lookup.last_match, tokens)]
            if corpus is not None:
                kind, tokens = corpus.proposal(lookup.ids, max_draft)
                proposals.append((corpus_policy, kind, tokens))
            best, k = choose(proposals, rid, out, pos, len(out) - pos - 1)
            right = right_tokens(proposals[best][2], out, pos, k) if best >= 0 else 0
            new = out[pos:pos + right + 1]
            for source_policy, match, tokens in proposals:
                source_policy.observe(rid, match, tokens, new)
            lookup.extend(new)
            pos += len(new)
            fast += cost(1 + k)
        policy.forget(rid)
        corpus_policy.forget(rid)
        ratios.append((len(out) - 1) * cost(1) / fast if fast > 0 else 1.0)
    return ratios


def greedy_answers(loaded: Any, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """The model's greedy answers to these prompts (the standard lane, one after another)."""
    from fastmode.engine.engine import Engine
    from fastmode.engine.request import Lane, SamplingParams

    engine = Engine(loaded.model, EngineConfig(kv_cache_tokens=8192), loaded.tokenizer.eos_ids)
    outputs = []
    for i, (ids, limit) in enumerate(zip(prompts, max_tokens)):
        out: list[int] = []
        done: list[bool] = []
        engine.add(f"answer-{i}", ids, SamplingParams(max_tokens=limit), Lane.STANDARD,
                   lambda d: (out.extend(d.token_ids), d.status.finished and done.append(True)))
        while not done:
            engine.step()
        outputs.append(out)
    return outputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="compare.json written by `fastmode bench --compare`")
    p.add_argument("--config", default="default", help="which fastmode configuration of the report (default, float32)")
    p.add_argument("--workload", default=None, help="the prompts to replay (default: the run's workload, with the run's outputs; "
                   "another workload: the model's greedy answers, made here)")
    p.add_argument("--no-corpus", action="store_true", help="replay prompt lookup alone")
    p.add_argument("--corpus", default=None, help="a draft corpus file to replay instead of the model's")
    args = p.parse_args(argv)

    from fastmode.bench.compare import prompt_ids
    from fastmode.bench.runner import WORKLOADS, load_workload
    from fastmode.weights.registry import load_model

    report = json.loads(Path(args.report).read_text())
    config = report["configs"].get(args.config)
    if config is None or "pass_ms" not in config:
        print(f"error: {args.report} has no pass times for configuration {args.config!r} "
              f"(it has: {', '.join(report['configs'])})", file=sys.stderr)
        return 2
    suffix = "" if args.config == "default" else f" {args.config}"
    cost = interpolate({int(r): t for r, t in config["pass_ms"].items()})
    workload = args.workload or report.get("workload") or str(WORKLOADS / "dev.jsonl")
    own = Path(workload).resolve() == Path(report.get("workload") or WORKLOADS / "dev.jsonl").resolve()
    loaded = load_model(report["model"], native_kernels=not own)
    tokenizer, corpus = loaded.tokenizer, None if args.no_corpus else loaded.draft_corpus
    if args.corpus and not args.no_corpus:
        corpus = DraftCorpus.load(Path(args.corpus), loaded.arch.vocab_size)
    items = load_workload(workload, None)
    if own:  # the run's outputs, as its standard lane produced them
        runs = sorted((r for r in report["runs"] if r["contender"] == f"fastmode standard{suffix}" and r["repeat"] == 0),
                      key=lambda r: r["prompt"])
        prompts = prompt_ids(tokenizer, report["model"], [items[r["prompt"]] for r in runs])
        outputs = [r["tokens"] for r in runs]
        cats = [r["category"] for r in runs]
    else:
        prompts = prompt_ids(tokenizer, report["model"], items)
        outputs = greedy_answers(loaded, prompts, [int(i.get("max_tokens", 200)) for i in items])
        cats = [i["category"] for i in items]
    max_draft = EngineConfig().max_draft
    ceiling = max(r * cost(1) / cost(r) for r in range(1, max_draft + 2))
    print(f"{args.config}: pass times {', '.join(f'{r}: {t:.1f} ms' for r, t in config['pass_ms'].items())}; "
          f"ceiling {ceiling:.2f}x")
    for name, choose in (("policy", policy_choice(cost)), ("perfect draft lengths", perfect_choice(cost))):
        ratios = replay(prompts, outputs, cost, choose, max_draft, corpus)
        by_cat: dict[str, list[float]] = {}
        for cat, r in zip(cats, ratios):
            by_cat.setdefault(cat, []).append(r)
        gmean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"{name}: " + ", ".join(f"{c} {statistics.median(v):.2f}x" for c, v in by_cat.items())
              + f"; geometric mean over {len(ratios)} prompts {gmean:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
