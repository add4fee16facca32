"""What identical outputs cost: in-process OTPS of the standard lane with and without
batch-invariant padding, and of the fast lane, on the shipped workload (greedy, interleaved).

    .venv/bin/python scripts/invariance_cost.py [--categories code_edit,qa] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

from fastmode.bench.runner import WORKLOADS, load_workload
from fastmode.config import EngineConfig
from fastmode.engine.engine import Engine
from fastmode.engine.request import Lane, SamplingParams
from fastmode.server.prompt import render_prompt
from fastmode.server.validate import api_fields, parse_messages_request
from fastmode.tokenizer.chat_template import ChatTemplate
from fastmode.weights.registry import DEFAULT_MODEL, load_model


def otps(engine: Engine, ids: list[int], lane: Lane, max_tokens: int) -> tuple[float, list[int]]:
    got: list[int] = []
    done: list[bool] = []
    engine.add(f"r{time.monotonic_ns()}", ids, SamplingParams(max_tokens=max_tokens), lane,
               lambda d: (got.extend(d.token_ids), d.status.finished and done.append(True)))
    first, n0 = None, 0
    while not done:
        engine.step()
        if got and first is None:
            first, n0 = time.perf_counter(), len(got)
    return (len(got) - n0) / (time.perf_counter() - first), got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--categories", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lm = load_model(DEFAULT_MODEL)
    template = ChatTemplate(lm.tokenizer.chat_template)
    engines = {inv: Engine(lm.model, EngineConfig(kv_cache_tokens=16384, invariant_numerics=inv), lm.tokenizer.eos_ids)
               for inv in (True, False)}
    configs = [("standard, invariant", True, Lane.STANDARD), ("standard, plain", False, Lane.STANDARD),
               ("fast, invariant", True, Lane.FAST)]
    results: dict[tuple[str, str], list[float]] = {}
    for item in load_workload(str(WORKLOADS / "dev.jsonl"), args.categories):
        req = parse_messages_request({"model": "m", **api_fields(item)}, "2023-06-01")
        ids = lm.tokenizer.encode(render_prompt(req, template))
        outs = {}
        for rep in range(args.repeats):
            order = configs if rep % 2 == 0 else configs[::-1]  # interleaved, order alternating
            for name, inv, lane in order:
                rate, outs[name] = otps(engines[inv], ids, lane, item["max_tokens"])
                results.setdefault((item["category"], name), []).append(rate)
        same = outs["standard, invariant"] == outs["fast, invariant"]
        print(f"{item['category']}: invariant lanes identical: {same}; plain standard identical too: "
              f"{outs['standard, plain'] == outs['fast, invariant']}", flush=True)
    print(f"\n{'category':<12}" + "".join(f"{n:>22}" for n, _, _ in configs) + f"{'fast/std inv':>14}{'fast/std plain':>16}")
    for cat in sorted({c for c, _ in results}):
        med = {n: statistics.median(results[(cat, n)]) for n, _, _ in configs}
        print(f"{cat:<12}" + "".join(f"{med[n]:>22.1f}" for n, _, _ in configs)
              + f"{med['fast, invariant'] / med['standard, invariant']:>14.2f}"
              + f"{med['fast, invariant'] / med['standard, plain']:>16.2f}")


if __name__ == "__main__":
    main()
