"""`fastmode bench --compare`: decode speed in one process, fastmode's two lanes next to the
anchors a CPU user compares with, those installed: llama.cpp (llama-cpp-python) and Hugging Face
transformers, each on the same GGUF with the same threads, with and without its prompt-lookup
decoding. Every prompt runs every contender in turn, the order rotating, so machine noise lands
on all of them alike; medians per category. Also reports the machine's memory read bandwidth
next to what batch-1 decoding streams."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from fastmode.bench.runner import WORKLOADS, load_workload, writable_out
from fastmode.config import DTYPES


@dataclass
class Run:
    contender: str
    category: str
    prompt: int
    repeat: int
    ttft: float  # seconds to the first generated token
    otps: float  # tokens after the first / seconds after the first
    tokens: list[int]


Generate = Callable[[list[int], int], Iterator[int]]  # prompt ids, max tokens -> generated ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare", action="store_true",
                   help="in-process decode speed: fastmode's lanes vs llama.cpp and Hugging Face transformers, "
                   "those installed (no server needed)")
    p.add_argument("--threads", type=int, default=0, help="--compare: threads for every contender (0: all cores)")
    p.add_argument("--page", default=None, help="--compare: also write a benchmarks page (markdown) here")
    p.add_argument("--streams", type=int, default=8,
                   help="--compare: also measure the standard lane with this many streams at once (0: skip)")
    p.add_argument("--native-kernels", choices=("on", "off", "both"), default="both",
                   help="--compare: fastmode on its native quantized kernels (on, the server's default), on "
                        "float32 weights (off), or both side by side")
    p.add_argument("--device", default="cpu",
                   help="--compare: run fastmode's float path on this device (cuda, cuda:N); on a GPU the CPU "
                        "anchors and the native kernels are left out")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="--compare: the float path's precision (default float32 on the CPU, bfloat16 on a GPU)")


def timed(gen: Iterator[int], max_tokens: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    first = None
    out: list[int] = []
    for tok in gen:
        out.append(tok)
        if first is None:
            first = time.perf_counter()
        if len(out) >= max_tokens:
            break
    end = time.perf_counter()
    if first is None:
        return end - t0, 0.0, out
    return first - t0, (len(out) - 1) / (end - first) if len(out) > 1 and end > first else 0.0, out


# A pause before each contender's run, so that the threads of the one before (llama.cpp's pool
# polls for work after a generation) do not slow its first passes: right after a llama.cpp
# generation two 2-thread passes of ours took 7.1 and 5.2 ms, against 3.4 and 3.1 ms after 10 ms.
SETTLE_SECONDS = 0.03


def settle() -> None:
    time.sleep(SETTLE_SECONDS)


# the fast lane's other draft-head setting, by whether the engine drafts with the head by default
OTHER_HEAD = {True: "without head", False: "draft head"}
# and its other draft-corpus setting
OTHER_CORPUS = {True: "without corpus", False: "draft corpus"}


def fastmode_contenders(model_name: str, threads: int, native: bool, suffix: str = "", device: str = "cpu",
                        dtype: str = "float32") -> tuple[
        dict[str, Generate], Any, Callable[[list[list[int]], int], float], Callable[[list[int], int], dict[int, float]]]:
    import torch

    from fastmode.config import EngineConfig
    from fastmode.engine.engine import Engine
    from fastmode.engine.request import Lane, SamplingParams
    from fastmode.weights.registry import load_model

    loaded = load_model(model_name, native_kernels=native)

    def make_engine() -> Engine:
        return Engine(loaded.model, EngineConfig(num_threads=threads, kv_cache_tokens=16384, device=device, dtype=dtype),
                      loaded.tokenizer.eos_ids, draft_head=loaded.draft_head, draft_corpus=loaded.draft_corpus)

    engine = make_engine()
    torch.set_num_threads(threads or torch.get_num_threads())

    default_head, default_corpus = engine.drafter is not None, engine.corpus is not None
    if loaded.draft_corpus is not None:
        loaded.draft_corpus.index()  # measured with its index built (the engine builds it in the background)

    def lane(which: Lane, head: bool | None = None, corpus: bool | None = None) -> Generate:
        """`head`, `corpus`: the fast lane drafting with the model's draft head / corpus or not.
        Such a contender runs an engine of its own (the same weights), as a server with that
        setting would: sharing the default engine, its passes (slower with the head's taps) and
        its drafts' outcomes trained the default fast lane's pass-cost line, thread chooser and
        draft policies."""
        own = engine
        if head is not None or corpus is not None:
            own = make_engine()
            if head is not None:
                own.use_draft_head(head)
            if corpus is not None:
                own.use_draft_corpus(corpus)

        def generate(ids: list[int], max_tokens: int) -> Iterator[int]:
            got: list[int] = []
            done: list[bool] = []
            own.add(f"cmp-{time.monotonic_ns()}", ids, SamplingParams(max_tokens=max_tokens), which,
                    lambda d: (got.extend(d.token_ids), d.status.finished and done.append(True)))
            sent = 0
            while True:
                own.step()
                while sent < len(got):
                    yield got[sent]
                    sent += 1
                if done:
                    return
        return generate

    def many(prompts: list[list[int]], max_tokens: int) -> float:
        """Aggregate tokens per second of these prompts decoding together in the standard lane
        (tokens after each stream's first, over the time after the first token of them all)."""
        got = [0] * len(prompts)
        done: list[int] = []
        for i, ids in enumerate(prompts):
            engine.add(f"agg-{time.monotonic_ns()}-{i}", ids, SamplingParams(max_tokens=max_tokens), Lane.STANDARD,
                       lambda d, i=i: (got.__setitem__(i, got[i] + len(d.token_ids)),
                                       d.status.finished and done.append(i)))
        while not all(got) and len(done) < len(prompts):
            engine.step()
        t0, g0 = time.perf_counter(), sum(got)
        while len(done) < len(prompts):
            engine.step()
        return (sum(got) - g0) / max(time.perf_counter() - t0, 1e-9)

    def pass_times(ids: list[int], repeats: int) -> dict[int, float]:
        """Median seconds of one decode pass of a request at this prompt's context, by rows: the
        request's next token plus r - 1 draft tokens, r up to the engine's most (max_draft + 1).
        What verifying drafts costs on this machine, so what the fast lane can gain at best.
        Empty if the request ends at its first token (another prompt is needed then)."""
        from fastmode.engine.scheduler import Scheduled
        top = engine.config.max_draft + 1
        rows = sorted({r for r in (1, 2, 3, 4, 6, 8, 12, 16) if r <= top} | {top})
        got: list[int] = []
        done: list[bool] = []
        rid = f"pass-{time.monotonic_ns()}"
        engine.add(rid, ids, SamplingParams(max_tokens=top + 1), Lane.STANDARD,
                   lambda d: (got.extend(d.token_ids), d.status.finished and done.append(True)))
        while not got and not done:  # the prompt, then stop at its first decode position
            engine.step()
        if done:
            return {}
        req = engine.requests[rid]
        times: dict[int, list[float]] = {r: [] for r in rows}
        draft = got[-1]
        for rep in range(repeats):
            for r in rows if rep % 2 == 0 else rows[::-1]:  # interleaved, alternating direction
                plan = [Scheduled(req, 1, [draft] * (r - 1))]
                t0 = time.perf_counter()
                engine.runner.run(plan)
                times[r].append(time.perf_counter() - t0)
        engine.abort(rid)
        engine.step()  # takes the abort: nothing else is running
        return {r: statistics.median(ts) for r, ts in times.items()}

    lanes = {f"fastmode standard{suffix}": lane(Lane.STANDARD), f"fastmode fast{suffix}": lane(Lane.FAST)}
    if loaded.draft_corpus is not None:  # the fast lane with the other corpus setting, interleaved
        lanes[f"fastmode fast {OTHER_CORPUS[default_corpus]}{suffix}"] = lane(Lane.FAST, corpus=not default_corpus)
    if loaded.draft_head is not None:  # the fast lane with the other draft-head setting, interleaved
        lanes[f"fastmode fast {OTHER_HEAD[default_head]}{suffix}"] = lane(Lane.FAST, head=not default_head)
    return lanes, loaded, many, pass_times


def llama_cpp_contenders(gguf: Path, threads: int, eos: set[int]) -> dict[str, Generate]:
    try:
        import llama_cpp
    except ImportError:
        return {}
    out: dict[str, Generate] = {}
    kinds: list[tuple[str, Any]] = [("llama.cpp", None)]
    try:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        kinds.append(("llama.cpp prompt lookup", LlamaPromptLookupDecoding(num_pred_tokens=10)))
    except ImportError:
        pass
    for name, draft in kinds:
        llm = llama_cpp.Llama(str(gguf), n_threads=threads or None, n_threads_batch=threads or None, n_ctx=4096,
                              n_batch=512, verbose=False, draft_model=draft)

        def generate(ids: list[int], max_tokens: int, llm: Any = llm) -> Iterator[int]:
            llm.reset()
            for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                if tok in eos or tok == llm.token_eos():
                    return
                yield tok
        out[name] = generate
    return out


def transformers_contenders(gguf: Path, threads: int, eos: set[int]) -> dict[str, Generate]:
    """Hugging Face transformers on the same GGUF (dequantized to float32 by transformers),
    greedy and with its prompt-lookup decoding, when transformers, gguf and accelerate are
    installed."""
    try:
        import threading
        import queue

        import torch
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        return {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, ValueError, OSError) as e:  # e.g. gguf or accelerate missing
        print(f"compare: transformers cannot load {gguf.name}: {e}")
        return {}
    model.eval()

    class Tokens(BaseStreamer):  # hands generated ids to the consuming thread as they come
        def __init__(self) -> None:
            self.q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            self.prompt = True

        def put(self, value: Any) -> None:
            if self.prompt:  # the first call carries the prompt
                self.prompt = False
                return
            for tok in value.reshape(-1).tolist():
                self.q.put(tok)

        def end(self) -> None:
            self.q.put(None)

    def kind(lookup: int | None) -> Generate:
        def generate(ids: list[int], max_tokens: int) -> Iterator[int]:
            torch.set_num_threads(threads or torch.get_num_threads())
            x = torch.tensor([ids])
            streamer = Tokens()

            def work() -> None:
                try:
                    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                                   prompt_lookup_num_tokens=lookup, eos_token_id=sorted(eos), streamer=streamer)
                finally:  # the consumer must not wait forever if generate fails
                    streamer.q.put(None)
            worker = threading.Thread(target=work)
            worker.start()
            try:
                while (tok := streamer.q.get()) is not None:
                    if tok in eos:
                        break
                    yield tok
            finally:
                worker.join()
        return generate

    return {"transformers": kind(None), "transformers prompt lookup": kind(10)}


def aggregate_otps(generate_many: Callable[[list[list[int]], int], float], prompts: list[list[int]],
                   max_tokens: int, repeats: int) -> dict[str, float]:
    """Standard-lane throughput of len(prompts) streams at once against one stream, interleaved."""
    one, many = [], []
    for _ in range(repeats):
        one.append(statistics.median(generate_many([p], max_tokens) for p in prompts))
        many.append(generate_many(prompts, max_tokens))
    return {"streams": len(prompts), "one": statistics.median(one), "many": statistics.median(many),
            "ratio": statistics.median(many) / statistics.median(one), "rounds": repeats}


def read_bandwidth_gbs(threads: int, device: str = "cpu") -> float:
    """Memory read bandwidth: the best of several sums over a 512 MB buffer (2 GB on a GPU), in GB/s."""
    import torch
    torch.set_num_threads(threads or torch.get_num_threads())
    gpu = torch.device(device).type == "cuda"
    x = torch.ones((512 if gpu else 128) * 1024 * 1024, device=device)
    best = float("inf")
    for _ in range(5):
        if gpu:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        x.sum().item()  # .item() waits for a GPU
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def prompt_ids(tokenizer: Any, model: str, items: list[dict[str, Any]]) -> list[list[int]]:
    """The token ids of workload items' prompts, as the server would render them for `model`."""
    from fastmode.server.prompt import render_prompt
    from fastmode.server.validate import api_fields, parse_messages_request
    from fastmode.tokenizer.chat_template import ChatTemplate

    template = ChatTemplate(tokenizer.chat_template)
    bodies = [{"model": model, "max_tokens": 1, **api_fields(item)} for item in items]
    return [tokenizer.encode(render_prompt(parse_messages_request(body, "2023-06-01"), template)) for body in bodies]


def run_compare(args: argparse.Namespace) -> int:
    from fastmode.weights.registry import DEFAULT_MODEL, pull

    model = args.model or DEFAULT_MODEL
    out = writable_out(args.out)  # before minutes of loading and measuring
    items = load_workload(args.workload, args.categories)
    contenders: dict[str, Generate] = {}
    weights: dict[str, Any] = {}  # configuration suffix -> the loaded model
    batched: dict[str, Callable[[list[list[int]], int], float]] = {}  # suffix -> N streams at once
    passes: dict[str, Callable[[list[int], int], dict[int, float]]] = {}  # suffix -> pass time by rows
    on_cpu = args.device == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    # the native kernels are the CPU's float32 path; elsewhere only torch's float path runs
    kinds = {"on": [True], "off": [False], "both": [True, False]}[args.native_kernels] if on_cpu else [False]
    for native in kinds:
        # the server's default configuration keeps the plain names
        suffix = f" {dtype}" if not native and len(kinds) > 1 else ""
        more, weights[suffix], batched[suffix], passes[suffix] = fastmode_contenders(
            model, args.threads, native, suffix, args.device, "float32" if native else dtype)
        contenders.update(more)
    loaded = next(iter(weights.values()))
    gguf = pull(model) if model == DEFAULT_MODEL else Path(model)
    if gguf.suffix == ".gguf" and on_cpu:  # the anchors run on the CPU
        contenders.update(llama_cpp_contenders(gguf, args.threads, set(loaded.tokenizer.eos_ids)))
        contenders.update(transformers_contenders(gguf, args.threads, set(loaded.tokenizer.eos_ids)))
    prompts = prompt_ids(loaded.tokenizer, model, items)
    names = list(contenders)
    runs: list[Run] = []
    bar = tqdm(total=len(items) * args.repeats * len(names), desc="compare", unit="run")
    for rep in range(args.repeats):
        for i, (item, ids) in enumerate(zip(items, prompts)):
            max_tokens = args.max_tokens or item.get("max_tokens", 256)
            k = (rep * len(items) + i) % len(names)
            for name in names[k:] + names[:k]:  # rotate who goes first
                settle()
                ttft, otps, toks = timed(contenders[name](ids, max_tokens), max_tokens)
                runs.append(Run(name, item["category"], i, rep, ttft, otps, toks))
                bar.update(1)
    bar.close()
    streams = {}
    settle()
    if args.streams > 1:  # the standard lane's batching: N prompts at once against one at a time
        first = (prompts * args.streams)[:args.streams]
        for suffix, many in tqdm(batched.items(), desc="streams"):
            streams[suffix.strip() or "default"] = aggregate_otps(many, first, 48, max(args.repeats, 5))
    costs: dict[str, dict[int, float]] = {}  # suffix -> pass seconds by rows
    contexts: dict[str, int] = {}
    settle()
    for suffix, pass_times in passes.items():
        for ids in prompts:  # the first prompt whose answer does not end at its first token
            if times := pass_times(ids, 7):
                costs[suffix], contexts[suffix] = times, len(ids)
                break
    bandwidth = read_bandwidth_gbs(args.threads, args.device)
    table = summarize(runs, names)
    configs = {}
    for suffix, lm in weights.items():
        std, fast = f"fastmode standard{suffix}", f"fastmode fast{suffix}"
        same = sum(1 for a in runs if a.contender == fast for b in runs
                   if b.contender == std and (a.prompt, a.repeat) == (b.prompt, b.repeat) and a.tokens == b.tokens)
        std_otps = statistics.median(r.otps for r in runs if r.contender == std)
        configs[suffix.strip() or "default"] = {
            "weights": ("native quantized kernels" if lm.model.native else
                        f"{str(next(lm.model.parameters()).dtype).removeprefix('torch.')} in torch"
                        + ("" if lm.model.device.type == "cpu" else f" on {lm.model.device}")),
            "weight_bytes": lm.weight_bytes, "decode_bandwidth_gbs": lm.weight_bytes * std_otps / 1e9,
            "identical_fast_standard": [same, sum(1 for a in runs if a.contender == fast)],
            "fast_over_standard": {cat: row[fast] / row[std] for cat, row in table.items() if row[std] > 0}}
        variants = {label: {cat: row[other] / row[std] for cat, row in table.items() if row[std] > 0}
                    for label in [*OTHER_CORPUS.values(), *OTHER_HEAD.values()]
                    if (other := f"fastmode fast {label}{suffix}") in names}
        if variants:  # the fast lane with another drafting setting
            configs[suffix.strip() or "default"]["variants_over_standard"] = variants
        if suffix in costs:
            configs[suffix.strip() or "default"].update({
                "pass_context": contexts[suffix], "pass_ms": {r: t * 1e3 for r, t in costs[suffix].items()},
                "perfect_draft_ceiling": max(r * costs[suffix][1] / t for r, t in costs[suffix].items())})
    anchors = {}
    for suffix in weights:
        fast, std = f"fastmode fast{suffix}", f"fastmode standard{suffix}"
        for anchor, ours in (("llama.cpp", std), ("llama.cpp prompt lookup", fast), ("transformers", std),
                             ("transformers prompt lookup", fast)):
            if anchor in names:
                anchors[f"{ours} / {anchor}"] = {cat: row[ours] / row[anchor] for cat, row in table.items()
                                                 if row[anchor] > 0}
    report = {"machine": machine(args.threads, args.device), "model": model, "workload": args.workload, "repeats": args.repeats,
              "read_bandwidth_gbs": bandwidth, "streams": streams, "anchors": anchors,
              "configs": configs, "table": table, "runs": [asdict(r) for r in runs]}
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, names)
    print(text)
    if args.page:
        plot_compare(table, names, out / "compare.png")
        page = Path(args.page)
        page.parent.mkdir(parents=True, exist_ok=True)
        image = Path(page.parent / "compare.png")
        image.write_bytes((out / "compare.png").read_bytes())
        page.write_text(PAGE_HEAD + text + f"\n![OTPS by category and contender]({image.name})\n")
        print(f"page: {page}")
    return 0


def summarize(runs: list[Run], names: list[str]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for cat in dict.fromkeys(r.category for r in runs):
        row = {}
        for name in names:
            rs = [r for r in runs if r.category == cat and r.contender == name]
            row[name] = statistics.median(r.otps for r in rs)
            row[name + " ttft"] = statistics.median(r.ttft for r in rs)
        table[cat] = row
    return table


def machine(threads: int, device: str = "cpu") -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os
    from fastmode import kernels
    gpu = f"{torch.cuda.get_device_name(torch.device(device))} ({device}), " if device != "cpu" else ""
    lib = kernels.load()
    isa = "none" if lib is None else ("AVX-512 VNNI" if lib.fm_has_vnni512() else "AVX2" if lib.fm_has_avx2()
                                      else "portable C")
    return (f"{gpu}{cpu}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, native kernels: {isa}")


def markdown(report: dict[str, Any], names: list[str]) -> str:
    table = report["table"]
    lines = [f"Machine: {report['machine']}; memory read bandwidth {report['read_bandwidth_gbs']:.1f} GB/s "
             f"(measured). Model: {report['model']}. Each prompt {report['repeats']} time(s) per contender.", "",
             "Output tokens per second (median per category; median TTFT in seconds in the last row):", "",
             "| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cat, row in table.items():
        lines.append(f"| {cat} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
    lines.append("| TTFT (all) | " + " | ".join(
        f"{statistics.median(r['ttft'] for r in report['runs'] if r['contender'] == n):.2f}" for n in names) + " |")
    lines.append("")
    for label, c in report["configs"].items():
        same, pairs = c["identical_fast_standard"]
        ratios = ", ".join(f"{cat} {r:.2f}x" for cat, r in c["fast_over_standard"].items())
        lines.append(f"- fastmode {label} ({c['weights']}): {c['weight_bytes'] / 1e6:.0f} MB of weights read per "
                     f"decode step, so the standard lane streams {c['decode_bandwidth_gbs']:.1f} GB/s; fast / "
                     f"standard: {ratios}; greedy outputs identical between the lanes: {same}/{pairs}.")
        for what, other in c.get("variants_over_standard", {}).items():
            lines.append(f"- fastmode {label}, fast lane {what} / standard: "
                         + ", ".join(f"{cat} {r:.2f}x" for cat, r in other.items()) + ".")
    for label, c in report["configs"].items():
        if "pass_ms" in c:
            one = c["pass_ms"][1]
            costs = ", ".join(f"{r} row{'s' if r > 1 else ''} {t / one:.2f}" for r, t in c["pass_ms"].items())
            lines.append(f"- fastmode {label}: a decode pass at {c['pass_context']} tokens of context takes "
                         f"{one:.1f} ms for 1 row; relative to it, {costs}. So with every draft accepted the "
                         f"fast lane could reach at most {c['perfect_draft_ceiling']:.2f}x the standard lane on "
                         f"this machine (rows / relative pass time, at best).")
    for label, st in report.get("streams", {}).items():
        lines.append(f"- fastmode {label}, standard lane, {st['streams']} streams at once: {st['many']:.1f} tok/s "
                     f"aggregate against {st['one']:.1f} tok/s for one stream ({st['ratio']:.2f}x; 48 tokens each, "
                     f"medians of {st['rounds']} interleaved rounds).")
    for pair, cats in report.get("anchors", {}).items():
        lines.append(f"- {pair}: " + ", ".join(f"{cat} {r:.2f}x" for cat, r in cats.items()) + ".")
    return "\n".join(lines) + "\n"


def plot_compare(table: dict[str, dict[str, float]], names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cats = list(table)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(cats))], [table[c][name] for c in cats], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats)
    ax.set_ylabel("output tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PAGE_HEAD = """# Benchmarks

Regenerate with `.venv/bin/fastmode bench --compare --native-kernels on --repeats 2 --page
docs/benchmarks.md`: fastmode on its native kernels (the server's default) in both lanes, and
its fast lane with the model's draft corpus and, separately, its trained draft head switched
the other way (the corpus off: it is on by default; the head on: it is off by default), each
such setting on an engine of its own over the same weights, as a server with it would run;
`--native-kernels both` adds float32 weights in torch, each in both lanes;
llama.cpp with and without prompt lookup when `llama-cpp-python` is installed in the same
environment, and Hugging Face transformers (greedy and prompt lookup) when `transformers`,
`gguf` and `accelerate` are. Every contender runs in one process on the same prompt ids (the
shipped workload, `fastmode/bench/workloads/dev.jsonl`), greedy, the order rotating from prompt
to prompt, with a 30 ms pause before each run (so that the thread pool of the contender before
has gone quiet); numbers are medians. Then the standard lane with 8 streams at once against one,
and one decode pass timed by its rows (a token plus drafts, interleaved, medians of 7): what
verifying drafts costs on the machine, and so the most the fast lane can gain there.

The anchors are not dependencies of fastmode; install them into `.venv` to compare:
`CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF" .venv/bin/pip install
--no-binary llama-cpp-python llama-cpp-python==0.3.36` (built from the package index's source
package, about ten minutes on 2 cores) and `.venv/bin/pip install transformers gguf accelerate`.

"""
