"""The `fastmode` command: serve, pull, bench."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from fastmode.weights.registry import DEFAULT_MODEL


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fastmode.config import EngineConfig
    from fastmode.server.app import build_state, create_app
    from fastmode.weights.registry import load_model

    cfg = EngineConfig(num_threads=args.threads, kv_cache_tokens=args.kv_cache_tokens)
    print(f"fastmode: loading {args.model} ...", file=sys.stderr, flush=True)
    loaded = load_model(args.model)
    keys = frozenset(k for k in os.environ.get("FASTMODE_API_KEYS", "").split(",") if k)
    state = build_state(loaded, cfg, keys)
    print(f"fastmode: serving {state.model_id} on http://{args.host}:{args.port} "
          f"(ANTHROPIC_BASE_URL=http://{args.host}:{args.port})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
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
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL} (default), tiny-random, a .gguf file or a Hugging Face model directory")
    s.add_argument("--config", default=None, help="TOML configuration file (reserved for the model catalog)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    s.add_argument("--kv-cache-tokens", type=int, default=65536, help="KV cache size in tokens")
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
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None):
        print("fastmode: --config is not implemented yet; the model is taken from --model", file=sys.stderr)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"fastmode: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
