"""The `fastmode` command: serve, pull, accounts, bench, train-head."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sqlite3
import sys

from fastmode.config import DTYPES
from fastmode.weights.registry import DEFAULT_MODEL

SHUTDOWN_GRACE_S = 10


def default_database() -> str:
    root = os.environ.get("FASTMODE_DATA") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "fastmode")
    return os.path.join(root, "fastmode.db")


def _settings(args: argparse.Namespace):
    from fastmode.settings import Settings, load_settings

    return load_settings(args.config) if args.config else Settings()


def _database(args: argparse.Namespace, settings) -> str:
    """--db, else [server] database (a relative path is in the config file's folder, so that
    `serve` and `accounts` started anywhere read the same file), else the default."""
    if args.db:
        return os.path.expanduser(args.db)
    raw = settings.server.get("database")
    if not raw:
        return default_database()
    path = os.path.expanduser(raw)
    if raw == ":memory:" or os.path.isabs(path) or settings.folder is None:
        return path
    resolved = os.path.join(settings.folder, path)
    if not os.path.exists(resolved) and os.path.exists(path):
        print(f"fastmode: warning: [server] database {raw!r} is {resolved}, in the config file's folder, which "
              f"does not exist; {os.path.abspath(path)}, in the current folder, does: move it, or give an "
              f"absolute path", file=sys.stderr)
    return resolved


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from fastmode.engine.engine import resolve_device
    from fastmode.platform.catalog import Catalog
    from fastmode.platform.db import Database
    from fastmode.platform.service import Platform
    from fastmode.server.app import Server, build_state, create_app
    from fastmode.weights.registry import load_model

    if os.environ.get("FASTMODE_API_KEYS"):
        raise ValueError("FASTMODE_API_KEYS is no longer read: create keys with `fastmode accounts key create ORG` "
                         "and set `open_mode = false` in the [server] table of --config")
    settings = _settings(args)
    server, cfg = settings.server, settings.engine
    # command-line flags win over the file, the file over the defaults
    host = args.host or server.get("host", "127.0.0.1")
    port = args.port if args.port is not None else int(server.get("port", 8000))
    if settings.models and args.model:
        raise ValueError("--model cannot be combined with a [[models]] catalog; set `weights` in the catalog")
    overrides = {"num_threads": args.threads, "kv_cache_tokens": args.kv_cache_tokens, "device": args.device,
                 "dtype": args.dtype}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    _check_port_free(host, port)  # before minutes of loading, not after
    weights = ([e.weights for e in settings.models] if settings.models
               else [args.model or server.get("model", DEFAULT_MODEL)])
    loaded = {}
    # the native kernels are the CPU's float32 path; another device or dtype runs torch's
    native = bool(server.get("native_kernels", True)) and cfg.device == "cpu" and cfg.dtype == "float32"
    device = resolve_device(cfg.device)  # before loading anything: a missing GPU is said at once
    for w in dict.fromkeys(weights):
        print(f"fastmode: loading {w} ...", file=sys.stderr, flush=True)
        loaded[w] = load_model(w, native_kernels=native)
        loaded[w].model.place(device, getattr(torch, cfg.dtype))
        how = ("quantized weights on the native kernels" if loaded[w].model.native
               else f"{cfg.dtype} weights in torch on {cfg.device}")
        sources = ["prompt lookup"]
        if loaded[w].draft_corpus is not None and cfg.draft_corpus:
            sources.append(f"a corpus of its answers ({len(loaded[w].draft_corpus) // 1000}k tokens)")
        if loaded[w].draft_head is not None and cfg.draft_head:
            sources.append("a trained draft head")
        if cfg.draft_pool:
            sources.append("the answers each user was given before")
        listed = sources[0] if len(sources) == 1 else f"{', '.join(sources[:-1])} and {sources[-1]}"
        print(f"fastmode: {w}: {how}, {loaded[w].weight_bytes / 1e6:.0f} MB read per decode step; fast lane "
              f"drafts from {listed}",
              file=sys.stderr, flush=True)
    db_path = _database(args, settings)
    platform = Platform(Database(db_path), open_mode=bool(server.get("open_mode", True)), limits=settings.limits)
    state = build_state(loaded, cfg, catalog=Catalog(settings.models) if settings.models else None, platform=platform)
    mode = "open mode: an unknown key (or none) acts for the default organization" if platform.accounts.open_mode else "API keys required"
    print(f"fastmode: serving {', '.join(e.id for e in state.catalog.entries)} on http://{host}:{port} "
          f"(ANTHROPIC_BASE_URL=http://{host}:{port}); {mode}; database {db_path}", file=sys.stderr, flush=True)
    # on Ctrl-C, requests still running get SHUTDOWN_GRACE_S to finish, then end with an overloaded error
    server = Server(state, uvicorn.Config(create_app(state), host=host, port=port, log_level=args.log_level),
                    SHUTDOWN_GRACE_S)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    return 0


def _check_port_free(host: str, port: int) -> None:
    """An OSError naming the address if another process listens on it."""
    import errno
    import socket

    try:  # every address the server will bind, as asyncio's create_server does
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror}") from e
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    continue  # an address this machine cannot bind: the server leaves it out too, or says so
                raise OSError(f"cannot serve on {host}:{port}: {e.strerror} (another process listens there: "
                              f"choose another with --port)") from e


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError("use on or off")
    return value == "on"


def _accounts(args: argparse.Namespace) -> int:
    import json

    from fastmode.platform.accounts import Accounts
    from fastmode.platform.db import Database

    settings = _settings(args)
    path = _database(args, settings)
    if not os.path.isfile(path) and not (args.what == "org" and args.action == "create"):
        if args.action == "list":  # nothing to list, and nothing to make a database for
            print(f"fastmode: no database at {path} yet", file=sys.stderr)
            return 0
        raise ValueError(f"no database at {path}: create an organization first (`fastmode accounts org create "
                         f"NAME`), or name the server's database with --db or --config")
    accounts = Accounts(Database(path), open_mode=False)

    def show(obj) -> None:
        print(json.dumps(dataclasses.asdict(obj), indent=2))

    if args.what == "org" and args.action == "create":
        show(accounts.create_org(args.name, fast_mode=args.fast_mode, zero_data_retention=args.zdr,
                                 priority_tier=args.priority_tier))
    elif args.what == "org" and args.action == "list":
        for org in accounts.orgs():
            print(json.dumps(dataclasses.asdict(org)))
    elif args.what == "org" and args.action == "set":
        flags = {k: v for k, v in (("fast_mode", args.fast_mode), ("zero_data_retention", args.zdr),
                                   ("priority_tier", args.priority_tier)) if v is not None}
        limits: dict[str, dict] = {}
        for item in args.limit or []:
            key, _, value = item.partition("=")
            lane, _, name = key.partition(".")
            if not value or not name:
                raise ValueError(f"--limit {item!r}: use LANE.KEY=N, e.g. fast.output_tokens_per_minute=20000 "
                                 f"(N = none removes the override)")
            if value != "none" and not (value.isascii() and value.isdigit()):
                raise ValueError(f"--limit {item!r}: N must be a whole number of tokens or requests per minute, "
                                 f"or none")
            limits.setdefault(lane, {})[name] = None if value == "none" else int(value)
        show(accounts.update_org(args.name, limits=limits or None, **flags))
    elif args.what == "key" and args.action == "create":
        key, secret = accounts.create_key(args.org, args.name or "", admin=args.admin)
        show(key)
        print(f"secret (shown once, store it now): {secret}")
    elif args.what == "key" and args.action == "list":
        for key in accounts.keys(args.org):
            print(json.dumps(dataclasses.asdict(key)))
    elif args.what == "key" and args.action == "revoke":
        show(accounts.revoke_key(args.key_id))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from fastmode.weights.registry import pull

    print(pull(args.model))
    return 0


def _train_head(args: argparse.Namespace) -> int:
    from fastmode.headtrain import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    from fastmode.bench.runner import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastmode", description="An Anthropic Messages API server with a fast mode.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the server")
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--model", default=None,
                   help=f"{DEFAULT_MODEL} (default), tiny-random, a .gguf file or a Hugging Face model directory")
    s.add_argument("--config", default=None, help="TOML file: [server], [engine], [limits], [[models]] "
                   "(see examples/fastmode.toml and examples/anthropic-catalog.toml)")
    s.add_argument("--db", default=None, help="SQLite database of accounts, usage and batches "
                   "(default $FASTMODE_DATA/fastmode.db or ~/.local/share/fastmode/fastmode.db)")
    s.add_argument("--threads", type=int, default=None,
                   help="threads (default: up to all cores; on the native kernels the count for each pass size "
                   "is chosen from measured pass times; N fixes it)")
    s.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (default 65536)")
    s.add_argument("--device", default=None, help="cpu (default) or cuda / cuda:N: where the model runs")
    s.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights, activations and KV cache (default float32; the native kernels are CPU float32)")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=_serve)
    a = sub.add_parser("accounts", help="organizations and API keys (fast-mode enrollment, zero data retention, "
                       "rate limits)")
    a.add_argument("--db", default=None, help="the server's database (default as for serve)")
    a.add_argument("--config", default=None, help="read the database path from this file's [server] database")
    what = a.add_subparsers(dest="what", required=True)
    org = what.add_parser("org", help="organizations").add_subparsers(dest="action", required=True)
    oc = org.add_parser("create", help="create an organization")
    oc.add_argument("name")
    oc.add_argument("--fast-mode", action="store_true", help="enroll it in fast mode")
    oc.add_argument("--zdr", action="store_true", help="zero data retention: no content is ever written")
    oc.add_argument("--priority-tier", action="store_true")
    org.add_parser("list", help="list organizations")
    os_ = org.add_parser("set", help="change an organization's settings")
    os_.add_argument("name")
    os_.add_argument("--fast-mode", type=_on_off, default=None, metavar="on|off")
    os_.add_argument("--zdr", type=_on_off, default=None, metavar="on|off")
    os_.add_argument("--priority-tier", type=_on_off, default=None, metavar="on|off")
    os_.add_argument("--limit", action="append", metavar="LANE.KEY=N",
                     help="per-minute limit override, e.g. fast.output_tokens_per_minute=20000; repeatable")
    key = what.add_parser("key", help="API keys").add_subparsers(dest="action", required=True)
    kc = key.add_parser("create", help="create a key (its secret is printed once)")
    kc.add_argument("org")
    kc.add_argument("--name", default=None)
    kc.add_argument("--admin", action="store_true", help="an admin key, for the usage and cost reports")
    key.add_parser("list", help="list an organization's keys").add_argument("org")
    key.add_parser("revoke", help="revoke a key").add_argument("key_id")
    a.set_defaults(func=_accounts)
    pl = sub.add_parser("pull", help="fetch and cache a model ahead of time")
    pl.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    pl.set_defaults(func=_pull)
    b = sub.add_parser("bench", help="measure TTFT and OTPS of any Anthropic-compatible endpoint")
    from fastmode.bench.compare import add_arguments as add_compare_arguments
    from fastmode.bench.runner import add_arguments

    add_arguments(b)
    add_compare_arguments(b)
    b.set_defaults(func=_bench)
    t = sub.add_parser("train-head", help="collect a model's answers to training prompts into its fast-lane draft "
                       "corpus and train its draft head on them (minutes)")
    t.add_argument("--model", default=DEFAULT_MODEL, help="the model to train a head for (default %(default)s)")
    t.add_argument("--out", default=None,
                   help="the head's file NAME.safetensors, the corpus going next to it as "
                   "NAME.corpus.safetensors (default: where the server looks for them: in the package for a "
                   "packaged model, MODEL.head.safetensors next to a local MODEL.gguf)")
    t.add_argument("--corpus-only", action="store_true", help="write the corpus, train no head")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--inter", type=int, default=1024, help="the head MLP's inner width (default %(default)s)")
    t.add_argument("--vocab", type=int, default=8192, help="most tokens the head can draft: the commonest in the "
                   "answers (default %(default)s)")
    t.add_argument("--prompts", type=int, default=0, help="use only the first N training prompts (default: all)")
    t.add_argument("--max-tokens", type=int, default=200, help="longest answer (default %(default)s)")
    t.add_argument("--eval", default=None, help="a workload whose answers measure the head's acceptance, never "
                   "trained on (default: the shipped dev.jsonl)")
    t.set_defaults(func=_train_head)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, sqlite3.Error) as e:
        print(f"fastmode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in a long command (pull, train-head, bench's start): no traceback
        print("fastmode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
