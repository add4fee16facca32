"""The `fastmode` command: serve, pull, bench."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from fastmode.weights.registry import DEFAULT_MODEL


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fastmode.config import EngineConfig
    from fastmode.server.app import build_state, create_app
    from fastmode.weights.registry import load_model

    from fastmode.settings import load_settings

    server, cfg = load_settings(args.config) if args.config else ({}, EngineConfig())
    # command-line flags win over the file, the file over the defaults
    host = args.host or server.get("host", "127.0.0.1")
    port = args.port or int(server.get("port", 8000))
    model = args.model or server.get("model", DEFAULT_MODEL)
    overrides = {"num_threads": args.threads, "kv_cache_tokens": args.kv_cache_tokens}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    print(f"fastmode: loading {model} ...", file=sys.stderr, flush=True)
    loaded = load_model(model)
    keys = frozenset(k for k in os.environ.get("FASTMODE_API_KEYS", "").split(",") if k)
    state = build_state(loaded, cfg, keys)
    print(f"fastmode: serving {state.model_id} on http://{host}:{port} "
          f"(ANTHROPIC_BASE_URL=http://{host}:{port})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(state), host=host, port=port, log_level=args.log_level)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from fastmode.weights.registry import pull

    print(pull(args.model))
    return 0


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
    s.add_argument("--config", default=None, help="TOML file with [server] and [engine] settings (see docs/configuration.md)")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, all cores)")
    s.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (default 65536)")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=_serve)
    pl = sub.add_parser("pull", help="fetch and cache a model ahead of time")
    pl.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    pl.set_defaults(func=_pull)
    b = sub.add_parser("bench", help="measure TTFT and OTPS of any Anthropic-compatible endpoint")
    from fastmode.bench.runner import add_arguments

    add_arguments(b)
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"fastmode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
