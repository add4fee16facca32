"""The fast lane's draft corpus: its index, its file and the engine's drafts from it."""
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastmode import headtrain
from fastmode.engine.corpus import MAJORITY, MINORITY, ONCE, UNANIMOUS, DraftCorpus, DraftCorpusError
from fastmode.engine.engine import Engine
from fastmode.engine.request import Lane
from fastmode.weights.registry import DEFAULT_MODEL, corpus_path, draft_head_path

from conftest import fixed_pass_cost, small_engine_config
from test_draft_head import random_prompts, run


def longest_suffix_continuations(answers, context, max_ngram):
    """What the corpus must propose, by brute force: for the longest suffix of `context` (up to
    max_ngram) found inside an answer with a token after it, the tokens following its occurrences."""
    for n in range(min(max_ngram, len(context)), 0, -1):
        suffix = context[-n:]
        follow = [ids[i + n:] for ids in answers for i in range(len(ids) - n) if ids[i:i + n] == suffix]
        if follow:
            return n, follow
    return 0, []


def test_proposes_what_followed_the_longest_matching_suffix():
    answers = [[1, 2, 3, 4, 5], [9, 2, 3, 7, 8, 1], [2, 3, 7, 6]]
    corpus = DraftCorpus.from_answers(answers, max_ngram=4)
    assert len(corpus) == 15 and corpus.num_answers == 3
    assert corpus.propose([0, 1, 2, 3], 3) == ([4, 5], 3, ONCE)  # only in the first answer, cut at its end
    assert corpus.propose([9, 2, 3], 8) == ([7, 8, 1], 3, ONCE)
    # "2 3" is followed by 4 once and by 7 twice: an occurrence followed by the commoner 7
    tokens, match, agreement = corpus.propose([5, 5, 2, 3], 2)
    assert match == 2 and tokens in ([7, 8], [7, 6]) and agreement == MAJORITY
    assert corpus.propose([5, 2], 1) == ([3], 1, UNANIMOUS)  # "2" is always followed by 3
    assert corpus.propose([42, 43], 4) == ([], 0, 0)  # nothing matches
    assert corpus.propose([1, 2], 0) == ([], 0, 0) and corpus.propose([], 3) == ([], 0, 0)
    assert corpus.propose([6], 4) == ([], 0, 0)  # an answer's last token has nothing after it
    half = DraftCorpus.from_answers([[1, 2], [1, 3], [1, 4], [1, 2]])  # 2 of 4: a majority
    assert half.propose([1], 1) == ([2], 1, MAJORITY)
    assert DraftCorpus.from_answers([[1, 2], [1, 3], [1, 4], [1, 2], [1, 5]]).propose([1], 1)[2] == MINORITY


def test_matches_a_brute_force_search_on_random_text():
    rng = random.Random(1)
    answers = [[rng.randrange(6) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    corpus = DraftCorpus.from_answers(answers, max_ngram=5)
    for _ in range(300):
        context = [rng.randrange(7) for _ in range(rng.randrange(1, 12))]
        tokens, match, agreement = corpus.propose(context, 4)
        n, follows = longest_suffix_continuations(answers, context, 5)
        assert match == n, (context, tokens, n)
        if n:
            assert tokens in [f[:4] for f in follows]
            firsts = [f[0] for f in follows]
            top = firsts.count(tokens[0])
            assert top == max(firsts.count(t) for t in firsts)  # the commonest next token
            want = (ONCE if len(firsts) == 1 else UNANIMOUS if top == len(firsts)
                    else MAJORITY if 2 * top >= len(firsts) else MINORITY)
            assert agreement == want


def test_file_round_trips_and_refuses_what_does_not_fit(tmp_path):
    corpus = DraftCorpus.from_answers([[1, 2, 3], [40000, 2, 3, 5]], max_ngram=3)
    path = tmp_path / "c.corpus.safetensors"
    corpus.save(path, vocab_size=49152, meta={"model": "m"})
    again = DraftCorpus.load(path, vocab_size=49152)
    assert np.array_equal(again.tokens, corpus.tokens) and again.max_ngram == 3
    assert again.propose([40000, 2], 2) == ([3, 5], 2, ONCE)
    with pytest.raises(DraftCorpusError, match="vocabulary"):
        DraftCorpus.load(path, vocab_size=32000)
    wide = DraftCorpus.from_answers([[99_999, 70_000, 1], [70_000, 1, 5]], max_ngram=2)
    wide.save(tmp_path / "wide.safetensors", vocab_size=100_000)  # ids past 16 bits: stored in 32
    again = DraftCorpus.load(tmp_path / "wide.safetensors", vocab_size=100_000)
    assert np.array_equal(again.tokens, wide.tokens) and again.propose([70_000], 3) == ([1], 1, UNANIMOUS)
    with pytest.raises(DraftCorpusError, match="outside"):
        corpus.save(tmp_path / "small.safetensors", vocab_size=1000)
    save_file({"tokens": torch.tensor([5, 65535], dtype=torch.uint16)}, str(tmp_path / "odd.safetensors"),
              metadata={"format": "fastmode-draft-corpus", "vocab_size": "4"})
    with pytest.raises(DraftCorpusError, match="outside"):
        DraftCorpus.load(tmp_path / "odd.safetensors", vocab_size=4)
    save_file({"tokens": torch.tensor([1, 2], dtype=torch.uint16)}, str(tmp_path / "cut.safetensors"),
              metadata={"format": "fastmode-draft-corpus", "vocab_size": "4"})
    with pytest.raises(DraftCorpusError, match="answer's end"):
        DraftCorpus.load(tmp_path / "cut.safetensors", vocab_size=4)
    save_file({"tokens": torch.tensor([1, 2], dtype=torch.uint16)}, str(tmp_path / "head.safetensors"))
    with pytest.raises(DraftCorpusError, match="not a draft corpus"):
        DraftCorpus.load(tmp_path / "head.safetensors", vocab_size=4)


@pytest.fixture(scope="module")
def answers(tiny):
    """tiny-random's greedy answers to 24 prompts."""
    prompts = random_prompts(24, seed=3)
    records = headtrain.collect(tiny, prompts, (0,), max_tokens=60, streams=12)
    return prompts, [ids for ids, _ in records]


def test_fast_lane_drafts_from_the_corpus_and_keeps_outputs_identical(tiny, answers):
    prompts, outs = answers
    corpus = DraftCorpus.from_answers(outs)
    corpus.index()  # built before the engines start: drafting from it is deterministic
    for asked, seen in ((prompts[:8], True), (random_prompts(8, seed=11), False)):
        engine = fixed_pass_cost(Engine(tiny.model, small_engine_config(), tiny.tokenizer.eos_ids, draft_corpus=corpus))
        assert engine.corpus is corpus  # on by default
        assert run(engine, asked, Lane.FAST) == run(engine, asked, Lane.STANDARD)
        if seen:  # answers it holds: drafted from it, and mostly accepted
            assert engine.stats["corpus_drafted"] > 0, engine.stats
            assert engine.stats["corpus_accepted"] > engine.stats["corpus_drafted"] / 2, engine.stats
        assert engine.stats["corpus_accepted"] <= engine.stats["accepted"]


def test_sampled_requests_learn_corpus_rates_of_their_own(tiny, answers):
    from fastmode.engine.corpus import SAMPLED
    from fastmode.engine.request import SamplingParams
    prompts, outs = answers
    corpus = DraftCorpus.from_answers(outs)
    corpus.index()
    engine = Engine(tiny.model, small_engine_config(), tiny.tokenizer.eos_ids, draft_corpus=corpus)
    done = []
    engine.add("s", prompts[0], SamplingParams(max_tokens=40, temperature=1.0, seed=1), Lane.FAST,
               lambda d: d.status.finished and done.append(d))
    while not done:
        engine.step()
    kinds = set(engine.corpus_policy.shared)
    assert kinds and all(k > SAMPLED for k in kinds)  # the greedy requests' rates are untouched
    run(engine, prompts[:2], Lane.FAST)
    assert any(0 < k < SAMPLED for k in engine.corpus_policy.shared)


def test_the_corpus_switches_off(tiny, answers):
    prompts, outs = answers
    corpus = DraftCorpus.from_answers(outs)
    engine = fixed_pass_cost(Engine(tiny.model, small_engine_config(draft_corpus=False), tiny.tokenizer.eos_ids,
                                    draft_corpus=corpus))
    run(engine, prompts[:4], Lane.FAST)
    assert engine.corpus is None and engine.stats["corpus_drafted"] == 0
    assert not corpus.indexed  # an engine that does not draft from it never builds its index
    engine.use_draft_corpus(True)  # starts building the index on a thread of its own
    corpus.index()  # waits for that build
    assert corpus.indexed
    run(engine, prompts[:4], Lane.FAST)
    assert engine.stats["corpus_drafted"] > 0


def test_the_engine_does_not_wait_for_the_corpus_index(tiny, answers):
    """Until the index is built (on its own thread), fast requests run without corpus drafts."""
    import threading
    prompts, outs = answers
    release = threading.Event()

    class SlowCorpus(DraftCorpus):
        def _build(self) -> None:
            assert release.wait(30)
            super()._build()

    corpus = SlowCorpus(DraftCorpus.from_answers(outs).tokens)
    engine = fixed_pass_cost(Engine(tiny.model, small_engine_config(), tiny.tokenizer.eos_ids, draft_corpus=corpus))
    assert run(engine, prompts[:4], Lane.FAST) == run(engine, prompts[:4], Lane.STANDARD)
    assert not corpus.indexed and engine.stats["corpus_drafted"] == 0
    release.set()
    corpus.index()
    run(engine, prompts[:4], Lane.FAST)
    assert engine.stats["corpus_drafted"] > 0


def test_train_head_corpus_only_writes_the_answers_next_to_the_head_path(tmp_path, tiny):
    from fastmode.cli import main
    out = tmp_path / "m.safetensors"
    assert corpus_path(out) == tmp_path / "m.corpus.safetensors"
    assert main(["train-head", "--model", "tiny-random", "--out", str(out), "--corpus-only", "--prompts", "6",
                 "--max-tokens", "12"]) == 0
    assert not out.exists()  # no head trained
    corpus = DraftCorpus.load(corpus_path(out), tiny.arch.vocab_size)
    assert corpus.num_answers == 6 and 6 * 3 <= len(corpus) <= 6 * 12


def test_a_local_model_uses_the_corpus_beside_it(tmp_path, tiny_q4):
    import shutil
    from fastmode.weights.registry import load_model
    gguf = tmp_path / "m.gguf"
    shutil.copy(tiny_q4.name, gguf)  # a copy: the session's model file stays without a corpus
    assert draft_head_path(str(gguf)) == tmp_path / "m.head.safetensors"
    assert load_model(str(gguf)).draft_corpus is None
    DraftCorpus.from_answers([[5, 6, 7]]).save(tmp_path / "m.head.corpus.safetensors", tiny_q4.arch.vocab_size)
    corpus = load_model(str(gguf)).draft_corpus
    assert corpus is not None and corpus.propose([5], 2) == ([6, 7], 1, ONCE)


def test_default_model_ships_a_corpus_of_its_answers():
    from fastmode.weights.registry import load_model
    assert corpus_path(draft_head_path(DEFAULT_MODEL)).exists()
    loaded = load_model(DEFAULT_MODEL)
    corpus = loaded.draft_corpus
    assert corpus is not None and len(corpus) > 100_000 and corpus.num_answers > 1000
    # a stock phrase of the model's answers continues as the model would write it
    ids = loaded.tokenizer.encode(" Here is a simple example")
    tokens, match, _ = corpus.propose(ids, 4)
    assert match >= 3 and tokens, (tokens, match)
