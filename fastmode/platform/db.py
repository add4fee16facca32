"""The embedded SQLite database: organizations, API keys, the usage ledger and message batches.

One connection shared by the server's threads behind a lock; every write commits at once, so
a row written is durable when the call returns."""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS organizations (
    id TEXT PRIMARY KEY,                         -- org_...
    name TEXT NOT NULL UNIQUE,
    fast_mode INTEGER NOT NULL DEFAULT 0,        -- enrolled in fast mode
    zero_data_retention INTEGER NOT NULL DEFAULT 0,
    priority_tier INTEGER NOT NULL DEFAULT 0,
    limits TEXT NOT NULL DEFAULT '{}',           -- JSON: per-minute limit overrides
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,                         -- apikey_...
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,               -- sha256 hex of the secret; the secret is never stored
    hint TEXT NOT NULL,                          -- the secret's last 4 characters, for display
    admin INTEGER NOT NULL DEFAULT 0,            -- admin keys reach the admin APIs only
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    api_key_id TEXT,
    model TEXT NOT NULL,                         -- the catalog id that served (aliases resolved)
    speed TEXT NOT NULL,                         -- 'standard' | 'fast': what actually ran
    service_tier TEXT NOT NULL,                  -- 'standard' | 'priority' | 'batch'
    inference_geo TEXT NOT NULL,                 -- 'global' | 'us'
    context_window TEXT NOT NULL,                -- '0-200k' | '200k-1M'
    uncached_input_tokens INTEGER NOT NULL,
    cache_creation_5m_input_tokens INTEGER NOT NULL,
    cache_creation_1h_input_tokens INTEGER NOT NULL,
    cache_read_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    input_price REAL NOT NULL,                   -- USD per million base input tokens at this speed
    output_price REAL NOT NULL,                  -- USD per million output tokens at this speed
    multiplier REAL NOT NULL,                    -- batch 0.5 x inference_geo us 1.1, stacked
    cost_usd REAL NOT NULL,                      -- the whole row's cost, every multiplier applied
    outcome TEXT NOT NULL,                       -- stop reason, or 'canceled' / 'error'
    created_at REAL NOT NULL                     -- unix seconds, UTC
);
CREATE INDEX IF NOT EXISTS usage_org_time ON usage(org_id, created_at);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,                         -- msgbatch_...
    org_id TEXT NOT NULL,
    api_key_id TEXT,
    seq INTEGER NOT NULL,                        -- creation order, for listing
    api_version TEXT NOT NULL,                   -- the anthropic-version its items are validated under
    betas TEXT NOT NULL DEFAULT '',              -- the anthropic-beta header it was created with
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    ended_at TEXT,
    cancel_initiated_at TEXT,
    archived_at TEXT
);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id TEXT NOT NULL REFERENCES batches(id),
    idx INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    params TEXT NOT NULL,                        -- JSON; cleared once the item has a result
    state TEXT NOT NULL,                         -- processing | succeeded | errored | canceled | expired
    result TEXT,                                 -- JSON of the result object
    PRIMARY KEY (batch_id, idx)
);
"""


class Database:
    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.path = str(Path(self.path).expanduser())
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run several statements atomically (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    def query(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
