"""The model catalog: the model ids a server answers to, their aliases, limits, prices, accepted
parameters and fast-mode lifecycle. Torch-free; entries say which weights serve them."""
from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import cached_property
from typing import Any

THINKING_TYPES = ("enabled", "adaptive", "disabled", "between_tools")
EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")
FAST_BETA = "fast-mode-2026-02-01"


class CatalogError(ValueError):
    """A catalog entry is malformed; the message names the entry and the key."""


class FastMode(str, enum.Enum):
    GA = "ga"  # speed "fast" works without a beta header
    PREVIEW = "preview"  # needs anthropic-beta: fast-mode-2026-02-01
    DEPRECATED = "deprecated"  # still runs, and needs the beta header, until fast_mode_removed_at
    DEPRECATED_FALLBACK = "deprecated-fallback"  # runs at standard speed and price, silently
    REMOVED = "removed"  # 400
    UNSUPPORTED = "unsupported"  # 400


@dataclass(frozen=True)
class Prices:
    """USD per million tokens. Fast prices apply over the whole context window."""

    input: float = 0.0
    output: float = 0.0
    fast_input: float | None = None  # None: the standard price
    fast_output: float | None = None

    def rates(self, speed: str) -> tuple[float, float]:
        if speed == "fast":
            return (self.input if self.fast_input is None else self.fast_input,
                    self.output if self.fast_output is None else self.fast_output)
        return self.input, self.output


@dataclass(frozen=True)
class ModelEntry:
    id: str
    weights: str  # a model name the registry loads: smollm2-135m-instruct, tiny-random, a path
    display_name: str = ""
    aliases: tuple[str, ...] = ()  # exact names, or patterns with * (a lone "*" catches every id)
    context_window: int | None = None  # None: the weights' own context length
    max_output_tokens: int | None = None  # None: the context window
    prices: Prices = Prices()
    min_cacheable_tokens: int = 1024
    thinking_types: tuple[str, ...] = ("enabled", "adaptive", "disabled")
    effort_levels: tuple[str, ...] = ("low", "medium", "high", "max")  # empty: output_config.effort is a 400
    sampling_params: bool = True  # false: a non-default temperature, top_p or top_k is a 400
    fast_mode: FastMode = FastMode.GA
    fast_mode_removed_at: str | None = None  # RFC 3339: from then on speed "fast" is a 400, as if removed
    inference_geos: tuple[str, ...] = ("global", "us")
    created_at: str = "2026-01-01T00:00:00Z"
    lifecycle: str = "active"  # active | deprecated
    deprecated_at: str | None = None
    retires_at: str | None = None

    @property
    def name(self) -> str:
        return self.display_name or self.id

    @cached_property
    def released(self) -> float:
        """created_at as a Unix time (0 if it does not read as a date and time with a zone)."""
        try:
            return _timestamp(self.created_at)
        except ValueError:
            return 0.0

    @cached_property
    def fast_removal(self) -> float | None:
        """fast_mode_removed_at as a Unix time, or None."""
        return None if self.fast_mode_removed_at is None else _timestamp(self.fast_mode_removed_at)

    def fast_rejection(self, now: float, name: str | None = None) -> str | None:
        """Why `speed: "fast"` is a 400 for this model at Unix time `now`, or None; `name`: the
        model as the request named it (an alias, or a name the catch-all `*` serves)."""
        name = name or self.id
        removed = (self.fast_removal is not None and now >= self.fast_removal
                   and self.fast_mode is not FastMode.UNSUPPORTED)
        if self.fast_mode is FastMode.REMOVED or removed:
            when = f" on {self.fast_mode_removed_at}" if removed else ""
            return (f"speed: fast mode was removed for {name}{when}; it serves standard speed only. "
                    f"Remove the `speed` parameter, or use a model with fast mode.")
        if self.fast_mode is FastMode.UNSUPPORTED:
            return f"speed: {name} does not support the `speed` parameter value \"fast\"."
        return None


def _timestamp(text: str) -> float:
    """An RFC 3339 date and time (with Z or an offset) as a Unix time; ValueError if it is not one."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (end it with Z or an offset)")
    return when.timestamp()


def entry_from_table(raw: dict[str, Any], where: str) -> ModelEntry:
    """Build an entry from one TOML [[models]] table, naming what is wrong."""
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a table")
    known = {f.name for f in fields(ModelEntry)}
    unknown = set(raw) - known
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("id", "weights"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise CatalogError(f"{where}: `{key}` is required (a non-empty string)")
    where = f"{where} ({raw['id']})"
    kw: dict[str, Any] = dict(raw)
    try:
        prices = raw.get("prices", {})
        if not isinstance(prices, dict) or set(prices) - {f.name for f in fields(Prices)}:
            raise CatalogError(f"{where}: `prices` takes input, output, fast_input, fast_output (USD per million tokens)")
        for k, v in prices.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise CatalogError(f"{where}: prices.{k} must be a number of USD per million tokens, 0 or more, "
                                   f"not {v!r}")
        kw["prices"] = Prices(**{k: float(v) for k, v in prices.items()})
        if "fast_mode" in raw:
            kw["fast_mode"] = FastMode(raw["fast_mode"])
    except ValueError as e:
        if isinstance(e, CatalogError):
            raise
        raise CatalogError(f"{where}: {e} (fast_mode is one of {', '.join(m.value for m in FastMode)})") from e
    for key in ("aliases", "thinking_types", "effort_levels", "inference_geos"):
        if key in raw:
            if not isinstance(raw[key], list) or not all(isinstance(v, str) for v in raw[key]):
                raise CatalogError(f"{where}: `{key}` must be a list of strings")
            kw[key] = tuple(raw[key])
    bad = set(kw.get("thinking_types", ())) - set(THINKING_TYPES)
    if bad:
        raise CatalogError(f"{where}: unknown thinking type(s) {', '.join(sorted(bad))} (of {', '.join(THINKING_TYPES)})")
    bad = set(kw.get("effort_levels", ())) - set(EFFORT_LEVELS)
    if bad:
        raise CatalogError(f"{where}: unknown effort level(s) {', '.join(sorted(bad))} (of {', '.join(EFFORT_LEVELS)})")
    for key in ("context_window", "max_output_tokens", "min_cacheable_tokens"):
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 1):
            raise CatalogError(f"{where}: `{key}` must be a positive integer")
    for key in ("display_name", "lifecycle"):
        if key in raw and not isinstance(raw[key], str):
            raise CatalogError(f"{where}: `{key}` must be a string, not {raw[key]!r}")
    if "sampling_params" in raw and not isinstance(raw["sampling_params"], bool):
        raise CatalogError(f"{where}: `sampling_params` must be true or false, not {raw['sampling_params']!r}")
    for key in ("fast_mode_removed_at", "created_at", "deprecated_at", "retires_at"):
        when = raw.get(key)
        if isinstance(when, datetime) and when.tzinfo is not None:  # a TOML date-time with an offset
            when = kw[key] = when.isoformat().replace("+00:00", "Z")
        if when is not None:
            try:
                if not isinstance(when, str):
                    raise ValueError("not a string")
                _timestamp(when)
            except ValueError:
                raise CatalogError(f"{where}: `{key}` must be a date and time with a time zone, "
                                   f"such as 2026-11-30T00:00:00Z") from None
    if kw.get("lifecycle", "active") not in ("active", "deprecated"):
        raise CatalogError(f"{where}: `lifecycle` is active or deprecated")
    return ModelEntry(**kw)


@dataclass
class Catalog:
    entries: list[ModelEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        names: dict[str, str] = {}
        for e in self.entries:
            for name in (e.id, *(a for a in e.aliases if "*" not in a)):
                if name in names:
                    raise CatalogError(f"model name {name!r} is used by both {names[name]} and {e.id}")
                names[name] = e.id
        self._exact = {name: self.get(owner) for name, owner in names.items()}

    def get(self, model_id: str) -> ModelEntry | None:
        return next((e for e in self.entries if e.id == model_id), None)

    def resolve(self, name: str, patterns: bool = True) -> ModelEntry | None:
        """Exact ids and aliases first, then (with `patterns`) patterns in catalog order."""
        if name in self._exact or not patterns:
            return self._exact.get(name)
        for e in self.entries:
            if any("*" in a and fnmatch.fnmatchcase(name, a) for a in e.aliases):
                return e
        return None

    @property
    def weights(self) -> list[str]:
        return list(dict.fromkeys(e.weights for e in self.entries))
