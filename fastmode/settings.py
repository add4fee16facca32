"""Reads the TOML configuration file of `fastmode serve --config` into frozen config objects."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from fastmode.config import EngineConfig, LaneConfig

SERVER_KEYS = {"host", "port", "model"}


class SettingsError(ValueError):
    """The configuration file is unreadable or names an unknown setting."""


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _lane(raw: Any, where: str, default: LaneConfig) -> LaneConfig:
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: expected a table")
    unknown = set(raw) - _fields(LaneConfig)
    if unknown:
        raise SettingsError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(default, **raw)


def load_settings(path: str | Path) -> tuple[dict[str, Any], EngineConfig]:
    """Return ([server] table, EngineConfig built from [engine], [engine.fast], [engine.standard])."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"{path}: {e}") from e
    server = data.get("server", {})
    unknown = set(server) - SERVER_KEYS
    if unknown:
        raise SettingsError(f"{path}: [server] has unknown setting(s) {', '.join(sorted(unknown))}")
    engine = dict(data.get("engine", {}))
    base = EngineConfig()
    lanes = {name: _lane(engine.pop(name), f"{path}: [engine.{name}]", getattr(base, name))
             for name in ("fast", "standard") if name in engine}
    unknown = set(engine) - _fields(EngineConfig)
    if unknown:
        raise SettingsError(f"{path}: [engine] has unknown setting(s) {', '.join(sorted(unknown))}")
    try:
        return server, EngineConfig(**engine, **lanes)
    except TypeError as e:
        raise SettingsError(f"{path}: {e}") from e
