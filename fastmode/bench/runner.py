"""`fastmode bench`: TTFT and OTPS of any Anthropic-compatible endpoint, standard vs fast, over HTTP only."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Awaitable

import httpx
from tqdm import tqdm

WORKLOADS = Path(__file__).parent / "workloads"
# Requests carry no temperature, top_p or top_k, so the model's default decoding applies: greedy
# on fastmode's models, which the check that both speeds answer alike needs. (Temperature 0 is a
# 400 from models that take no sampling parameters: the fast-mode models of
# examples/anthropic-catalog.toml.) The version every Anthropic-compatible endpoint serves.
API_VERSION = "2023-06-01"


class RequestFailed(RuntimeError):
    """A measured request failed: the run ends there, and what it measured so far is written."""


@dataclass
class Sample:
    category: str
    prompt: int
    speed: str  # requested
    served: str  # usage.speed reported
    ttft: float  # seconds to the first text delta
    otps: float  # output tokens after the first / seconds after the first token
    output_tokens: int
    text: str
    background: bool = False
    cache_read: int = 0  # usage in message_start: prompt tokens read from the prompt cache
    cache_created: int = 0  # ... and written to it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server root, e.g. http://127.0.0.1:8000 (not with --compare)")
    p.add_argument("--workload", default=str(WORKLOADS / "dev.jsonl"), help="JSONL workload file")
    p.add_argument("--concurrency", type=int, default=None,
                   help="standard streams kept running in the background while fast requests are measured")
    p.add_argument("--model", default=None,
                   help="model id (default: the first one the server lists); with --compare, the model to load")
    p.add_argument("--repeats", type=int, default=1, help="runs of each prompt per speed")
    p.add_argument("--max-tokens", type=int, default=None, help="override every prompt's max_tokens")
    p.add_argument("--categories", default=None, help="comma-separated categories to run")
    p.add_argument("--api-key", default="bench")
    p.add_argument("--out", default="bench-results", help="folder for results.json and the plot")
    p.add_argument("--fast-beta", action="store_true", help="send anthropic-beta: fast-mode-2026-02-01")
    p.add_argument("--prompt-cache", action="store_true",
                   help="measure prompt caching instead: TTFT of a long prompt cold, then cached, at each speed")
    p.add_argument("--rounds", type=int, default=5, help="--prompt-cache: documents to run (one per round)")
    p.add_argument("--prompt-tokens", type=int, default=2000, help="--prompt-cache: length of each document")
    p.add_argument("--asked-again", action="store_true",
                   help="measure the draft pool instead: each prompt standard, then twice fast as one end user")


def check_args(args: argparse.Namespace) -> None:
    """Bad flags are errors before anything runs, not found at the end of a run (or a mode
    silently left out for another)."""
    for flag in ("repeats", "rounds", "concurrency", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be at least 1, not {value}")
    modes = [flag for flag, given in (("--compare", getattr(args, "compare", False)),
                                      ("--prompt-cache", args.prompt_cache), ("--asked-again", args.asked_again),
                                      ("--concurrency", args.concurrency is not None)) if given]
    if len(modes) > 1:
        raise ValueError(f"{modes[0]} and {modes[1]} cannot be used together: one mode at a time")
    if modes == ["--compare"] and args.url:
        raise ValueError("--compare runs in-process: it takes no --url")


def writable_out(path: str) -> Path:
    """The --out folder, made and checked writable before any request: found only at the end, an
    unwritable one lost the whole run's results."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"--out {path}: cannot write results there: {e.strerror or e}") from e
    return out


def load_workload(path: str, categories: str | None) -> list[dict[str, Any]]:
    """The workload's prompts; `categories`: the comma-separated ones to keep, each a category the
    workload has (a misspelt one is an error, not a run without it)."""
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {e}") from e
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        if "category" not in item or "messages" not in item:
            raise ValueError(f"{path}:{i + 1}: each line needs `category` and `messages`")
        items.append(item)
    if categories is not None:
        wanted = [name.strip() for name in categories.split(",")]
        known = {it["category"] for it in items}
        for name in wanted:
            if not name:
                raise ValueError(f"--categories: an empty name in {categories!r}")
            if name not in known:
                raise ValueError(f"--categories: {name!r} is not a category of {path} (it has "
                                 f"{', '.join(sorted(known))})")
        items = [it for it in items if it["category"] in wanted]
    if not items:
        raise ValueError(f"{path}: no prompts to run")
    return items


def api_headers(args: argparse.Namespace) -> dict[str, str]:
    return {"x-api-key": args.api_key, "anthropic-version": API_VERSION}


def json_of(r: httpx.Response) -> Any:
    """The JSON body of a 200 answer, else a one-line error with the server's own message."""
    if r.status_code != 200:
        raise RuntimeError(f"{r.request.url}: HTTP {r.status_code}: {r.text[:300]}")
    try:
        return r.json()
    except ValueError as e:
        raise RuntimeError(f"{r.request.url}: the answer is not JSON: {r.text[:100]!r}") from e


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str, item: dict[str, Any],
                      speed: str, index: int, background: bool = False, user: str | None = None) -> Sample:
    """One streamed request, timed; a failure is a RequestFailed that names the prompt and speed."""
    # each request an end user of its own unless `user` is given: the server's draft pool, which
    # drafts from answers the same user was given, must not make a repeated prompt's later runs faster
    body = {"model": model, "max_tokens": args.max_tokens or item.get("max_tokens", 256),
            "messages": item["messages"], "stream": True,
            "metadata": {"user_id": user or f"bench-{uuid.uuid4().hex}"}}
    if item.get("system"):
        body["system"] = item["system"]
    if speed == "fast":
        body["speed"] = "fast"
    headers = api_headers(args)
    if args.fast_beta:
        headers["anthropic-beta"] = "fast-mode-2026-02-01"
    t0 = time.perf_counter()
    first = None
    text, served, out_tokens, event, usage = [], "standard", 0, None, {}
    try:
        async with client.stream("POST", "/v1/messages", json=body, headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "message_start":
                        usage = data["message"]["usage"]
                        served = usage.get("speed") or "standard"
                    elif event == "content_block_delta" and data["delta"].get("type") == "text_delta":
                        if first is None:
                            first = time.perf_counter()
                        text.append(data["delta"]["text"])
                    elif event == "message_delta":
                        out_tokens = data["usage"]["output_tokens"]
                    elif event == "error":
                        raise RuntimeError(f"stream error: {data}")
    except (httpx.HTTPError, RuntimeError, ValueError, KeyError, TypeError) as e:  # the last two: odd events
        raise RequestFailed(f"the request for prompt {index} ({item['category']}) at {speed} speed"
                            f"{' in the background' if background else ''} failed: {str(e) or type(e).__name__}") from e
    end = time.perf_counter()
    first = first or end
    otps = (out_tokens - 1) / (end - first) if out_tokens > 1 and end > first else 0.0
    return Sample(item["category"], index, speed, served, first - t0, otps, out_tokens, "".join(text), background,
                  usage.get("cache_read_input_tokens") or 0, usage.get("cache_creation_input_tokens") or 0)


def summarize(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per category: median OTPS and TTFT per speed, and the fast/standard ratios."""
    table: dict[str, dict[str, float]] = {}
    for cat in sorted({s.category for s in samples if not s.background}):
        row: dict[str, float] = {}
        for speed in ("standard", "fast"):
            ss = [s for s in samples if s.category == cat and s.speed == speed and not s.background]
            if ss:
                row[f"{speed}_otps"] = statistics.median(s.otps for s in ss)
                row[f"{speed}_ttft"] = statistics.median(s.ttft for s in ss)
        if "standard_otps" in row and "fast_otps" in row:
            row["otps_ratio"] = row["fast_otps"] / row["standard_otps"] if row["standard_otps"] else float("nan")
            row["ttft_ratio"] = row["fast_ttft"] / row["standard_ttft"] if row["standard_ttft"] else float("nan")
        table[cat] = row
    return table


def identical_outputs(samples: list[Sample]) -> tuple[int, int]:
    """(prompts whose texts were all identical, at every speed they ran at, prompts run at both
    standard and fast speed)."""
    texts: dict[tuple[str, int], dict[str, set[str]]] = {}
    for s in samples:
        if not s.background:
            texts.setdefault((s.category, s.prompt), {}).setdefault(s.speed, set()).add(s.text)
    compared = [t for t in texts.values() if t.get("standard") and t.get("fast")]
    same = sum(len(t["standard"]) == 1 and all(v == t["standard"] for v in t.values()) for t in compared)
    return same, len(compared)


# Each run_* measures into `samples` as its requests finish, so that a run cut short (a failed
# request, Ctrl-C) still has what it measured.

async def run_idle(client: httpx.AsyncClient, args: argparse.Namespace, model: str,
                   items: list[dict[str, Any]], samples: list[Sample]) -> None:
    with tqdm(total=len(items) * args.repeats * 2, desc="bench (idle)", unit="req") as bar:
        for rep in range(args.repeats):
            for i, item in enumerate(items):
                order = ("standard", "fast") if (rep + i) % 2 == 0 else ("fast", "standard")  # interleaved
                for speed in order:
                    samples.append(await one_request(client, args, model, item, speed, i))
                    bar.update()


async def run_loaded(client: httpx.AsyncClient, args: argparse.Namespace, model: str,
                     items: list[dict[str, Any]], samples: list[Sample]) -> None:
    """Keep `concurrency` standard streams running; measure fast requests one at a time meanwhile.
    A background stream that fails (a 429) ends the run: the fast requests after it would be
    measured under less load than asked."""
    stop = asyncio.Event()
    measuring = asyncio.Event()
    failed: list[RequestFailed] = []

    async def background(k: int) -> None:
        j = k
        try:
            while not stop.is_set():
                item = items[j % len(items)]
                s = await one_request(client, args, model, item, "standard", j % len(items), background=True)
                if measuring.is_set() and not stop.is_set():
                    samples.append(s)
                j += 1
        except RequestFailed as e:
            failed.append(e)

    tasks = [asyncio.create_task(background(k)) for k in range(args.concurrency)]
    try:
        await asyncio.sleep(2.0)  # let the background streams get past their prefill
        measuring.set()
        with tqdm(total=len(items) * args.repeats, desc=f"bench (fast vs {args.concurrency} standard)",
                  unit="req") as bar:
            for i, item in [(i, item) for _ in range(args.repeats) for i, item in enumerate(items)]:
                if failed:
                    break
                samples.append(await one_request(client, args, model, item, "fast", i))
                bar.update()
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if failed:
        raise RequestFailed(f"{len(failed)} of {args.concurrency} background streams failed; the first: {failed[0]}")


async def run_again(client: httpx.AsyncClient, args: argparse.Namespace, model: str,
                    items: list[dict[str, Any]], samples: list[Sample]) -> None:
    """Each prompt in the standard lane, then twice in the fast lane as one end user (new for each
    prompt and repeat): the second fast answer can draft from the first in the server's draft
    pool, as a regenerated answer or a retried request does."""
    with tqdm(total=len(items) * args.repeats * 3, desc="bench (asked again)", unit="req") as bar:
        for rep in range(args.repeats):
            for i, item in enumerate(items):
                user = f"bench-{uuid.uuid4().hex}"
                samples.append(await one_request(client, args, model, item, "standard", i))
                samples.append(await one_request(client, args, model, item, "fast", i, user=user))
                again = await one_request(client, args, model, item, "fast", i, user=user)
                samples.append(replace(again, speed="fast again"))
                bar.update(3)


async def measure(run: Awaitable[None], samples: list[Any]) -> str | None:
    """Await a run_* that measures into `samples`; why it ended early (a failed request, Ctrl-C),
    or None. Cut short before anything was measured, it is an error: there is nothing to write
    (and an earlier run's results in --out stay)."""
    try:
        await run
        return None
    except RequestFailed as e:
        why = str(e)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels the main task
        asyncio.current_task().uncancel()  # handled: the task goes on to write the results
        why = "interrupted"
    if not samples:
        raise RuntimeError(f"the run was cut short before anything was measured: {why}")
    return why


def report_cut(why: str | None, path: Path, samples: list[Any]) -> int:
    """The exit status: 1, said on stderr, for a run cut short (`why`)."""
    if why is None:
        return 0
    print(f"fastmode bench: the run was cut short: {why}; {path} holds the {len(samples)} requests measured "
          f"before that", file=sys.stderr)
    return 1


def served_standard(samples: list[Sample]) -> int:
    """How many fast requests the server ran at standard speed (usage.speed), warned of: a model
    whose fast mode falls back silently serves them so, and their numbers are not fast mode's."""
    fast = [s for s in samples if s.speed != "standard"]
    slow = sum(s.served != "fast" for s in fast)
    if slow:
        print(f"warning: {slow} of {len(fast)} fast requests were served at standard speed (usage.speed): "
              f"their numbers are not fast mode's", file=sys.stderr)
    return slow


def again_table(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per category: median OTPS standard, fast and fast asked again, and the ratios to standard."""
    table = {}
    for cat in sorted({s.category for s in samples}):
        row = {}
        for key, speed in (("standard", "standard"), ("fast", "fast"), ("again", "fast again")):
            otps = [s.otps for s in samples if s.category == cat and s.speed == speed]
            if otps:  # a run cut short can lack a category's later requests
                row[f"{key}_otps"] = statistics.median(otps)
        for key, ratio in (("fast", "otps_ratio"), ("again", "again_ratio")):
            if row.get("standard_otps") and f"{key}_otps" in row:
                row[ratio] = row[f"{key}_otps"] / row["standard_otps"]
        table[cat] = row
    return table


def print_table(table: dict[str, dict[str, float]], columns: list[tuple[str, str, int, str]]) -> None:
    """A header line, then a line per category: columns are (header, the row's key, width,
    format); a value a row lacks prints as 0."""
    print(f"{'category':<14}" + "".join(f"{header:>{width}}" for header, _, width, _ in columns))
    for cat, row in table.items():
        print(f"{cat:<14}" + "".join(f"{row.get(key, 0):>{width}{fmt}}" for _, key, width, fmt in columns))


def loaded_table(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """Per category: fast medians against the median of all background standard streams."""
    std = [s for s in samples if s.background]
    std_otps = statistics.median(s.otps for s in std) if std else 0.0
    std_ttft = statistics.median(s.ttft for s in std) if std else 0.0
    table = {}
    for cat in sorted({s.category for s in samples if not s.background}):
        fast = [s for s in samples if s.category == cat and not s.background]
        row = {"standard_otps": std_otps, "standard_ttft": std_ttft,
               "fast_otps": statistics.median(s.otps for s in fast),
               "fast_ttft": statistics.median(s.ttft for s in fast)}
        row["otps_ratio"] = row["fast_otps"] / std_otps if std_otps else float("nan")
        table[cat] = row
    return table


def plot(table: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "otps", "median output tokens/s"), (axes[1], "ttft", "median TTFT (s)")):
        for j, speed in enumerate(("standard", "fast")):
            vals = [table[c].get(f"{speed}_{metric}", 0.0) for c in cats]
            ax.bar([x + 0.4 * j for x in range(len(cats))], vals, width=0.4, label=speed)
        ax.set_xticks([x + 0.2 for x in range(len(cats))], cats, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(value: Any) -> Any:
    """`value` with NaN (an undefined ratio, e.g. of zero OTPS with one output token each) as
    None: JSON has no NaN, and strict parsers refuse the bare NaN json.dumps writes."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(finite(result), indent=2, allow_nan=False))


async def first_model(client: httpx.AsyncClient, args: argparse.Namespace) -> str:
    if args.model is not None:
        return args.model
    listed = json_of(await client.get("/v1/models", headers=api_headers(args)))
    try:
        return listed["data"][0]["id"]
    except (KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"{args.url}/v1/models lists no model (its answer has no data[0].id): "
                           f"name one with --model") from e


async def _main(args: argparse.Namespace) -> int:
    if args.prompt_cache:
        from fastmode.bench.prompt_cache import run_prompt_cache
        return await run_prompt_cache(args)
    items = load_workload(args.workload, args.categories)
    out = writable_out(args.out)
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(600.0)) as client:
        model = await first_model(client, args)
        run = run_again if args.asked_again else run_loaded if args.concurrency else run_idle
        cut = await measure(run(client, args, model, items, samples), samples)
    result: dict[str, Any]
    if args.asked_again:
        table = again_table(samples)
        same, total = identical_outputs(samples)
        result = {"mode": "asked again", "model": model, "categories": table, "identical_outputs": [same, total]}
        print_table(table, [("std OTPS", "standard_otps", 10, ".1f"), ("fast OTPS", "fast_otps", 11, ".1f"),
                            ("ratio", "otps_ratio", 7, ".2f"), ("again OTPS", "again_otps", 12, ".1f"),
                            ("ratio", "again_ratio", 7, ".2f")])
        print(f"identical greedy outputs (standard, fast, fast again): {same}/{total} prompts")
    elif args.concurrency:
        table = loaded_table(samples)
        std = [s.otps for s in samples if s.background]
        fast = [s.otps for s in samples if not s.background]
        std_median = next(iter(table.values()))["standard_otps"] if std and table else None
        result = {"mode": "loaded", "concurrency": args.concurrency, "standard_stream_median_otps": std_median,
                  "fast_median_otps": statistics.median(fast) if fast else None, "categories": table}
        if std_median and fast:
            result["ratio"] = result["fast_median_otps"] / std_median
        print(f"{args.concurrency} standard streams: median OTPS {result['standard_stream_median_otps'] or 0:.2f} "
              f"over {len(std)} completed streams")
        print_table(table, [("fast OTPS", "fast_otps", 11, ".1f"), ("x standard", "otps_ratio", 12, ".2f"),
                            ("fast TTFT", "fast_ttft", 11, ".3f")])
        if "ratio" in result:
            print(f"all fast requests: median OTPS {result['fast_median_otps']:.2f}, {result['ratio']:.2f}x the standard streams")
    else:
        table = summarize(samples)
        same, total = identical_outputs(samples)
        result = {"mode": "idle", "model": model, "categories": table, "identical_outputs": [same, total]}
        print_table(table, [("std OTPS", "standard_otps", 10, ".1f"), ("fast OTPS", "fast_otps", 11, ".1f"),
                            ("ratio", "otps_ratio", 7, ".2f"), ("std TTFT", "standard_ttft", 10, ".3f"),
                            ("fast TTFT", "fast_ttft", 11, ".3f"), ("ratio", "ttft_ratio", 7, ".2f")])
        print(f"identical greedy outputs between speeds: {same}/{total} prompts")
    result["fast_served_standard"] = served_standard(samples)
    result["cut_short"] = cut
    result["samples"] = [asdict(s) for s in samples]
    write_json(out / "results.json", result)
    if args.asked_again:  # no plot: the table is the result; an earlier run's would sit next to it
        (out / "bench.png").unlink(missing_ok=True)
        print(f"results: {out / 'results.json'}")
    else:
        plot(table, out / "bench.png", f"fastmode bench: {args.url} ({'idle' if not args.concurrency else f'{args.concurrency} standard streams'})")
        print(f"results: {out / 'results.json'}, plot: {out / 'bench.png'}")
    return report_cut(cut, out / "results.json", samples)


def main(args: argparse.Namespace) -> int:
    check_args(args)
    if getattr(args, "compare", False):
        from fastmode.bench.compare import run_compare
        return run_compare(args)
    if not args.url:
        raise SystemExit("fastmode bench: --url is required (or --compare, which runs in-process)")
    try:
        return asyncio.run(_main(args))
    except httpx.HTTPError as e:
        raise RuntimeError(f"could not talk to {args.url}: {e!r}") from e
