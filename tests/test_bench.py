"""`fastmode bench` end to end against the tiny model's server."""
import json

import pytest
import torch

from fastmode.bench.runner import identical_outputs, load_workload, one_request, summarize, Sample
from fastmode.cli import main

UNREACHABLE = "http://127.0.0.1:9"


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


@pytest.fixture(scope="module")
def catalog_url(tiny):
    """The example catalog on tiny-random weights: fast-mode models that take no sampling fields."""
    from test_platform import catalog_server
    with catalog_server(tiny) as (url, _):
        yield url


def test_bench_gets_greedy_decoding_from_models_that_take_no_sampling_fields(catalog_url, tmp_path, capsys):
    """claude-opus-5-5 refuses a temperature (sampling_params = false): the bench sends none and
    gets the model's default decoding, greedy, from the API version that takes none."""
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    for mode in ([], ["--asked-again"]):
        assert main(["bench", "--url", catalog_url, "--model", "claude-opus-5-5", "--workload", str(wl), *mode,
                     "--out", str(tmp_path / "out")]) == 0
        assert json.loads((tmp_path / "out" / "results.json").read_text())["identical_outputs"] == [2, 2]
    assert main(["bench", "--url", catalog_url, "--model", "claude-opus-5-5", "--prompt-cache", "--rounds", "1",
                 "--prompt-tokens", "1200", "--out", str(tmp_path / "out")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_fast_requests_served_at_standard_speed_are_counted_and_warned_of(catalog_url, tmp_path, capsys):
    """claude-opus-4-6's fast mode falls back to standard speed silently (usage.speed says so)."""
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    assert main(["bench", "--url", catalog_url, "--model", "claude-opus-4-6", "--workload", str(wl),
                 "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["fast_served_standard"] == 2
    assert "warning: 2 of 2 fast requests were served at standard speed" in capsys.readouterr().err


def test_failed_background_streams_end_a_loaded_run_with_an_error(tiny, tmp_path, capsys):
    """A 429 in the standard lane (2 requests a minute) stops the background load: the run must
    not go on measuring fast requests against less load than asked, or report it as done."""
    from test_platform import catalog_server
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    with catalog_server(tiny, limits={"standard": {"requests_per_minute": 2}}) as (url, _):
        rc = main(["bench", "--url", url, "--model", "claude-opus-5-5", "--workload", str(wl), "--concurrency", "3",
                   "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and " of 3 background streams failed; the first: " in err and "HTTP 429" in err


def test_a_failed_request_cuts_the_run_short_and_keeps_what_it_measured(tiny_server, tmp_path, capsys):
    url, _ = tiny_server
    wl = tmp_path / "w.jsonl"
    wl.write_text(json.dumps({"category": "copy", "max_tokens": 4, "messages": [{"role": "user", "content": "abc"}]})
                  + "\n" + json.dumps({"category": "bad", "messages": [{"role": "assistant", "content": "x"}]}))
    assert main(["bench", "--url", url, "--workload", str(wl), "--out", str(tmp_path)]) == 1
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["samples"]) == 2 and set(res["categories"]) == {"copy"}
    assert res["cut_short"].startswith("the request for prompt 1 (bad) at fast speed failed: HTTP 400")
    assert "the run was cut short: the request for prompt 1 (bad) at fast speed" in capsys.readouterr().err


def test_ctrl_c_cuts_the_run_short_and_keeps_what_it_measured(tiny_server, tmp_path, monkeypatch, capsys):
    import signal

    from fastmode.bench import prompt_cache
    url, _ = tiny_server
    requests = []

    async def interrupted(*args, **kwargs):
        requests.append(1)
        if len(requests) == 4:  # the first round's fast cached request
            signal.raise_signal(signal.SIGINT)
        return await one_request(*args, **kwargs)

    monkeypatch.setattr(prompt_cache, "one_request", interrupted)
    try:
        rc = main(["bench", "--url", url, "--prompt-cache", "--rounds", "2", "--prompt-tokens", "1200",
                   "--out", str(tmp_path)])
    except KeyboardInterrupt:  # not handled: it would end the test session too
        pytest.fail("Ctrl-C ended the run without writing what it had measured")
    assert rc == 1
    res = json.loads((tmp_path / "prompt_cache.json").read_text())
    assert res["cut_short"] == "interrupted" and len(res["samples"]) == 3 and list(res["speeds"]) == ["standard"]
    assert res["identical_outputs"] == [0, 0]  # the cut round compared nothing at both speeds
    assert "the run was cut short: interrupted" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_written_is_an_error_before_any_request(tmp_path, capsys, monkeypatch):
    from fastmode.bench import compare
    monkeypatch.setattr(compare, "fastmode_contenders", lambda *a, **k: pytest.fail("compare loaded a model"))
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "out")  # a folder in a file, as --out /dev/null/x
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    for mode in (["--url", UNREACHABLE], ["--url", UNREACHABLE, "--prompt-cache"],
                 ["--compare", "--model", "tiny-random"]):
        assert main(["bench", *mode, "--workload", str(wl), "--out", bad]) == 2
        assert f"--out {bad}: cannot write results there: Not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--repeats", "0"], "--repeats"), (["--concurrency", "0"], "--concurrency"),
    (["--max-tokens", "0"], "--max-tokens"), (["--prompt-cache", "--rounds", "0"], "--rounds"), (["--categories", "copy,nope"], "--categories: 'nope'"),
    (["--categories", "copy,"], "--categories: an empty name"), (["--compare"], "--compare runs in-process"),
    (["--concurrency", "2", "--asked-again"], "--asked-again and --concurrency"),
    (["--prompt-cache", "--asked-again"], "--prompt-cache and --asked-again"),
    (["--prompt-cache", "--concurrency", "2"], "--prompt-cache and --concurrency"),
    (["--compare", "--concurrency", "2"], "--compare and --concurrency"),
    (["--compare", "--prompt-cache"], "--compare and --prompt-cache"),
    (["--compare", "--asked-again"], "--compare and --asked-again")])
def test_bad_flags_are_errors_before_anything_runs(flags, named, tmp_path, capsys, monkeypatch):
    from fastmode.bench import compare
    monkeypatch.setattr(compare, "run_compare", lambda args: pytest.fail("--compare ran"))
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    assert main(["bench", "--url", UNREACHABLE, "--workload", str(wl), *flags, "--out", str(tmp_path)]) == 2
    assert named in capsys.readouterr().err


def test_categories_may_have_spaces_after_commas():
    assert len(load_workload("fastmode/bench/workloads/dev.jsonl", "qa, writing")) == 6


def test_an_undefined_ratio_is_null_in_results_json(tiny_server, tmp_path):
    """With one output token OTPS is 0 at both speeds: the ratio is undefined, and JSON has no NaN."""
    url, _ = tiny_server
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    assert main(["bench", "--url", url, "--workload", str(wl), "--max-tokens", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert res["categories"]["copy"]["otps_ratio"] is None


def test_asked_again_leaves_no_older_plot_next_to_its_results(tiny_server, tmp_path):
    url, _ = tiny_server
    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    assert main(["bench", "--url", url, "--workload", str(wl), "--max-tokens", "4", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.png").exists()
    assert main(["bench", "--url", url, "--workload", str(wl), "--max-tokens", "4", "--asked-again",
                 "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "bench.png").exists()


def test_model_list_and_key_errors_are_one_line_naming_what_is_wrong(tmp_path, capsys):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from conftest import serve_asgi

    def models(request):
        key = request.headers["x-api-key"]
        if key == "wrong":
            return JSONResponse({"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid x-api-key"}}, 401)
        return PlainTextResponse("it works") if key == "text" else JSONResponse({"object": "list"})

    wl = tmp_path / "w.jsonl"
    write_workload(wl)
    with serve_asgi(Starlette(routes=[Route("/v1/models", models)])) as url:
        for key, says in (("wrong", "/v1/models: HTTP 401: "), ("json", "/v1/models lists no model"),
                          ("text", "/v1/models: the answer is not JSON: 'it works'")):
            assert main(["bench", "--url", url, "--api-key", key, "--workload", str(wl), "--out", str(tmp_path)]) == 2
            err = capsys.readouterr().err
            assert says in err and len(err.strip().splitlines()) == 1, err
            assert key != "wrong" or "invalid x-api-key" in err  # the server's own message


@pytest.mark.parametrize("line", ['"category messages"', "5", "null", '["category", "messages"]'])
def test_a_workload_line_that_is_not_an_object_is_a_clear_error(line, tmp_path, capsys):
    wl = tmp_path / "w.jsonl"
    wl.write_text(line + "\n")
    assert main(["bench", "--url", UNREACHABLE, "--workload", str(wl), "--out", str(tmp_path)]) == 2
    assert f"{wl}:1: not a JSON object" in capsys.readouterr().err


def test_compare_help_names_both_anchors():
    import argparse

    from fastmode.bench import compare
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    text = next(a.help for a in p._actions if a.dest == "compare")
    assert "llama.cpp" in text and "transformers" in text


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


def test_an_odd_stream_event_is_a_failed_request_not_a_traceback():
    """A server whose message_delta has no usage: the request fails by name (so the run keeps
    what it measured), instead of a KeyError escaping the bench."""
    import argparse
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from fastmode.bench.runner import RequestFailed

    async def messages(request):
        return Response('event: message_start\ndata: {"type": "message_start", "message": {"usage": {}}}\n\n'
                        'event: message_delta\ndata: {"type": "message_delta"}\n\n', media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])
    args = argparse.Namespace(max_tokens=4, api_key="k", fast_beta=False)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            await one_request(client, args, "m", {"category": "qa", "messages": []}, "fast", 3)
    with pytest.raises(RequestFailed, match=r"prompt 3 \(qa\) at fast speed failed: 'usage'"):
        asyncio.run(go())
