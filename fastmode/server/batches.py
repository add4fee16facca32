"""The Message Batches API: batches stored in the database, run by a background task in the
standard lane behind interactive traffic, at half price. Items survive a restart: an item
without a result is run again when the server comes back."""
from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fastmode.platform.accounts import ZDR_BATCH_MESSAGE, Principal
from fastmode.platform.db import Database
from fastmode.server import errors
from fastmode.server.errors import APIError, InvalidRequest, error_body, new_id
from fastmode.server.http import betas, endpoint, json_body, limit_param, log
from fastmode.server.messages import finish, final_message, message_json, prepare, run_to_end, start_generation
from fastmode.server.state import ServerState

MAX_REQUESTS = 100_000
MAX_BODY = 256 * 1024 * 1024
EXPIRY = timedelta(hours=24)
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
RESULT_STATES = ("succeeded", "errored", "canceled", "expired")


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def batch_json(db: Database, row: Any, base_url: str) -> dict[str, Any]:
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    for r in db.query("SELECT state, COUNT(*) AS n FROM batch_items WHERE batch_id = ? GROUP BY state", (row["id"],)):
        counts[r["state"]] = r["n"]
    ended = row["ended_at"] is not None
    status = "ended" if ended else "canceling" if row["cancel_initiated_at"] else "in_progress"
    return {"id": row["id"], "type": "message_batch", "processing_status": status, "request_counts": counts,
            "created_at": row["created_at"], "expires_at": row["expires_at"], "ended_at": row["ended_at"],
            "cancel_initiated_at": row["cancel_initiated_at"], "archived_at": row["archived_at"],
            "results_url": f"{base_url}/v1/messages/batches/{row['id']}/results" if ended else None}


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _batch_row(state: ServerState, principal: Principal, batch_id: str) -> Any:
    rows = state.platform.db.query("SELECT * FROM batches WHERE id = ? AND org_id = ?", (batch_id, principal.org.id))
    if not rows:
        raise errors.NotFound(f"message batch {batch_id!r} not found")
    return rows[0]


def _parse_requests(body: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(body, dict) or "requests" not in body:
        raise InvalidRequest("requests: Field required (a list of {custom_id, params})")
    reqs = body["requests"]
    if not isinstance(reqs, list) or not reqs:
        raise InvalidRequest("requests: Input should be a non-empty list")
    if len(reqs) > MAX_REQUESTS:
        raise InvalidRequest(f"requests: at most {MAX_REQUESTS} requests per batch, got {len(reqs)}")
    out, seen = [], set()
    for i, r in enumerate(reqs):
        if not isinstance(r, dict):
            raise InvalidRequest(f"requests.{i}: Input should be an object with custom_id and params")
        cid = r.get("custom_id")
        if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
            raise InvalidRequest(f"requests.{i}.custom_id: 1-64 characters of letters, digits, - and _")
        if cid in seen:
            raise InvalidRequest(f"requests.{i}.custom_id: {cid!r} is used twice; custom_id must be unique")
        seen.add(cid)
        params = r.get("params")
        if not isinstance(params, dict):
            raise InvalidRequest(f"requests.{i}.params: Field required (an object of Messages API parameters)")
        if params.get("stream"):
            raise InvalidRequest(f"requests.{i}.params.stream: streaming is not available in batches")
        # the SDK's request type for a batch item also has the header parameters of a direct call
        out.append((cid, {k: v for k, v in params.items() if k not in ("betas", "user_profile_id", "workspace_id")}))
    return out


async def create_batch(request: Request, state: ServerState) -> Response:
    principal: Principal = request.state.principal
    if principal.org.zero_data_retention:
        raise errors.PermissionDenied("Message Batches store requests and results until the batch is deleted, "
                                      "which zero data retention does not allow for your organization")
    items = _parse_requests(await json_body(request, MAX_BODY))
    db, now = state.platform.db, _now()
    batch_id = new_id("msgbatch_")
    with db.transaction() as conn:
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM batches").fetchone()[0]
        conn.execute("INSERT INTO batches (id, org_id, api_key_id, seq, api_version, betas, created_at, expires_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (batch_id, principal.org.id, principal.api_key_id, seq, request.state.api_version,
                      ",".join(sorted(betas(request))), _iso(now), _iso(now + EXPIRY)))
        conn.executemany("INSERT INTO batch_items (batch_id, idx, custom_id, params, state) VALUES (?, ?, ?, ?, ?)",
                         [(batch_id, i, cid, json.dumps(p), "processing") for i, (cid, p) in enumerate(items)])
    if state.batches is not None:
        state.batches.wake()
    return JSONResponse(batch_json(db, _batch_row(state, principal, batch_id), _base_url(request)))


async def get_batch(request: Request, state: ServerState) -> Response:
    row = _batch_row(state, request.state.principal, request.path_params["batch_id"])
    return JSONResponse(batch_json(state.platform.db, row, _base_url(request)))


async def list_batches(request: Request, state: ServerState) -> Response:
    q, org = request.query_params, request.state.principal.org.id
    n, db = limit_param(request), state.platform.db
    seq_of = {}
    for name in ("after_id", "before_id"):
        if q.get(name):
            rows = db.query("SELECT seq FROM batches WHERE id = ? AND org_id = ?", (q[name], org))
            if not rows:
                raise InvalidRequest(f"{name}: {q[name]!r} is not a message batch of your organization")
            seq_of[name] = rows[0]["seq"]
    # newest first; after_id pages towards older batches, before_id towards newer ones
    if "before_id" in seq_of and "after_id" not in seq_of:
        rows = db.query("SELECT * FROM batches WHERE org_id = ? AND seq > ? ORDER BY seq ASC LIMIT ?",
                        (org, seq_of["before_id"], n + 1))
        has_more, rows = len(rows) > n, rows[:n][::-1]
    else:
        rows = db.query("SELECT * FROM batches WHERE org_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                        (org, seq_of.get("after_id", 1 << 62), n + 1))
        has_more, rows = len(rows) > n, rows[:n]
    data = [batch_json(db, r, _base_url(request)) for r in rows]
    return JSONResponse({"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})


async def cancel_batch(request: Request, state: ServerState) -> Response:
    principal = request.state.principal
    row = _batch_row(state, principal, request.path_params["batch_id"])
    if row["ended_at"] is None and row["cancel_initiated_at"] is None:
        state.platform.db.execute("UPDATE batches SET cancel_initiated_at = ? WHERE id = ?", (_iso(_now()), row["id"]))
        if state.batches is not None:
            state.batches.wake()
    return JSONResponse(batch_json(state.platform.db, _batch_row(state, principal, row["id"]), _base_url(request)))


async def delete_batch(request: Request, state: ServerState) -> Response:
    row = _batch_row(state, request.state.principal, request.path_params["batch_id"])
    if row["ended_at"] is None:
        raise InvalidRequest(f"message batch {row['id']} is still processing; cancel it and wait until it has "
                             f"ended before deleting it")
    with state.platform.db.transaction() as conn:
        conn.execute("DELETE FROM batch_items WHERE batch_id = ?", (row["id"],))
        conn.execute("DELETE FROM batches WHERE id = ?", (row["id"],))
    return JSONResponse({"id": row["id"], "type": "message_batch_deleted"})


async def batch_results(request: Request, state: ServerState) -> Response:
    row = _batch_row(state, request.state.principal, request.path_params["batch_id"])
    if row["ended_at"] is None:
        raise InvalidRequest(f"message batch {row['id']} has not ended yet; its results are available once "
                             f"processing_status is 'ended'")
    lines = (json.dumps({"custom_id": r["custom_id"], "result": json.loads(r["result"])})
             for r in state.platform.db.query("SELECT custom_id, result FROM batch_items WHERE batch_id = ? "
                                              "ORDER BY idx", (row["id"],)))
    return Response("".join(line + "\n" for line in lines), media_type="application/x-jsonl")


def routes() -> list[Route]:
    return [
        Route("/v1/messages/batches", endpoint(create_batch), methods=["POST"]),
        Route("/v1/messages/batches", endpoint(list_batches), methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", endpoint(get_batch), methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", endpoint(delete_batch), methods=["DELETE"]),
        Route("/v1/messages/batches/{batch_id}/cancel", endpoint(cancel_batch), methods=["POST"]),
        Route("/v1/messages/batches/{batch_id}/results", endpoint(batch_results), methods=["GET"]),
    ]


class BatchRunner:
    """Runs pending batch items a few at a time (the engine queues them behind interactive
    requests of the standard lane), ends canceled and expired batches, and records results."""

    def __init__(self, state: ServerState, concurrency: int | None = None, poll_s: float = 1.0) -> None:
        self.state = state
        first = next(iter(state.backends.values()), None)
        self.concurrency = concurrency or max(1, first.engine.config.standard.max_batch // 4 if first else 1)
        self.poll_s = poll_s
        self.running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self.running.values()) if t is not None]
        for t in tasks:
            t.cancel()  # unfinished items keep no result: they run again after a restart
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:
                log.exception("batch runner tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _tick(self) -> None:
        db, now = self.state.platform.db, _iso(_now())
        for b in db.query("SELECT id, cancel_initiated_at, expires_at FROM batches WHERE ended_at IS NULL"):
            if b["cancel_initiated_at"] or b["expires_at"] <= now:
                final = "canceled" if b["cancel_initiated_at"] else "expired"
                for key, task in list(self.running.items()):
                    if key[0] == b["id"]:
                        task.cancel()  # its result is written by _run's cancellation path
                self._set_remaining(b["id"], final)
            if not db.query("SELECT 1 FROM batch_items WHERE batch_id = ? AND state = 'processing' LIMIT 1", (b["id"],)):
                db.execute("UPDATE batches SET ended_at = ? WHERE id = ? AND ended_at IS NULL", (now, b["id"]))
        free = self.concurrency - len(self.running)
        if free <= 0:
            return
        busy = set(self.running)
        pending = db.query("SELECT i.batch_id, i.idx FROM batch_items i JOIN batches b ON b.id = i.batch_id "
                           "WHERE i.state = 'processing' AND b.ended_at IS NULL AND b.cancel_initiated_at IS NULL "
                           "ORDER BY b.seq, i.idx LIMIT ?", (free + len(busy),))
        for r in pending:
            key = (r["batch_id"], r["idx"])
            if key not in busy and len(self.running) < self.concurrency:
                task = asyncio.get_running_loop().create_task(self._run(key))
                self.running[key] = task
                task.add_done_callback(lambda _t, k=key: self._done(k))

    def _done(self, key: tuple[str, int]) -> None:
        self.running.pop(key, None)
        self._wake.set()

    def _set_remaining(self, batch_id: str, final: str) -> None:
        self.state.platform.db.execute(
            "UPDATE batch_items SET state = ?, result = ?, params = '' WHERE batch_id = ? AND state = 'processing'",
            (final, json.dumps({"type": final}), batch_id))

    def _store(self, key: tuple[str, int], result: dict[str, Any]) -> None:
        """Record an item's result (ASCII JSON: lone surrogates from the input cannot break it)."""
        sql = ("UPDATE batch_items SET state = ?, result = ?, params = '' WHERE batch_id = ? AND idx = ? "
               "AND state = 'processing'")
        try:
            self.state.platform.db.execute(sql, (result["type"], json.dumps(result), *key))
        except Exception:
            log.exception("storing the result of batch item %s/%d failed", *key)
            fallback = {"type": "errored", "error": error_body(errors.InternalError("Internal server error"),
                                                              new_id("req_"))}
            self.state.platform.db.execute(sql, ("errored", json.dumps(fallback), *key))

    async def _run(self, key: tuple[str, int]) -> None:
        state, db = self.state, self.state.platform.db
        rows = db.query("SELECT i.params, b.org_id, b.api_key_id, b.api_version, b.betas FROM batch_items i "
                        "JOIN batches b ON b.id = i.batch_id WHERE i.batch_id = ? AND i.idx = ?", key)
        if not rows:
            return
        row = rows[0]
        request_id = new_id("req_")
        gen = ticket = prep = None
        try:
            org = state.platform.accounts.org(row["org_id"])
            if org.zero_data_retention:  # turned on since the batch was made: store no output, drop the prompt
                raise errors.PermissionDenied(ZDR_BATCH_MESSAGE)
            prep = await prepare(state, json.loads(row["params"]), row["api_version"],
                                 set(filter(None, row["betas"].split(","))), org, batch=True)
            ticket = state.platform.admit(org, row["api_key_id"], prep.entry, request_id=request_id, speed=prep.speed,
                                          service_tier="batch", inference_geo=prep.inference_geo,
                                          input_tokens=len(prep.ids), max_tokens=prep.req.max_tokens,
                                          rate_limited=False)
            msg_id = new_id("msg_")
            if not prep.runs_engine:
                ticket.finish(prep.ledger_usage(0), "max_tokens")
                message = message_json(msg_id, prep.entry.id, [], "max_tokens", None, prep.usage(0))
            else:
                gen = start_generation(prep, ticket)
                try:
                    await run_to_end(gen)
                except asyncio.CancelledError:
                    ticket.release()  # cut off (cancel, expiry, shutdown): no result, so no charge
                    raise
                finally:
                    gen.abort()
                    finish(gen, ticket, prep)  # does nothing after a release
                message = final_message(prep, gen, msg_id)
            self._store(key, {"type": "succeeded", "message": message})
        except errors.Overloaded:
            await asyncio.sleep(self.poll_s)  # engine queue full or shutting down: the item stays pending
        except APIError as e:
            self._store(key, {"type": "errored", "error": error_body(e, request_id)})
        except asyncio.CancelledError:
            b = db.query("SELECT cancel_initiated_at, expires_at FROM batches WHERE id = ?", (key[0],))
            if b and (b[0]["cancel_initiated_at"] or b[0]["expires_at"] <= _iso(_now())):
                final = "canceled" if b[0]["cancel_initiated_at"] else "expired"
                self._store(key, {"type": final})
            raise
        except Exception:
            log.exception("batch item %s/%d failed", *key)
            self._store(key, {"type": "errored",
                              "error": error_body(errors.InternalError("Internal server error"), request_id)})

