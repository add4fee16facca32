from datetime import datetime, timezone

import pytest

from fastmode.cli import build_parser
from fastmode.settings import SettingsError, load_settings


def test_example_config_loads(tmp_path):
    settings = load_settings("examples/fastmode.toml")
    cfg = settings.engine
    assert settings.server["model"] == "smollm2-135m-instruct" and settings.models == []
    assert cfg.fast.max_batch == 4 and cfg.fast.speculate and not cfg.standard.speculate


def test_unknown_settings_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nkv_cache_tokenz = 5\n")
    with pytest.raises(SettingsError, match="kv_cache_tokenz"):
        load_settings(bad)
    bad.write_text("[engine.fast]\nmax_bach = 2\n")
    with pytest.raises(SettingsError, match="max_bach"):
        load_settings(bad)
    bad.write_text("not = [toml")
    with pytest.raises(SettingsError):
        load_settings(bad)


def test_cli_parses_the_documented_commands():
    p = build_parser()
    a = p.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--model", "tiny-random", "--config", "x.toml"])
    assert (a.host, a.port, a.model, a.config) == ("0.0.0.0", 9000, "tiny-random", "x.toml")
    assert p.parse_args(["pull"]).model == "smollm2-135m-instruct"
    b = p.parse_args(["bench", "--url", "http://127.0.0.1:8000", "--concurrency", "8"])
    assert b.concurrency == 8 and b.workload.endswith("dev.jsonl")


def test_legacy_api_keys_variable_refuses_to_start(monkeypatch, capsys):
    from fastmode.cli import main

    monkeypatch.setenv("FASTMODE_API_KEYS", "k1")
    assert main(["serve", "--model", "tiny-random"]) == 2
    assert "open_mode = false" in capsys.readouterr().err


def test_open_mode_must_be_a_boolean(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nopen_mode = "false"\n')
    with pytest.raises(SettingsError, match="open_mode"):
        load_settings(bad)


def test_engine_settings_must_be_of_their_kind(tmp_path):
    """A quoted "false" must not silently read as true, nor "8" as a number."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[engine]\ndraft_corpus = false\nfast_share_target = 3\n[engine.fast]\nspeculate = true\n")
    engine = load_settings(cfg).engine
    assert engine.draft_corpus is False and engine.fast_share_target == 3 and engine.fast.speculate
    for bad, name in (('draft_corpus = "no"', "draft_corpus must be true or false"),
                      ('max_draft = "8"', "max_draft must be a whole number"),
                      ("max_draft = 7.5", "max_draft must be a whole number"),
                      ("kv_cache_tokens = true", "kv_cache_tokens must be a whole number"),
                      ('fast_share_target = "2.5"', "fast_share_target must be a number"),
                      ("device = 0", "device must be a string")):
        cfg.write_text(f"[engine]\n{bad}\n")
        with pytest.raises(SettingsError, match=name):
            load_settings(cfg)
    cfg.write_text('[engine.fast]\nspeculate = "yes"\n')
    with pytest.raises(SettingsError, match=r"\[engine.fast\]: speculate must be true or false"):
        load_settings(cfg)


def test_fast_mode_removal_dates_are_checked(tmp_path):
    cfg = tmp_path / "c.toml"
    model = '[[models]]\nid = "m"\nweights = "tiny-random"\nfast_mode = "deprecated"\n'
    cfg.write_text(model + 'fast_mode_removed_at = "2026-11-30T00:00:00Z"\n')
    entry = load_settings(cfg).models[0]
    assert entry.fast_removal == datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp()
    assert entry.fast_rejection(entry.fast_removal - 1) is None
    assert "removed for m on 2026-11-30" in entry.fast_rejection(entry.fast_removal)
    cfg.write_text(model + "fast_mode_removed_at = 2026-11-30T01:00:00+01:00\n")  # a TOML date-time works too
    assert load_settings(cfg).models[0].fast_removal == entry.fast_removal
    for bad in ('"2026-11-30"', '"yesterday"', "2026-11-30T00:00:00", '"2026-11-30T00:00:00"', "2026-11-30"):
        cfg.write_text(model + f"fast_mode_removed_at = {bad}\n")
        with pytest.raises(SettingsError, match="fast_mode_removed_at"):
            load_settings(cfg)
    cfg.write_text(model.replace('"deprecated"', '"sunset"'))
    with pytest.raises(SettingsError, match="deprecated"):  # the message lists the statuses
        load_settings(cfg)
