"""The fast lane's trained draft head: its file, its native path, its training and the engine's use of it."""
import os
import random
import stat

import pytest
import torch

from fastmode import headtrain
from fastmode.config import EngineConfig
from fastmode.engine.engine import Engine
from fastmode.engine.head_drafter import HEAD_EXPLORE, HEAD_SKIP, HeadDrafter
from fastmode.engine.request import Lane, SamplingParams
from fastmode.engine.speculation import PromptLookup
from fastmode.model.draft_head import DraftHead, DraftHeadError
from fastmode.weights.gguf import dequantize, quantize_q8_0
from fastmode.weights.registry import DEFAULT_MODEL, HEADS, PACKAGED

from conftest import fixed_pass_cost, small_engine_config


def random_prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


def run(engine, prompts, lane, max_tokens=60):
    outs, done = {i: [] for i in range(len(prompts))}, set()
    for i, p in enumerate(prompts):
        engine.add(f"{lane.value}-{i}-{random.random()}", p, SamplingParams(max_tokens=max_tokens), lane,
                   lambda d, i=i: (outs[i].extend(d.token_ids), d.status.finished and done.add(i)))
    for _ in range(10_000):
        if len(done) == len(prompts):
            break
        engine.step()
    return [outs[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def trained(tiny):
    """A head trained on tiny-random's answers to 32 prompts (memorized: tiny data, many epochs)."""
    prompts = random_prompts(32, seed=0)
    records = headtrain.collect(tiny, prompts, (0, 1), max_tokens=60, streams=16)
    head = DraftHead(tiny.arch.hidden_size, 128, torch.arange(tiny.arch.vocab_size), tiny.model.embed.weight, (0, 1))
    losses = headtrain.train(head, tiny.model.norm, records, epochs=30, batch=64, lr=3e-3)
    return head, prompts, records, losses


def test_q8_0_quantization_round_trips_within_half_a_step():
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 96)  # blocks of very different scales
    blocks = quantize_q8_0(w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (48, 3 * 34)
    back = dequantize(blocks.numpy().reshape(-1), 8, w.numel()).view(48, 96)
    step = w.view(48, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert ((back - w).view(48, 3, 32).abs() <= step * 0.5 + 1e-3 * step + 1e-12).all()
    zero = quantize_q8_0(torch.zeros(1, 32))
    assert dequantize(zero.numpy().reshape(-1), 8, 32).abs().max() == 0  # no division by zero
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(2, 40))


def test_training_fits_the_answers_it_saw(trained):
    head, _, records, losses = trained
    assert losses["ce1"] < 0.1, losses
    first, second, *_ = headtrain.acceptance(head, records)
    assert first > 0.9 and second > 0.7, (first, second)


def test_fast_lane_drafts_with_the_head_and_keeps_outputs_identical(tiny, trained):
    head = trained[0]
    for prompts, learned in ((trained[1][:8], True), (random_prompts(8, seed=5), False)):
        engine = fixed_pass_cost(Engine(tiny.model, small_engine_config(draft_head=True), tiny.tokenizer.eos_ids,
                                        draft_head=head))
        assert run(engine, prompts, Lane.FAST) == run(engine, prompts, Lane.STANDARD)
        assert engine.stats["head_drafted"] > 0, engine.stats
        if learned:  # on answers it learned, most of its drafts are accepted
            assert engine.stats["head_accepted"] > engine.stats["head_drafted"] / 2, engine.stats


def test_the_head_is_off_by_default_and_switches(tiny, trained, monkeypatch):
    # prompt lookup proposes nothing and passes are priced alike on any machine: whether the
    # head drafts must not hang on the pass times this machine happens to measure
    monkeypatch.setattr(PromptLookup, "propose", lambda self, k: [])
    engine = Engine(tiny.model, small_engine_config(), tiny.tokenizer.eos_ids, draft_head=trained[0])
    run(engine, trained[1][:4], Lane.FAST)
    assert engine.drafter is None and engine.head_taps == () and engine.stats["head_drafted"] == 0
    engine.use_draft_head(True)
    fixed_pass_cost(engine)
    run(engine, trained[1][:4], Lane.FAST)
    assert engine.drafter.head is trained[0] and engine.stats["head_drafted"] > 0


def test_head_file_round_trips(tmp_path, tiny, trained):
    head = trained[0]
    path = tmp_path / "head.safetensors"
    head.save(path, {"model": "tiny-random"})
    again = DraftHead.load(path, tiny.model.embed.weight)
    assert again.taps == head.taps and torch.equal(again.vocab, head.vocab)
    taps = torch.randn(16, 2, tiny.arch.hidden_size)
    x = torch.randint(0, tiny.arch.vocab_size, (16,))
    # saved in float16: the drafts of the reloaded head equal those of a float16-rounded copy
    rounded = DraftHead(head.hidden, head.inter, head.vocab, tiny.model.embed.weight, head.taps)
    rounded.load_state_dict({k: v.half().float() for k, v in head.state_dict().items()})
    assert torch.equal(again.draft(taps, x, 3), rounded.draft(taps, x, 3))


def test_head_files_that_do_not_fit_are_refused(tmp_path, tiny, trained):
    path = tmp_path / "head.safetensors"
    trained[0].save(path)
    with pytest.raises(DraftHeadError, match="does not fit|embedding"):
        DraftHead.load(path, torch.zeros(tiny.arch.vocab_size, 32))
    (tmp_path / "other.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(Exception):
        DraftHead.load(tmp_path / "other.safetensors", tiny.model.embed.weight)
    with pytest.raises(DraftHeadError, match="taps"):
        DraftHead(64, 128, torch.arange(10), tiny.model.embed.weight, (1, 0))


def test_engine_refuses_to_tap_other_blocks_than_its_head(tiny, trained):
    engine = Engine(tiny.model, small_engine_config(draft_head=True), tiny.tokenizer.eos_ids, draft_head=trained[0])
    with pytest.raises(ValueError, match="taps"):
        engine.tap_features((1,), lambda rid, f: None)


def test_native_head_drafts_as_the_float_head(tiny_q4):
    """Q8_0 copies of the head's matrices on the native kernels draft what float32 drafts,
    except where the top two tokens are nearly tied."""
    h = tiny_q4.arch.hidden_size
    torch.manual_seed(0)
    head = DraftHead(h, 64, torch.arange(tiny_q4.arch.vocab_size), tiny_q4.model.embed.weight, (0, 1))
    native = DraftHead(h, 64, head.vocab, tiny_q4.model.embed.weight, (0, 1))
    native.load_state_dict(head.state_dict())
    assert native.use_native()
    taps = torch.randn(64, 2, h)
    x = torch.randint(0, tiny_q4.arch.vocab_size, (64,))
    g_f, g_n = head.start(taps), native.start(taps)
    assert torch.allclose(g_f, g_n, rtol=0.05, atol=0.05 * g_f.abs().max().item())
    f_f, conf_f, tok_f = head.step(g_f, x)
    f_n, conf_n, tok_n = native.step(g_f, x)
    assert (conf_f - conf_n).abs().mean() < 0.03
    assert (tok_f == tok_n).float().mean() >= 0.9


def test_the_default_models_head_is_packaged_and_fits_it():
    spec = PACKAGED[DEFAULT_MODEL]
    assert spec.draft_head and (HEADS / spec.draft_head).exists()
    from fastmode.weights.registry import load_model
    loaded = load_model(DEFAULT_MODEL)
    head = loaded.draft_head
    assert head is not None and head.taps[-1] == loaded.arch.num_layers - 1
    assert head.native == {} or set(head.native) == {"fuse", "fc", "gate_up", "down", "out"}


def test_taps_leave_the_outputs_unchanged(tiny_q4):
    """Splitting the native pass at the taps (one fm_blocks call per part) changes no bit."""
    engine = Engine(tiny_q4.model, small_engine_config(), tiny_q4.tokenizer.eos_ids)
    plain = run(engine, random_prompts(4, seed=3), Lane.STANDARD, max_tokens=20)
    got = {}
    engine.tap_features((0, 1), lambda rid, f: got.setdefault(rid, []).append(f))
    tapped = run(engine, random_prompts(4, seed=3), Lane.STANDARD, max_tokens=20)
    assert plain == tapped and got
    rows = torch.cat(next(iter(got.values())))
    assert rows.shape[1:] == (2, tiny_q4.arch.hidden_size)


def test_a_head_that_stopped_paying_runs_only_to_explore(trained):
    """A request whose head drafts are rarely accepted runs the head every HEAD_EXPLORE-th
    pass only; one where they pay runs it every pass; each request learns its own rate."""
    drafter = HeadDrafter(trained[0], 7)
    step = lambda rows: 0.010 + 0.001 * rows  # noqa: E731
    drafter.step_seconds = 0.0005  # one more draft costs 1.5 ms: worth it at 15% acceptance
    for rid in ("bad", "good", "new", "copying"):
        drafter.remember(rid, torch.zeros(2, trained[0].hidden), 1)
    drafter.first.update({"bad": 0.05, "good": 0.5})
    bad = [drafter.wants("bad", 0.0, 1, step) for _ in range(3 * HEAD_EXPLORE)]
    assert [i for i, ran in enumerate(bad) if ran] == [HEAD_EXPLORE - 1, 2 * HEAD_EXPLORE - 1, 3 * HEAD_EXPLORE - 1]
    assert all(drafter.wants("good", 0.0, 1, step) for _ in range(3 * HEAD_EXPLORE))
    assert drafter.wants("new", 0.0, 1, step)  # a new request starts from the rate over all requests (0.5)
    assert not drafter.wants("copying", HEAD_SKIP, 1, step)  # lookup expects enough: no head
    assert not drafter.wants("unknown", 0.0, 1, step)  # no tapped states yet: nowhere to start
    for _ in range(10):  # its first drafts keep failing: the request stops paying its way
        drafter.observe("good", 0)
    assert drafter.first["good"] < 0.05 and not drafter.wants("good", 0.0, 1, step)


def train_head(out, *flags):
    from fastmode.cli import main
    return main(["train-head", "--model", "tiny-random", "--out", str(out), *flags])


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("fastmode: error: ") and err.count("\n") == 1, err
    return err


def small_run(tmp_path):
    """Flags for a run of a second or two: 24 answers of 12 tokens, one epoch, one eval prompt."""
    (tmp_path / "eval.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    return ["--prompts", "24", "--max-tokens", "12", "--epochs", "1", "--inter", "16", "--eval",
            str(tmp_path / "eval.jsonl")]


@pytest.fixture
def no_collection(monkeypatch):
    monkeypatch.setattr(headtrain, "collect", lambda *a, **k: pytest.fail("answers collected before the refusal"))


@pytest.mark.parametrize("flags, eval_lines, said", [
    (["--prompts", "-5"], None, "--prompts -5: use 0 to "),
    (["--prompts", "5000"], None, "--prompts 5000: use 0 to "),
    (["--epochs", "0"], None, "--epochs 0: use 1 or more"),
    (["--epochs", "-1"], None, "--epochs -1: use 1 or more"),
    (["--max-tokens", "0"], None, "--max-tokens 0: use 3 or more"),
    (["--max-tokens", "-1"], None, "--max-tokens -1: use 3 or more"),
    (["--max-tokens", "2048"], None, "--max-tokens 2048: use 3 to 2047"),
    (["--inter", "0"], None, "--inter 0: use 1 or more"),
    (["--vocab", "0"], None, "--vocab 0: use 1 or more"),
    (["--prompts", "2", "--max-tokens", "32"], None, "at most 62 training positions, fewer than one batch of 256"),
    ([], ['{"messages": [{"role": "user", "content": "hi"}]}', '{"category": "x"}'], "eval.jsonl:2: messages"),
    ([], ['{"messages": ['], "eval.jsonl:1: Expecting value"),
    ([], ['[1, 2]'], "eval.jsonl:1: not a JSON object"),
    ([], [], "eval.jsonl holds no prompts"),
])
def test_train_head_refuses_bad_arguments_before_collecting(tmp_path, capsys, no_collection, flags, eval_lines, said):
    if eval_lines is not None:
        (tmp_path / "eval.jsonl").write_text("".join(line + "\n" for line in eval_lines))
        flags = [*flags, "--eval", str(tmp_path / "eval.jsonl")]
    out = tmp_path / "out" / "h.safetensors"
    assert train_head(out, *flags) == 2
    assert said in one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "out" / "h.corpus.safetensors").exists()


def test_train_head_refuses_outputs_it_cannot_write_before_collecting(tmp_path, capsys, no_collection):
    (tmp_path / "folder").mkdir()
    assert train_head(tmp_path / "folder", "--corpus-only") == 2
    assert "folder is a folder: --out names the head's file" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder"]  # no folder.corpus.safetensors
    (tmp_path / "file").write_text("")
    assert train_head(tmp_path / "file" / "h.safetensors") == 2
    assert f"cannot write in {tmp_path / 'file'} (a file, not a folder)" in one_error_line(capsys)


def test_a_failed_train_head_run_leaves_the_files_it_would_replace(tmp_path, capsys, monkeypatch):
    """A run that fails at its last step, after its answers were collected and its head
    trained, writes nothing: no new files, and the old ones (by default the package's) stay."""
    def fail(*args):
        raise RuntimeError("failed at the last step")
    monkeypatch.setattr(headtrain, "acceptance", fail)
    flags = small_run(tmp_path)
    out, corpus = tmp_path / "out" / "h.safetensors", tmp_path / "out" / "h.corpus.safetensors"
    out.parent.mkdir()
    assert train_head(out, *flags) == 2
    assert "failed at the last step" in capsys.readouterr().err
    assert list(tmp_path.rglob("*.safetensors")) == []
    out.write_bytes(b"the old head")
    corpus.write_bytes(b"the old corpus")
    assert train_head(out, *flags) == 2
    assert out.read_bytes() == b"the old head" and corpus.read_bytes() == b"the old corpus"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["h.corpus.safetensors", "h.safetensors"]


def test_a_train_head_run_failing_as_it_writes_leaves_the_old_pair(tmp_path, capsys, monkeypatch):
    """The head's file failing half written leaves the old head, and the old corpus beside it."""
    def fail(self, path, meta=None):
        path.write_bytes(b"half a head")
        raise OSError("No space left on device")
    monkeypatch.setattr(DraftHead, "save", fail)
    out, corpus = tmp_path / "out" / "h.safetensors", tmp_path / "out" / "h.corpus.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the old head")
    corpus.write_bytes(b"the old corpus")
    assert train_head(out, *small_run(tmp_path)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == b"the old head" and corpus.read_bytes() == b"the old corpus"
    assert sorted(p.name for p in out.parent.iterdir()) == ["h.corpus.safetensors", "h.safetensors"]


def test_train_head_replaces_its_files_whole_and_as_the_umask_says(tmp_path, tiny):
    """A run that works renames its files over the old ones, leaving no temporary file, with
    the mode a plain open() would give them."""
    from fastmode.engine.corpus import DraftCorpus
    out, corpus = tmp_path / "h.safetensors", tmp_path / "h.corpus.safetensors"
    out.write_bytes(b"the old head")
    corpus.write_bytes(b"the old corpus")
    flags = small_run(tmp_path)
    umask = os.umask(0o027)
    try:
        assert train_head(out, *flags) == 0
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "h.corpus.safetensors", "h.safetensors"]
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(corpus.stat().st_mode) == 0o640  # not safetensors' 0600
    assert DraftHead.load(out, tiny.model.embed.weight).taps == (0, 1)
    assert DraftCorpus.load(corpus, tiny.arch.vocab_size).num_answers == 24
