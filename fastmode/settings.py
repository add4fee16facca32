"""Reads the TOML configuration file of `fastmode serve --config` into frozen config objects."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmode.config import EngineConfig, LaneConfig
from fastmode.platform.accounts import AccountError, check_limits
from fastmode.platform.catalog import CatalogError, ModelEntry, entry_from_table

SERVER_TYPES = {"host": str, "port": (int, str), "model": str, "database": str, "open_mode": bool, "native_kernels": bool}
SERVER_KEYS = set(SERVER_TYPES)


class SettingsError(ValueError):
    """The configuration file is unreadable or names an unknown setting."""


@dataclass
class Settings:
    server: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)
    models: list[ModelEntry] = field(default_factory=list)  # empty: one entry for [server] model
    limits: dict[str, dict[str, int]] = field(default_factory=dict)  # lane -> per-minute limits
    folder: str | None = None  # the file's folder (absolute): what a relative [server] database is in


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _lane(raw: Any, where: str, default: LaneConfig) -> LaneConfig:
    if not isinstance(raw, dict):
        raise SettingsError(f"{where}: expected a table")
    unknown = set(raw) - _fields(LaneConfig)
    if unknown:
        raise SettingsError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    _check_types(raw, default, where)
    try:
        return dataclasses.replace(default, **raw)
    except ValueError as e:
        raise SettingsError(f"{where}: {e}") from e


def _check_types(raw: dict[str, Any], defaults: Any, where: str) -> None:
    """Each setting of the kind its default is (a quoted "false" is not false)."""
    for key, value in raw.items():
        if want := _mismatch(value, getattr(defaults, key)):
            raise SettingsError(f"{where}: {key} must be {want}, not {value!r}")


def _limits(raw: Any, path: str | Path) -> dict[str, dict[str, int]]:
    try:
        check_limits(raw, f"{path}: [limits]")
    except AccountError as e:
        raise SettingsError(str(e)) from e
    return raw


def _mismatch(value: Any, default: Any) -> str:
    """What a setting whose default is `default` must be, if `value` is not that; else ""."""
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return "" if number and isinstance(value, int) else "a whole number"
    if isinstance(default, float):
        return "" if number else "a number"
    if isinstance(default, str):
        return "" if isinstance(value, str) else "a string"
    return ""


def load_settings(path: str | Path) -> Settings:
    """[server], [engine] (+ [engine.fast], [engine.standard]), [limits.*] and [[models]]."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"{path}: {e}") from e
    unknown = set(data) - {"server", "engine", "limits", "models"}
    if unknown:
        raise SettingsError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    server = data.get("server", {})
    unknown = set(server) - SERVER_KEYS
    if unknown:
        raise SettingsError(f"{path}: [server] has unknown setting(s) {', '.join(sorted(unknown))}")
    for key, kind in SERVER_TYPES.items():
        value = server.get(key)
        if value is not None and not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
            what = {bool: "true or false", (int, str): "a whole number", str: "a string"}[kind]
            raise SettingsError(f"{path}: [server] {key} must be {what}, not {value!r}")
    if "port" in server:  # a number, or a string of digits
        port = server["port"]
        if isinstance(port, str) and not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
            raise SettingsError(f"{path}: [server] port must be a whole number from 0 (any free port) to 65535, "
                                f"not {port!r}")
        server = {**server, "port": int(port)}
    if "model" in server and data.get("models"):
        raise SettingsError(f"{path}: [server] model cannot be combined with a [[models]] catalog; "
                            f"set `weights` in the catalog's entries")
    engine = dict(data.get("engine", {}))
    base = EngineConfig()
    lanes = {name: _lane(engine.pop(name), f"{path}: [engine.{name}]", getattr(base, name))
             for name in ("fast", "standard") if name in engine}
    unknown = set(engine) - _fields(EngineConfig)
    if unknown:
        raise SettingsError(f"{path}: [engine] has unknown setting(s) {', '.join(sorted(unknown))}")
    _check_types(engine, base, f"{path}: [engine]")
    try:
        cfg = EngineConfig(**engine, **lanes)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"{path}: [engine] {e}") from e
    models = data.get("models", [])
    if not isinstance(models, list):
        raise SettingsError(f"{path}: models must be an array of tables, [[models]]")
    try:
        entries = [entry_from_table(m, f"{path}: [[models]] #{i + 1}") for i, m in enumerate(models)]
    except CatalogError as e:
        raise SettingsError(str(e)) from e
    return Settings(server, cfg, entries, _limits(data.get("limits", {}), path), str(Path(path).absolute().parent))
