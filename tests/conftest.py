"""Shared fixtures: the tiny random model, engines over it, and real servers on loopback."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
import uvicorn

from fastmode.config import EngineConfig
from fastmode.engine.engine import Engine
from fastmode.server.app import ServerState, build_state, create_app
from fastmode.weights.registry import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("tiny-random")


def fixed_pass_cost(engine: Engine) -> Engine:
    """Price the engine's drafts with a fixed pass-cost line (100 ms + 1 ms a row) instead of
    the measured one, so that whether and how far a test's requests draft does not hang on the
    pass times the machine happens to measure. (The draft head's own step is still timed: at
    these prices even a step slowed a hundredfold by a busy machine stays a small part of a pass.)"""
    engine.runner.step_time = lambda rows: 0.1 + 1e-3 * rows
    return engine


def small_engine_config(**overrides) -> EngineConfig:
    base = dict(kv_cache_tokens=4096, block_size=16, prefill_chunk=32)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture
def make_engine(tiny: LoadedModel):
    def make(**overrides) -> Engine:
        return Engine(tiny.model, small_engine_config(**overrides), tiny.tokenizer.eos_ids)
    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_asgi(app, what: str = "test server", server_class=uvicorn.Server) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yield the base URL.
    `server_class(config)`: the server to run it (uvicorn's)."""
    port = free_port()
    server = server_class(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def running_server(state: ServerState):
    """Serve `state` on a free loopback port; a context manager yielding the base URL."""
    return serve_asgi(create_app(state))


@pytest.fixture(scope="module")
def tiny_server(tiny: LoadedModel) -> Iterator[tuple[str, ServerState]]:
    state = build_state(tiny, small_engine_config())
    with running_server(state) as url:
        yield url, state


@pytest.fixture(scope="session")
def tiny_q4(tmp_path_factory) -> LoadedModel:
    """tiny-random's weights written as a llama.cpp GGUF in Q4_1 (embedding table Q8_0) and
    loaded quantized: it runs on the native kernels. Skipped where they cannot be built."""
    from fastmode import kernels
    from fastmode.weights.tiny import tiny_arch, tiny_state_dict, tiny_tokenizer
    from gguf_writer import hf_names, write_tiny_gguf

    if kernels.load() is None:
        pytest.skip("the native kernels cannot be built here (no C compiler)")
    tok = tiny_tokenizer()
    # rows of 9 and 10 blocks: the kernels' groups of 8 blocks and the blocks after them
    arch = dataclasses.replace(tiny_arch(tok.vocab_size), hidden_size=288, intermediate_size=320)
    path = tmp_path_factory.mktemp("q4") / "tiny-q4.gguf"
    write_tiny_gguf(path, tok, arch, hf_names(arch, tiny_state_dict(arch)), "Q4_1", embed_kind="Q8_0")
    loaded = load_model(str(path), native_kernels=True)
    assert loaded.model.native, "a Q4_1 model must run on the native kernels"
    return loaded


@pytest.fixture
def make_q4_engine(tiny_q4: LoadedModel):
    def make(**overrides) -> Engine:
        return Engine(tiny_q4.model, small_engine_config(**overrides), tiny_q4.tokenizer.eos_ids)
    return make
