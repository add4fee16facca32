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


def test_ctrl_c_in_a_long_command_is_a_line_and_status_130_not_a_traceback(monkeypatch, capsys):
    from fastmode import cli
    from fastmode.weights import registry

    def interrupted(name, quiet=False):
        raise KeyboardInterrupt
    monkeypatch.setattr(registry, "pull", interrupted)
    assert cli.main(["pull"]) == 130
    assert capsys.readouterr().err.strip() == "fastmode: interrupted"


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


def test_server_and_catalog_settings_must_be_of_their_kind(tmp_path):
    """A quoted "false" must not read as true anywhere in the file, and values that make no
    sense (a negative price, a port out of range, a lane of no requests) are named at load."""
    cfg = tmp_path / "c.toml"
    model = '[[models]]\nid = "m"\nweights = "tiny-random"\n'
    for text, name in (('[server]\nnative_kernels = "false"\n', "native_kernels must be true or false"),
                       ('[server]\nport = "abc"\n', "port must be a whole number"),
                       ("[server]\nport = 8121.5\n", "port must be a whole number"),
                       ("[server]\nport = 70000\n", "port must be a whole number from 0"),
                       ("[server]\nhost = 5\n", "host must be a string"),
                       ("[server]\ndatabase = 5\n", "database must be a string"),
                       ('[server]\nmodel = "tiny-random"\n' + model, "cannot be combined with a \\[\\[models\\]\\]"),
                       (model + 'sampling_params = "false"\n', "sampling_params. must be true or false"),
                       (model + "display_name = 5\n", "display_name. must be a string"),
                       (model + "context_window = true\n", "context_window. must be a positive integer"),
                       (model + 'created_at = "yesterday"\n', "created_at. must be a date and time"),
                       (model + "prices = { input = -1.0 }\n", "prices.input must be a number"),
                       (model + 'prices = { output = "5" }\n', "prices.output must be a number"),
                       ("[engine.fast]\nmax_batch = 0\n", "max_batch must be a whole number of at least 1"),
                       ("[engine]\nkv_cache_tokens = -5\n", "kv_cache_tokens must be a whole number of at least 16"),
                       ("[engine]\nnum_threads = -1\n", "num_threads must be a whole number of at least 0")):
        cfg.write_text(text)
        with pytest.raises(SettingsError, match=name):
            load_settings(cfg)


def test_a_quoted_port_still_reads(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = "8001"\n')
    assert load_settings(cfg).server["port"] == 8001


def test_a_relative_database_path_is_the_config_files(tmp_path, monkeypatch, capsys):
    """`serve` and `accounts` started from different folders read the same database; a file
    where the current folder would have put it is pointed out."""
    from argparse import Namespace

    from fastmode.cli import _database

    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "fastmode.toml"
    monkeypatch.chdir(tmp_path)
    for written, read in (("data/fm.db", str(tmp_path / "etc" / "data" / "fm.db")), ("/srv/fm.db", "/srv/fm.db"),
                          (":memory:", ":memory:")):
        cfg.write_text(f'[server]\ndatabase = "{written}"\n')
        assert _database(Namespace(db=None), load_settings(cfg)) == read
    assert _database(Namespace(db="~/x.db"), load_settings(cfg)).startswith("/")
    cfg.write_text('[server]\ndatabase = "old.db"\n')
    (tmp_path / "old.db").write_text("")
    assert _database(Namespace(db=None), load_settings(cfg)) == str(tmp_path / "etc" / "old.db")
    assert "in the current folder, does" in capsys.readouterr().err


def test_operator_mistakes_are_said_before_anything_runs(tmp_path, capsys):
    """A port another process listens on is named before the model loads; `accounts` on a
    database that does not exist (a mistyped --db) says so instead of making an empty one;
    a --limit that is not a number names the flag."""
    import socket

    from fastmode.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "no-such-model-is-loaded", "--port", str(port)]) == 2
        assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    db = tmp_path / "typo.db"
    assert main(["accounts", "--db", str(db), "key", "create", "acme"]) == 2
    assert "no database at" in capsys.readouterr().err and not db.exists()
    assert main(["accounts", "--db", str(db), "org", "list"]) == 0 and not db.exists()  # nothing to list
    assert main(["accounts", "--db", str(db), "org", "create", "acme"]) == 0 and db.exists()
    capsys.readouterr()
    assert main(["accounts", "--db", str(db), "org", "set", "acme", "--limit", "fast.output_tokens_per_minute=1e5"]) == 2
    assert "--limit 'fast.output_tokens_per_minute=1e5': N must be a whole number" in capsys.readouterr().err
