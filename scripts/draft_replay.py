"""How good the fast lane's draft lengths are: replay the greedy outputs a `fastmode bench
--compare` run recorded through the same prompt lookup and draft-length policy the engine
uses, cost every pass with the pass times that run measured by rows, and compare with a
draft length chosen knowing which drafts the model will accept (same proposals). Deterministic:
no timing noise, so policy changes can be judged here before they are measured for real.

    .venv/bin/python scripts/draft_replay.py bench-results/compare.json [--config default]

Prints, per category, the median over its prompts of standard time / fast time for: the
policy (what the fast lane should measure), perfect draft lengths, and the pass-cost ceiling.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from fastmode.config import EngineConfig
from fastmode.engine.speculation import DraftLengthPolicy, PromptLookup

Choose = Callable[[DraftLengthPolicy, str, int, list[int], list[int], int, int], int]


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
    def choose(policy, rid, match, proposal, output, pos, limit):
        return policy.choose(rid, match, 1, cost, limit)
    return choose


def perfect_choice(cost: Callable[[int], float]) -> Choose:
    """The draft length that maximizes tokens per pass time, knowing how many will be accepted."""
    def choose(policy, rid, match, proposal, output, pos, limit):
        right = 0
        while right < limit and proposal[right] == output[pos + right]:
            right += 1
        return max(range(right + 1), key=lambda k: (k + 1) / cost(1 + k))
    return choose


def replay(prompts: list[list[int]], outputs: list[list[int]], cost: Callable[[int], float], choose: Choose,
           max_draft: int) -> list[float]:
    """Standard time / fast time per prompt, the requests one after another in one lane (as the
    bench runs them: the policy's lane-wide rates carry from one request to the next)."""
    policy = DraftLengthPolicy(max_draft)
    ratios = []
    for i, (ids, out) in enumerate(zip(prompts, outputs)):
        rid = f"replay-{i}"
        lookup = PromptLookup()
        lookup.extend(ids)
        lookup.extend(out[:1])  # the first token comes from the prompt's pass, undrafted
        pos, fast = 1, 0.0
        while pos < len(out):
            proposal = lookup.propose(max_draft)
            k = choose(policy, rid, lookup.last_match, proposal, out, pos, min(len(out) - pos - 1, len(proposal)))
            right = 0
            while right < k and proposal[right] == out[pos + right]:
                right += 1
            new = out[pos:pos + right + 1]
            policy.observe(rid, lookup.last_match, proposal, new)
            lookup.extend(new)
            pos += len(new)
            fast += cost(1 + k)
        policy.forget(rid)
        ratios.append((len(out) - 1) * cost(1) / fast if fast > 0 else 1.0)
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="compare.json written by `fastmode bench --compare`")
    p.add_argument("--config", default="default", help="which fastmode configuration of the report (default, float32)")
    p.add_argument("--workload", default=None, help="the workload the run used (default: the report's)")
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
    tokenizer = load_model(report["model"], native_kernels=False).tokenizer
    items = load_workload(args.workload or report.get("workload") or str(WORKLOADS / "dev.jsonl"), None)
    runs = sorted((r for r in report["runs"] if r["contender"] == f"fastmode standard{suffix}" and r["repeat"] == 0),
                  key=lambda r: r["prompt"])
    prompts = prompt_ids(tokenizer, report["model"], [items[r["prompt"]] for r in runs])
    outputs = [r["tokens"] for r in runs]
    cats = [r["category"] for r in runs]
    max_draft = EngineConfig().max_draft
    ceiling = max(r * cost(1) / cost(r) for r in range(1, max_draft + 2))
    print(f"{args.config}: pass times {', '.join(f'{r}: {t:.1f} ms' for r, t in config['pass_ms'].items())}; "
          f"ceiling {ceiling:.2f}x")
    for name, choose in (("policy", policy_choice(cost)), ("perfect draft lengths", perfect_choice(cost))):
        ratios = replay(prompts, outputs, cost, choose, max_draft)
        by_cat: dict[str, list[float]] = {}
        for cat, r in zip(cats, ratios):
            by_cat.setdefault(cat, []).append(r)
        gmean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"{name}: " + ", ".join(f"{c} {statistics.median(v):.2f}x" for c, v in by_cat.items())
              + f"; geometric mean over {len(ratios)} prompts {gmean:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
