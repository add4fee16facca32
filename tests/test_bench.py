"""`fastmode bench` end to end against the tiny model's server."""
import json

import pytest
import torch

from fastmode.bench.runner import identical_outputs, load_workload, summarize, Sample
from fastmode.cli import main


def write_workload(path):
    items = [{"category": "copy", "messages": [{"role": "user", "content": "abc abc abc"}], "max_tokens": 12},
             {"category": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12}]
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n")


def test_bench_idle_and_loaded_write_results_and_plot(tiny_server, tmp_path):
    url, _ = tiny_server
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    assert main(["bench", "--url", url, "--workload", str(wl), "--out", str(tmp_path / "idle")]) == 0
    res = json.loads((tmp_path / "idle" / "results.json").read_text())
    assert set(res["categories"]) == {"copy", "chat"}
    assert res["identical_outputs"] == [2, 2]
    assert {s["served"] for s in res["samples"] if s["speed"] == "fast"} == {"fast"}
    assert (tmp_path / "idle" / "bench.png").stat().st_size > 1000
    assert main(["bench", "--url", url, "--workload", str(wl), "--concurrency", "2",
                 "--out", str(tmp_path / "loaded")]) == 0
    loaded = json.loads((tmp_path / "loaded" / "results.json").read_text())
    assert loaded["mode"] == "loaded" and loaded["fast_median_otps"] is not None


def test_bench_requests_never_draft_from_each_other_and_asked_again_does(tiny_server, tmp_path):
    url, state = tiny_server
    engine = state.backends["tiny-random"].engine
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    drafted = engine.stats["pool_drafted"]
    assert main(["bench", "--url", url, "--workload", str(wl), "--repeats", "2", "--out", str(tmp_path / "idle")]) == 0
    assert engine.stats["pool_drafted"] == drafted  # each request an end user of its own: no pool
    accepted = engine.stats["pool_accepted"]
    assert main(["bench", "--url", url, "--workload", str(wl), "--asked-again", "--out", str(tmp_path / "again")]) == 0
    res = json.loads((tmp_path / "again" / "results.json").read_text())
    assert res["mode"] == "asked again" and set(res["categories"]) == {"copy", "chat"}
    assert res["identical_outputs"] == [2, 2] and all("again_ratio" in row for row in res["categories"].values())
    assert sorted(s["speed"] for s in res["samples"]) == ["fast", "fast", "fast again", "fast again", "standard", "standard"]
    assert engine.stats["pool_accepted"] > accepted  # the second fast answer drafted from the first


def test_summary_medians_ratios_and_identity():
    def s(cat, speed, otps, ttft, text="t", prompt=0):
        return Sample(cat, prompt, speed, speed, ttft, otps, 10, text)

    samples = [s("a", "standard", 10, 0.2), s("a", "standard", 12, 0.4), s("a", "standard", 30, 0.3),
               s("a", "fast", 30, 0.3), s("a", "fast", 36, 0.3), s("a", "fast", 33, 0.33, prompt=1, text="u"),
               s("a", "standard", 1, 1, prompt=1, text="v")]
    row = summarize(samples)["a"]
    assert row["standard_otps"] == 11 and row["fast_otps"] == 33 and row["otps_ratio"] == 3
    assert identical_outputs(samples) == (1, 2)
    assert identical_outputs([*samples, s("a", "fast again", 50, 0.3, text="t")]) == (1, 2)  # asked again, same text
    assert identical_outputs([*samples, s("a", "fast again", 50, 0.3, text="w")]) == (0, 2)  # a third speed counts too


def test_bad_workload_is_a_clear_error(tmp_path, capsys):
    wl = tmp_path / "bad.jsonl"
    wl.write_text('{"category": "x"}\n')
    assert main(["bench", "--url", "http://127.0.0.1:9", "--workload", str(wl)]) == 2
    assert "messages" in capsys.readouterr().err
    assert len(load_workload("fastmode/bench/workloads/dev.jsonl", "qa")) == 3


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    assert main(["bench", "--url", "http://127.0.0.1:9", "--workload", str(wl), "--out", str(tmp_path)]) == 2
    assert "could not talk to http://127.0.0.1:9" in capsys.readouterr().err


def test_bench_prompt_cache_measures_cold_and_cached_at_both_speeds(tiny_server, tmp_path):
    url, _ = tiny_server
    assert main(["bench", "--url", url, "--prompt-cache", "--rounds", "2", "--prompt-tokens", "1200",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "prompt_cache.json").read_text())
    assert res["cross_speed_reads"] == [0, 0]
    for speed in ("standard", "fast"):
        row = res["speeds"][speed]
        assert row["prompt_tokens"] >= 1024 and row["warm_read"] == row["prompt_tokens"]
    assert res["identical_outputs"] == [2, 2]
    assert {(s["speed"], s["served"]) for s in res["samples"]} == {("standard", "standard"), ("fast", "fast")}


def test_bench_compare_runs_every_contender_in_process_and_writes_a_page(tmp_path, monkeypatch):
    from fastmode.bench import compare
    pauses: list[int] = []  # a pause before every run, and before the streams and the pass timings
    monkeypatch.setattr(compare, "settle", lambda: pauses.append(1))
    wl = tmp_path / "w.jsonl"
    wl.write_text("\n".join(json.dumps({"category": c, "max_tokens": 12, "messages": [
        {"role": "user", "content": f"Repeat: {c} {c} {c} {c}"}]}) for c in ("copy", "chat")))
    page = tmp_path / "docs" / "benchmarks.md"
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--compare", "--model", "tiny-random", "--workload", str(wl), "--repeats", "2",
                     "--threads", "1", "--native-kernels", "off", "--out", str(tmp_path / "out"),
                     "--page", str(page), "--streams", "3"]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads sets the process's torch threads
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert set(report["table"]) == {"copy", "chat"}
    runs = report["runs"]
    assert {r["contender"] for r in runs} >= {"fastmode standard", "fastmode fast"}
    assert len([r for r in runs if r["contender"] == "fastmode fast"]) == 4  # 2 prompts x 2 repeats
    assert all(len(r["tokens"]) > 0 and r["otps"] > 0 for r in runs)
    assert len(pauses) == len(runs) + 2
    config = report["configs"]["default"]
    assert config["identical_fast_standard"] == [4, 4] and config["weights"] == "float32 in torch"
    assert report["read_bandwidth_gbs"] > 0 and config["decode_bandwidth_gbs"] > 0
    assert set(config["fast_over_standard"]) == {"copy", "chat"}
    # what verification costs: a pass by rows, up to the engine's most (max_draft 7 + 1)
    assert sorted(config["pass_ms"]) == ["1", "2", "3", "4", "6", "8"] and all(t > 0 for t in config["pass_ms"].values())
    assert config["perfect_draft_ceiling"] == pytest.approx(
        max(int(r) * config["pass_ms"]["1"] / t for r, t in config["pass_ms"].items()))
    assert config["pass_context"] > 0
    streams = report["streams"]["default"]  # 3 prompts at once (the 2 prompts, reused) against one at a time
    assert streams["streams"] == 3 and streams["one"] > 0 and streams["many"] > 0
    assert streams["ratio"] == pytest.approx(streams["many"] / streams["one"])
    text = page.read_text()
    assert "| copy |" in text and "fastmode fast" in text and (page.parent / "compare.png").exists()
    assert "3 streams at once" in text and "could reach at most" in text


def test_compare_runs_each_other_drafting_setting_on_an_engine_of_its_own(tiny, monkeypatch):
    """The fast lane without the corpus (or with the head) is a server of its own: its passes and
    drafts must not train the default engine's pass-cost line, thread chooser and policies."""
    import dataclasses

    from fastmode.bench import compare
    from fastmode.engine import engine as engine_module
    from fastmode.engine.corpus import DraftCorpus
    from fastmode.weights import registry

    with_corpus = dataclasses.replace(tiny, draft_corpus=DraftCorpus.from_answers([[5, 6, 7, 8]] * 3))
    monkeypatch.setattr(registry, "load_model", lambda *a, **k: with_corpus)
    made: list = []

    class Recorded(engine_module.Engine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(engine_module, "Engine", Recorded)
    threads = torch.get_num_threads()
    try:
        lanes, _, _, _ = compare.fastmode_contenders("tiny-random", 1, native=False)
    finally:
        torch.set_num_threads(threads)
    assert set(lanes) == {"fastmode standard", "fastmode fast", "fastmode fast without corpus"}
    default, other = made
    assert default.corpus is not None and other.corpus is None
    out = list(lanes["fastmode fast without corpus"]([1, 2, 3, 4], 8))
    assert out and default.stats["steps"] == 0 and other.stats["steps"] > 0
    assert list(lanes["fastmode fast"]([1, 2, 3, 4], 8)) == out and default.stats["steps"] > 0


def test_draft_replay_reads_a_compare_report(tmp_path, capsys):
    """scripts/draft_replay.py on a real report: the run's own outputs, workload and pass times."""
    from test_draft_replay import replay_mod
    wl = tmp_path / "w.jsonl"
    wl.write_text(json.dumps({"category": "copy", "max_tokens": 16, "messages": [
        {"role": "user", "content": "Repeat: one two three one two three"}]}))
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--compare", "--model", "tiny-random", "--workload", str(wl), "--threads", "1",
                     "--native-kernels", "off", "--out", str(tmp_path / "out"), "--streams", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert replay_mod.main([str(tmp_path / "out" / "compare.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("default: pass times 1: ") and "ceiling" in lines[0]
    assert lines[1].startswith("policy: copy ") and lines[2].startswith("perfect draft lengths: copy ")
    # another workload: the model's greedy answers to it, made by the script; another corpus file
    from fastmode.engine.corpus import DraftCorpus
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"category": "echo", "max_tokens": 12, "messages": [
        {"role": "user", "content": "Say: red green blue red green blue"}]}))
    DraftCorpus.from_answers([[5, 6, 7, 8], [5, 6, 9]]).save(tmp_path / "c.safetensors", vocab_size=259)
    assert replay_mod.main([str(tmp_path / "out" / "compare.json"), "--workload", str(other),
                            "--corpus", str(tmp_path / "c.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("policy: echo ") and lines[2].startswith("perfect draft lengths: echo ")
