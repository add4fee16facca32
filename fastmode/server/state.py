"""What a running server holds: the catalog, one engine per distinct weights, the platform."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from fastmode.config import EngineConfig
from fastmode.engine.engine import Engine
from fastmode.platform.catalog import Catalog, CatalogError, ModelEntry
from fastmode.platform.service import Platform
from fastmode.server.generation import Generation
from fastmode.tokenizer.chat_template import ChatTemplate
from fastmode.weights.registry import LoadedModel


@dataclass
class Backend:
    """Loaded weights and the engine that runs them; several catalog entries may share one."""

    loaded: LoadedModel
    engine: Engine
    template: ChatTemplate


@dataclass
class ServerState:
    catalog: Catalog
    backends: dict[str, Backend]  # by ModelEntry.weights
    platform: Platform
    created_at: str
    batches: object | None = field(default=None)  # the BatchRunner, once the app starts
    live: set[Generation] = field(default_factory=set)  # the HTTP requests generating now (not batch items)
    stopping: bool = False  # the shutdown's cut-off has passed: new requests are refused

    def backend(self, entry: ModelEntry) -> Backend:
        return self.backends[entry.weights]

    def context_window(self, entry: ModelEntry) -> int:
        return entry.context_window or self.backend(entry).loaded.arch.max_position

    @property
    def engines(self) -> list[Engine]:
        return [b.engine for b in self.backends.values()]

    def end_live_requests(self) -> None:
        """End every HTTP request still generating as the engine's shutdown would: a stream's
        last event is an overloaded error, a request not streamed answers 529 (the server is
        stopping; its cut-off, see app.Server); one that has not started yet (reading its body,
        tokenizing) is refused with a 529 when it would."""
        self.stopping = True
        for gen in list(self.live):
            gen.abort()


def default_entry(loaded: LoadedModel) -> ModelEntry:
    """Without a catalog: the loaded model under its own name, fast mode generally available."""
    return ModelEntry(id=loaded.name, weights=loaded.name, display_name=loaded.display_name)


def build_state(models: LoadedModel | dict[str, LoadedModel], engine_config: EngineConfig, *,
                catalog: Catalog | None = None, platform: Platform | None = None) -> ServerState:
    """`models` maps each catalog entry's `weights` to its loaded model (one model: the default catalog)."""
    if isinstance(models, LoadedModel):
        models = {models.name: models}
    if catalog is None:
        catalog = Catalog([default_entry(m) for m in models.values()])
    backends = {}
    for weights, loaded in models.items():
        tok = loaded.tokenizer
        eos = tok.token_text(tok.eos_ids[0]) if tok.eos_ids else ""
        bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
        backends[weights] = Backend(loaded, Engine(loaded.model, engine_config, tok.eos_ids,
                                                   draft_head=loaded.draft_head,
                                                   draft_corpus=loaded.draft_corpus),
                                    ChatTemplate(tok.chat_template, bos, eos))
    for e in catalog.entries:
        if e.weights not in backends:
            raise CatalogError(f"model {e.id}: weights {e.weights!r} were not loaded")
        positions = backends[e.weights].loaded.arch.max_position
        if e.context_window and e.context_window > positions:
            raise CatalogError(f"model {e.id}: context_window {e.context_window} exceeds the {positions} positions "
                               f"of its weights ({e.weights})")
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ServerState(catalog, backends, platform or Platform(), created)
