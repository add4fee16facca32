"""`fastmode bench --prompt-cache`: time to first token of a long prompt, cold and then cached,
at each speed, over HTTP; also checks that the second speed to see a prompt reads nothing."""
from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

import httpx
from tqdm import tqdm

from fastmode.bench.runner import (Sample, api_headers, first_model, json_of, measure, one_request, report_cut,
                                   served_standard, writable_out, write_json)

VOCAB = ("the", "system", "reads", "a", "long", "report", "about", "river", "trade", "in", "winter", "while",
         "ships", "carry", "grain", "north", "and", "salt", "south", "every", "port", "keeps", "its", "own",
         "ledger", "of", "prices", "weights", "tolls", "clerks", "copy", "figures", "into", "books")
QUESTION = "In one sentence, what is the document about?"


def document(seed: int, words: int) -> str:
    rng = random.Random(seed)
    sentences, n = [], 0
    while n < words:
        k = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(VOCAB) for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(sentences)


def item(seed: int, words: int) -> dict[str, Any]:
    return {"category": "prompt_cache", "max_tokens": 16,
            "system": [{"type": "text", "text": "Document " + str(seed) + ":\n" + document(seed, words),
                        "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": QUESTION}]}


async def words_for(client: httpx.AsyncClient, args: argparse.Namespace, model: str) -> int:
    """Document length in words that makes the prompt about `--prompt-tokens` tokens long."""
    probe = item(0, 500)
    counted = json_of(await client.post("/v1/messages/count_tokens", headers=api_headers(args), json={
        "model": model, "system": probe["system"], "messages": probe["messages"]}))
    return max(50, round(500 * args.prompt_tokens / counted["input_tokens"]))


async def run_rounds(client: httpx.AsyncClient, args: argparse.Namespace, model: str, words: int,
                     samples: list[tuple[int, str, str, Sample]]) -> None:
    """Measures into `samples` as requests finish, so that a run cut short keeps what it measured."""
    with tqdm(total=args.rounds * 4, desc="prompt cache", unit="req") as bar:
        for rnd in range(args.rounds):
            # a fresh document each round; which speed sees it first alternates
            seed = random.randrange(1 << 30)
            order = ("standard", "fast") if rnd % 2 == 0 else ("fast", "standard")
            for speed in order:
                for phase in ("cold", "warm"):
                    s = await one_request(client, args, model, item(seed, words), speed, rnd)
                    samples.append((rnd, speed, phase, s))
                    bar.update(1)


async def run_prompt_cache(args: argparse.Namespace) -> int:
    out = writable_out(args.out)
    samples: list[tuple[int, str, str, Sample]] = []  # (round, speed, cold/warm, sample)
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(600.0)) as client:
        model = await first_model(client, args)
        words = await words_for(client, args, model)
        cut = await measure(run_rounds(client, args, model, words, samples), samples)
    result: dict[str, Any] = {"mode": "prompt_cache", "model": model, "rounds": args.rounds, "speeds": {}}
    print(f"{'speed':<10}{'prompt':>8}{'cold TTFT':>11}{'cached TTFT':>13}{'ratio':>8}{'read':>7}")
    for speed in ("standard", "fast"):
        cold = [s for _, sp, ph, s in samples if sp == speed and ph == "cold"]
        warm = [s for _, sp, ph, s in samples if sp == speed and ph == "warm"]
        if not warm:  # a run cut short before this speed's first cached request
            continue
        row = {"prompt_tokens": statistics.median(s.cache_created + s.cache_read for s in cold),
               "cold_ttft": statistics.median(s.ttft for s in cold),
               "warm_ttft": statistics.median(s.ttft for s in warm),
               "warm_read": statistics.median(s.cache_read for s in warm),
               "ratios": [w.ttft / c.ttft for c, w in zip(cold, warm)]}
        row["median_ratio"] = statistics.median(row["ratios"])
        result["speeds"][speed] = row
        print(f"{speed:<10}{row['prompt_tokens']:>8.0f}{row['cold_ttft']:>11.3f}{row['warm_ttft']:>13.3f}"
              f"{row['median_ratio']:>8.2f}{row['warm_read']:>7.0f}")
    # the first request at the second speed of each round, right after the other speed cached the prompt
    crossed = [s for rnd, sp, ph, s in samples if ph == "cold" and sp == ("fast" if rnd % 2 == 0 else "standard")]
    result["cross_speed_reads"] = [s.cache_read for s in crossed]
    print(f"cached tokens read by the first request at the other speed: {result['cross_speed_reads']} (must be 0)")
    outputs: dict[int, list[str]] = {}
    for rnd, *_, s in samples:
        outputs.setdefault(rnd, []).append(s.text)
    # complete rounds only (cold and cached at both speeds): a round cut short compares less
    texts = {rnd: set(t) for rnd, t in outputs.items() if len(t) == 4}
    result["identical_outputs"] = [sum(len(t) == 1 for t in texts.values()), len(texts)]
    print(f"identical greedy outputs cold, cached and at both speeds: {result['identical_outputs'][0]}/{len(texts)} "
          f"documents")
    result["fast_served_standard"] = served_standard([s for *_, s in samples])
    result["cut_short"] = cut
    result["samples"] = [{"round": r, "speed": sp, "phase": ph, **s.__dict__} for r, sp, ph, s in samples]
    write_json(out / "prompt_cache.json", result)
    print(f"results: {out / 'prompt_cache.json'}")
    return report_cut(cut, out / "prompt_cache.json", samples)
