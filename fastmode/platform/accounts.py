"""Organizations and API keys in the embedded database. Keys are stored as SHA-256 hashes; the
secret is shown once, when it is created."""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

from fastmode.platform.db import Database
from fastmode.platform.ratelimit import LANES, LaneLimits

DEFAULT_ORG = "default"
ORG_FLAGS = ("fast_mode", "zero_data_retention", "priority_tier")
LIMIT_KEYS = tuple(f.name for f in fields(LaneLimits))


ZDR_BATCH_MESSAGE = ("zero data retention was turned on for your organization after this batch was created; "
                     "its items not done by then are not run (their results would be stored)")


class AccountError(ValueError):
    """An unknown organization or key, or a bad setting; the message says which."""


class InvalidKey(Exception):
    """No usable key was presented (only raised when open mode is off)."""


@dataclass(frozen=True)
class Organization:
    id: str
    name: str
    fast_mode: bool
    zero_data_retention: bool
    priority_tier: bool
    limits: dict[str, dict[str, int]]  # lane -> overrides of the server's per-minute limits

    @classmethod
    def from_row(cls, row: Any) -> Organization:
        return cls(row["id"], row["name"], bool(row["fast_mode"]), bool(row["zero_data_retention"]),
                   bool(row["priority_tier"]), json.loads(row["limits"]))


@dataclass(frozen=True)
class ApiKey:
    id: str
    org_id: str
    name: str
    hint: str
    admin: bool
    created_at: str
    revoked_at: str | None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the organization, the key (None for an unknown key in open mode), admin rights."""

    org: Organization
    api_key_id: str | None
    admin: bool


def check_limits(limits: object, where: str, *, allow_none: bool = False) -> None:
    """Per-lane per-minute limits: {lane: {key: non-negative int}} (None removes an override)."""
    if not isinstance(limits, dict) or set(limits) - set(LANES):
        raise AccountError(f"{where}: the lanes are {' and '.join(LANES)}")
    for lane, values in limits.items():
        if not isinstance(values, dict):
            raise AccountError(f"{where}.{lane}: expected a table of limits")
        for key, value in values.items():
            if key not in LIMIT_KEYS:
                raise AccountError(f"{where}.{lane}: unknown setting {key!r} (of {', '.join(LIMIT_KEYS)})")
            if not (value is None and allow_none) and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise AccountError(f"{where}.{lane}.{key} must be a non-negative integer")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Accounts:
    """Open mode (the default for local use): a key the database does not know, or no key at all,
    acts for the `default` organization, admin APIs included. With open mode off, only the
    database's keys are accepted and admin APIs need an admin key."""

    def __init__(self, db: Database, open_mode: bool = True) -> None:
        self.db = db
        self.open_mode = open_mode
        if self.find_org(DEFAULT_ORG) is None:
            self.create_org(DEFAULT_ORG, fast_mode=True)

    # organizations
    def create_org(self, name: str, *, fast_mode: bool = False, zero_data_retention: bool = False,
                   priority_tier: bool = False) -> Organization:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise AccountError(f"organization name {name!r}: use letters, digits, - and _")
        if self.find_org(name) is not None:
            raise AccountError(f"organization {name!r} already exists")
        org_id = "org_" + secrets.token_hex(12)
        self.db.execute("INSERT INTO organizations (id, name, fast_mode, zero_data_retention, priority_tier, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (org_id, name, int(fast_mode), int(zero_data_retention),
                                                      int(priority_tier), _now()))
        return self.org(org_id)

    def find_org(self, id_or_name: str) -> Organization | None:
        rows = self.db.query("SELECT * FROM organizations WHERE id = ? OR name = ?", (id_or_name, id_or_name))
        return Organization.from_row(rows[0]) if rows else None

    def org(self, id_or_name: str) -> Organization:
        org = self.find_org(id_or_name)
        if org is None:
            raise AccountError(f"no organization {id_or_name!r}")
        return org

    def orgs(self) -> list[Organization]:
        return [Organization.from_row(r) for r in self.db.query("SELECT * FROM organizations ORDER BY created_at, name")]

    def update_org(self, id_or_name: str, *, limits: dict[str, dict[str, int | None]] | None = None,
                   **flags: bool) -> Organization:
        org = self.org(id_or_name)
        unknown = set(flags) - set(ORG_FLAGS)
        if unknown:
            raise AccountError(f"unknown organization setting(s) {', '.join(sorted(unknown))}")
        check_limits(limits or {}, "limits", allow_none=True)
        merged = {lane: dict(org.limits.get(lane, {})) for lane in LANES}
        for lane, values in (limits or {}).items():
            for key, value in values.items():
                if value is None:
                    merged[lane].pop(key, None)  # back to the server's limit
                else:
                    merged[lane][key] = value
        with self.db.transaction() as conn:  # validated above: all or nothing
            for flag, value in flags.items():
                conn.execute(f"UPDATE organizations SET {flag} = ? WHERE id = ?", (int(bool(value)), org.id))
            if flags.get("zero_data_retention") and not org.zero_data_retention:
                # its batch items not done yet end here, prompts dropped (an item running now
                # finds its row no longer pending and stores nothing)
                conn.execute("UPDATE batch_items SET state = 'errored', params = '', result = ? WHERE state = "
                             "'processing' AND batch_id IN (SELECT id FROM batches WHERE org_id = ?)",
                             (json.dumps({"type": "errored", "error": {
                                 "type": "error", "request_id": None, "error": {
                                     "type": "permission_error", "message": ZDR_BATCH_MESSAGE}}}), org.id))
            if limits is not None:
                conn.execute("UPDATE organizations SET limits = ? WHERE id = ?",
                             (json.dumps({k: v for k, v in merged.items() if v}), org.id))
        return self.org(org.id)

    # keys
    def create_key(self, org: str, name: str = "", *, admin: bool = False) -> tuple[ApiKey, str]:
        """Return the key and its secret; only the hash of the secret is stored."""
        o = self.org(org)
        secret = ("sk-fm-admin01-" if admin else "sk-fm-api01-") + secrets.token_urlsafe(32)
        key_id = "apikey_" + secrets.token_hex(12)
        self.db.execute("INSERT INTO api_keys (id, org_id, name, key_hash, hint, admin, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (key_id, o.id, name or key_id, hash_key(secret), secret[-4:], int(admin), _now()))
        return self._key(key_id), secret

    def _key(self, key_id: str) -> ApiKey:
        rows = self.db.query("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        if not rows:
            raise AccountError(f"no API key {key_id!r}")
        r = rows[0]
        return ApiKey(r["id"], r["org_id"], r["name"], r["hint"], bool(r["admin"]), r["created_at"], r["revoked_at"])

    def keys(self, org: str) -> list[ApiKey]:
        o = self.org(org)
        return [self._key(r["id"]) for r in self.db.query("SELECT id FROM api_keys WHERE org_id = ? ORDER BY created_at",
                                                          (o.id,))]

    def revoke_key(self, key_id: str) -> ApiKey:
        self._key(key_id)
        self.db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (_now(), key_id))
        return self._key(key_id)

    def authenticate(self, secret: str | None) -> Principal:
        if secret:
            rows = self.db.query("SELECT k.id AS key_id, k.admin, k.revoked_at, o.* FROM api_keys k "
                                 "JOIN organizations o ON o.id = k.org_id WHERE k.key_hash = ?", (hash_key(secret),))
            if rows and rows[0]["revoked_at"] is None:
                return Principal(Organization.from_row(rows[0]), rows[0]["key_id"], bool(rows[0]["admin"]))
            if rows:
                raise InvalidKey("this API key has been revoked")
        if not self.open_mode:
            raise InvalidKey("invalid x-api-key" if secret else
                             "missing API key: send it as x-api-key or Authorization: Bearer")
        return Principal(self.org(DEFAULT_ORG), None, True)
