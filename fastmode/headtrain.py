"""`fastmode train-head`: a model's fast-lane draft corpus and draft head, from its own greedy answers.

1. Prompts: questions and writing tasks built from templates over a few hundred topics (none of
   them the benchmark's prompts).
2. The model answers them greedily in the standard lane, many at a time; every pass hands over
   the residual stream after the head's tapped blocks at each answer position. The answers are
   written as the model's draft corpus (`engine/corpus.py`).
3. The head learns, from (tapped states at position t, token t+1), the token t+2 and the
   model's feature there (cross-entropy on the model's token, KL to the model's distribution
   over the head's vocabulary, smooth L1 on the feature), and a second step from its own
   predicted feature (as it is used: drafts after the first start from the head's output).

The shipped head and corpus for the default model were made by `fastmode train-head` with its
defaults.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fastmode.config import EngineConfig
from fastmode.engine.corpus import DraftCorpus
from fastmode.engine.engine import Engine
from fastmode.engine.request import Lane, SamplingParams
from fastmode.engine.runner import max_threads
from fastmode.model.draft_head import DraftHead
from fastmode.weights.registry import DEFAULT_MODEL, LoadedModel, corpus_path, draft_head_path, load_model

BATCH = 256  # training positions a step

TOPICS = (
    "photosynthesis|black holes|the water cycle|volcanoes|earthquakes|the immune system|DNA|electricity|magnets|"
    "gravity|the moon's phases|rainbows|tides|climate change|recycling|solar panels|wind turbines|batteries|"
    "the internet|email|computer viruses|encryption|machine learning|databases|cloud computing|operating systems|"
    "compilers|version control with git|HTTP|the stock market|inflation|interest rates|taxes|budgeting|"
    "saving for retirement|the Roman Empire|the printing press|the Industrial Revolution|the Renaissance|"
    "ancient Egypt|the French Revolution|democracy|the United Nations|the Olympic Games|chess|football|yoga|sleep|"
    "exercise|nutrition|vitamins|coffee|tea|bread making|fermentation|composting|gardening|bees|dolphins|"
    "elephants|migratory birds|coral reefs|rainforests|deserts|glaciers|the human heart|the brain|memory|habits|"
    "stress|meditation|public speaking|job interviews|time management|learning a language|reading books|"
    "music theory|jazz|painting|photography|movies|video games|electric cars|airplanes|trains|bicycles|"
    "space travel|Mars|satellites|GPS|telescopes|microscopes|antibiotics|bacteria|viruses|allergies|"
    "blood pressure|dinosaurs|evolution|fossils|the periodic table|atoms|chemical reactions|acids and bases|"
    "plastic|paper|glass|steel|concrete|bridges|skyscrapers|earth's layers|the sun|stars|comets|Japan|Brazil|"
    "Canada|Kenya|Norway|India|Mexico|Australia|Italy|Egypt|owls|wolves|octopuses|penguins|sharks|horses|ants|"
    "butterflies|whales|nurses|firefighters|architects|farmers|pilots|librarians|chefs|engineers|teachers|"
    "scientists|rice|cheese|chocolate|pasta|olive oil|spices|soup|apples|potatoes|honey|the piano|the guitar|"
    "opera|poetry|theater|sculpture|comic books|podcasts|social media|smartphones|3D printing|robots|drones|"
    "virtual reality|blockchain|open source software|spreadsheets|passwords|Wi-Fi|search engines|first aid|"
    "hiking|camping|swimming|running a marathon|learning to drive|moving to a new city|starting a small business|"
    "writing a resume|making friends|raising a puppy|caring for houseplants|saving energy at home|"
    "cooking on a budget|planning a trip|the scientific method|statistics|probability|algebra|geometry|"
    "prime numbers|the speed of light|sound waves|the ozone layer|renewable energy|nuclear power|rivers|oceans|"
    "clouds|thunderstorms|hurricanes|snow|the northern lights").split("|")
SUBJECTS = (
    "a cat who wants to fly|a lighthouse keeper|a lost dog finding its way home|a child's first day at school|"
    "a dragon who is afraid of fire|an old tree in a city park|a detective in a small town|"
    "a baker who bakes magic cakes|a girl who talks to the stars|two friends on a camping trip|a city in the rain|"
    "a mountain at sunrise|autumn leaves|a busy train station|a snowy village|the first day of spring|"
    "a robot that learns to cook|a talking parrot|a shy giant|a time traveler").split("|")
PYTHON_PAIRS = (
    "a dictionary and a set|a function and a method|a class and an object|a for loop and a while loop|"
    "a module and a package|an iterator and a generator|== and is|append and extend|a string and bytes|"
    "a thread and a process|deep copy and shallow copy|*args and **kwargs|local and global variables").split("|")
QUESTIONS = ("What is {t}?", "How does {t} work?", "Why is {t} important?", "Explain {t} to a beginner.",
             "What are the main benefits and drawbacks of {t}?", "Give three interesting facts about {t}.",
             "What should everyone know about {t}?", "Can you explain how {t} affects everyday life?",
             "What are common misconceptions about {t}?", "Describe the history of {t} briefly.",
             "How would you explain {t} to a ten-year-old?", "List some tips about {t}.",
             "What is the future of {t}?", "Why do people care about {t}?")
TOPIC_WRITING = ("Write a short blog post about {t}.", "Write a haiku about {t}.", "Write a letter to a friend about {t}.",
                 "Write a motivational speech about {t}.")
SUBJECT_WRITING = ("Write a short story about {s}.", "Write a poem about {s}.", "Write a paragraph describing {s}.",
                   "Write a limerick about {s}.")


def training_prompts(seed: int = 0, per_topic: int = 7) -> list[str]:
    """Questions and writing tasks over the topics above, shuffled."""
    rng = random.Random(seed)
    out = []
    for t in TOPICS:
        out += [q.format(t=t) for q in rng.sample(QUESTIONS, per_topic)]
        out += [w.format(t=t) for w in rng.sample(TOPIC_WRITING, 2)]
    out += [w.format(s=s) for s in SUBJECTS for w in SUBJECT_WRITING]
    out += [f"What is the difference between {pair} in Python?" for pair in PYTHON_PAIRS]
    rng.shuffle(out)
    return out


def collect(loaded: LoadedModel, prompts: list[list[int]], taps: tuple[int, ...], max_tokens: int = 200,
            streams: int = 16, progress: Callable[[str], None] = lambda s: None) -> list[tuple[list[int], torch.Tensor]]:
    """The model's greedy answers to these prompts, each with the tapped residual stream at the
    position before each of its tokens: [(answer ids, [len(answer), len(taps), hidden] float16)]
    (no taps: the answers alone, with empty tensors)."""
    engine = Engine(loaded.model, EngineConfig(kv_cache_tokens=streams * (max_tokens + 512)), loaded.tokenizer.eos_ids)
    rows: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    if taps:
        engine.tap_features(taps, lambda rid, f: rows[rid].append(f.to(torch.float16)))
    records = []
    t0, tokens = time.monotonic(), 0
    for s in range(0, len(prompts), streams):
        outs: dict[str, list[int]] = {}
        done: set[str] = set()
        for i in range(s, min(s + streams, len(prompts))):
            rid = f"train-{i}"
            outs[rid] = []
            engine.add(rid, prompts[i], SamplingParams(max_tokens=max_tokens), Lane.STANDARD,
                       lambda d, rid=rid: (outs[rid].extend(d.token_ids), d.status.finished and done.add(rid)))
        while len(done) < len(outs):
            engine.step()
        for rid, out in outs.items():
            feats = torch.cat(rows.pop(rid))[:len(out)] if taps else torch.empty(len(out), 0, 0)
            if len(out) >= 3:
                records.append((out, feats))
            tokens += len(out)
        progress(f"answers: {min(s + streams, len(prompts))}/{len(prompts)} prompts, {tokens} tokens, "
                 f"{time.monotonic() - t0:.0f} s")
    return records


def train(head: DraftHead, model_norm: torch.nn.Module, records: list[tuple[list[int], torch.Tensor]],
          epochs: int = 2, batch: int = BATCH, lr: float = 2e-3, seed: int = 0,
          progress: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """Fit `head` to the records (see the module's docstring); the last tap must be the model's
    last block, whose output through `model_norm` is the feature the head predicts. Returns the
    last losses."""
    torch.manual_seed(seed)
    vocab_index = torch.full((int(head.embed.shape[0]),), -100, dtype=torch.long)
    vocab_index[head.vocab] = torch.arange(len(head.vocab))
    taps, x1, y1, g1, y2, g2 = [], [], [], [], [], []
    with torch.no_grad():
        for out, feats in records:
            ids = torch.tensor(out)
            n = len(ids)
            g = model_norm(feats[:, -1].float()).half()  # the model's feature at each position
            taps.append(feats[:n - 1])
            x1.append(ids[:n - 1])
            y1.append(ids[1:])
            g1.append(g[1:])
            y2.append(torch.cat([ids[2:], torch.tensor([-1])]))  # the second step's token (none at the end)
            g2.append(torch.cat([g[2:], g[-1:]]))
    T, X1, Y1, G1, Y2, G2 = (torch.cat(a) for a in (taps, x1, y1, g1, y2, g2))
    steps = epochs * (len(X1) // batch)
    if steps == 0:
        raise ValueError(f"{len(X1)} training positions are fewer than one batch of {batch}")
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    rows = head.out_rows().detach()

    def kl(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(f @ rows.T, -1), F.log_softmax(target.float() @ rows.T, -1),
                        log_target=True, reduction="batchmean")

    head.train()
    t0, k, losses = time.monotonic(), 0, {}
    for epoch in range(epochs):
        perm = torch.randperm(len(X1))
        for s in range(0, len(X1) - batch + 1, batch):
            idx = perm[s:s + batch]
            f1, logits1 = head(head.start(T[idx].float()), X1[idx])
            ce1 = F.cross_entropy(logits1, vocab_index[Y1[idx]], ignore_index=-100)
            reg = F.smooth_l1_loss(f1, G1[idx].float())
            more = Y2[idx] >= 0
            f2, logits2 = head(f1[more], Y1[idx][more])
            ce2 = F.cross_entropy(logits2, vocab_index[Y2[idx][more]], ignore_index=-100)
            loss = ce1 + 0.5 * ce2 + reg + kl(f1, G1[idx]) + 0.5 * kl(f2, G2[idx][more])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            k += 1
            if k % 200 == 0 or k == steps:
                losses = {"ce1": ce1.item(), "ce2": ce2.item(), "feature": reg.item()}
                progress(f"training: epoch {epoch + 1}/{epochs}, step {k}/{steps}, cross-entropy "
                         f"{losses['ce1']:.3f} / {losses['ce2']:.3f}, {time.monotonic() - t0:.0f} s")
    head.eval()
    return losses


def acceptance(head: DraftHead, records: list[tuple[list[int], torch.Tensor]], depth: int = 4) -> list[float]:
    """Of the positions in these answers, the share where the head's first 1..depth greedy
    drafts all equal the model's tokens."""
    hits, total = [0] * depth, 0
    with torch.no_grad():
        for out, feats in records:
            ids = torch.tensor(out)
            n = len(ids)
            drafts = head.draft(feats[:n - 1].float(), ids[:n - 1], depth)
            for i in range(n - 1):
                total += 1
                for j in range(min(depth, n - 1 - i)):
                    if int(drafts[i, j]) != int(ids[i + 1 + j]):
                        break
                    hits[j] += 1
    return [h / max(total, 1) for h in hits]


def default_taps(num_layers: int) -> tuple[int, ...]:
    """Low, middle and last blocks (4, 14, 29 of 30)."""
    return tuple(sorted({min(4, num_layers - 1), num_layers // 2 - 1, num_layers - 1} - {-1}))


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a count out of range before the model loads: caught later it costs the minutes of
    collection first, or runs quietly on something else (`--prompts -5` slicing off the last five)."""
    ranges = {"--prompts": (args.prompts, 0, len(training_prompts()), " (0: all of them)"),
              "--max-tokens": (args.max_tokens, 3, None, " (shorter answers are left out)"),
              "--epochs": (args.epochs, 1, None, ""), "--inter": (args.inter, 1, None, ""),
              "--vocab": (args.vocab, 1, None, "")}
    for flag, (value, low, high, why) in ranges.items():
        if value < low or (high is not None and value > high):
            span = f"{low} to {high}" if high is not None else f"{low} or more"
            raise ValueError(f"{flag} {value}: use {span}{why}")


def check_writable(out: Path) -> None:
    """Refuse outputs the run could not write before the work that makes them, not after: a
    folder in the head's or the corpus's place, or a folder for them that cannot be made or
    written in."""
    for path in (out, corpus_path(out)):
        if path.is_dir():
            raise ValueError(f"{path} is a folder: --out names the head's file, NAME.safetensors")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        why = "a file, not a folder" if isinstance(e, FileExistsError) else e.strerror
        raise OSError(f"cannot write in {out.parent} ({why}): choose another place with --out") from e


def read_workload(path: Path, loaded: LoadedModel, model: str) -> tuple[list[dict], list[list[int]]]:
    """A workload file's items and their prompts' token ids, a line that is not a valid request
    refused by file and line before any answer is collected."""
    from fastmode.bench.compare import prompt_ids
    from fastmode.server.errors import InvalidRequest

    items, ids = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            ids += prompt_ids(loaded.tokenizer, model, [item])
        except (ValueError, InvalidRequest) as e:
            raise ValueError(f"{path}:{n}: {e}") from e
        items.append(item)
    return items, ids


def save_all(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write each file beside its place, then rename them all in: a run that fails part way, or
    a server reading them meanwhile, never meets a half-written file or a new corpus beside an
    old head. safetensors makes its files 0600; these get a plain open()'s mode (0666 less the
    umask), as the package's other files: read off a file made so, not by setting the
    process's umask, which every thread shares."""
    tmps = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in files}
    try:
        for path, write in files.items():
            fd = os.open(tmps[path], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            mode = os.fstat(fd).st_mode & 0o777
            os.close(fd)
            write(tmps[path])
            tmps[path].chmod(mode)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """Everything that can be refused is refused before the answers are collected, and nothing
    is written until the whole run has worked: a failed run leaves the files it would replace
    (by default the package's own) as they were."""
    from fastmode.bench.compare import prompt_ids

    def say(msg: str) -> None:
        print(f"fastmode train-head: {msg}", file=sys.stderr, flush=True)

    check_numbers(args)
    out = Path(args.out) if args.out else draft_head_path(args.model)
    if out is None:
        raise ValueError(f"{args.model} has no place for a head file: pass --out")
    check_writable(out)
    evals_path = Path(args.eval) if args.eval else Path(__file__).parent / "bench" / "workloads" / "dev.jsonl"
    loaded = load_model(args.model)
    if not loaded.arch.tie_embeddings and not args.corpus_only:
        raise ValueError(f"{args.model}: its output matrix is not tied to its embedding, which the head reads "
                         f"drafts through")
    if args.max_tokens >= loaded.arch.max_position:
        raise ValueError(f"--max-tokens {args.max_tokens}: use 3 to {loaded.arch.max_position - 1} "
                         f"({args.model}'s context is {loaded.arch.max_position} tokens)")
    loaded.draft_head = None  # answers come from the model alone
    taps = default_taps(loaded.arch.num_layers)
    evals, eval_ids = read_workload(evals_path, loaded, args.model)
    if not evals and not args.corpus_only:
        raise ValueError(f"--eval {evals_path} holds no prompts to measure the head on")
    texts = training_prompts()[:args.prompts or None]
    items = [{"messages": [{"role": "user", "content": t}], "max_tokens": args.max_tokens} for t in texts]
    held_out = {json.dumps(e["messages"]) for e in evals}
    items = [i for i in items if json.dumps(i["messages"]) not in held_out]
    if not args.corpus_only and len(items) * (args.max_tokens - 1) < BATCH:
        raise ValueError(f"--prompts {args.prompts} --max-tokens {args.max_tokens}: {len(items)} prompts give at "
                         f"most {len(items) * (args.max_tokens - 1)} training positions, fewer than one batch of "
                         f"{BATCH}: raise either")
    say(f"{len(items)} prompts" + ("" if args.corpus_only else f", taps after blocks {taps}"))
    records = collect(loaded, prompt_ids(loaded.tokenizer, args.model, items), () if args.corpus_only else taps,
                      args.max_tokens, progress=say)
    corpus_out = corpus_path(out)
    corpus = DraftCorpus.from_answers([ids for ids, _ in records])
    files = {corpus_out: lambda path: corpus.save(path, loaded.arch.vocab_size, {"model": args.model})}
    if not args.corpus_only:
        counts = collections.Counter(t for ids, _ in records for t in ids)
        vocab = torch.tensor(sorted(t for t, _ in counts.most_common(args.vocab)))
        head = DraftHead(loaded.arch.hidden_size, args.inter, vocab, loaded.model.embed.weight, taps,
                         loaded.arch.rms_norm_eps)
        torch.set_num_threads(max_threads())  # the engine's last pass may have left fewer
        train(head, loaded.model.norm, records, epochs=args.epochs, progress=say)
        rates = acceptance(head, collect(loaded, eval_ids, taps, progress=lambda s: None))
        say(f"{evals_path.name}: the first 1..{len(rates)} drafts all right at "
            + ", ".join(f"{r:.3f}" for r in rates) + " of positions")
        files[out] = lambda path: head.save(path, {
            "model": args.model, "trained_on": f"{len(records)} answers, {sum(counts.values())} tokens",
            "acceptance": ",".join(f"{r:.3f}" for r in rates)})
    save_all(files)
    say(f"wrote {corpus_out} ({len(corpus)} tokens of {corpus.num_answers} answers)"
        + ("" if args.corpus_only else f" and {out}"))
    return 0
