"""Health, the cluster, workers, server drain, tokens and the audit log."""
from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ...store import StoreError
from ..auth import GRANTS, ROLES, Permission
from .backend import MAX_LIMIT, Call
from .errors import HttpError

log = logging.getLogger("fastjob.http")


async def whoami(call: Call) -> dict[str, Any]:
    """The token's holder, role and apps (the console shows only what they allow)."""
    who = call.principal
    return {"name": who.name, "role": who.role, "apps": None if who.apps is None else sorted(who.apps),
            "permissions": sorted(p.value for p in GRANTS[who.role])}


async def healthz(call: Call) -> dict[str, Any]:
    return {"status": "ok", "server_id": call.backend.server_id}


async def readyz(call: Call) -> dict[str, Any]:
    """Ready when the store answers and this server's lease is valid (503 otherwise)."""
    try:
        await call.backend.store.list_servers()
    except StoreError as exc:
        log.warning("readyz: the database does not answer: %s", exc)
        raise HttpError("unavailable", "the database does not answer") from None
    ready, why = call.backend.ready()
    if not ready:
        raise HttpError("unavailable", why)
    return {"status": "ready", "server_id": call.backend.server_id}


async def metrics(call: Call) -> web.Response:
    """This server's metrics in Prometheus' text format."""
    body = await call.backend.metrics_text()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def cluster(call: Call) -> dict[str, Any]:
    """Servers (heartbeat age, owned apps, load) and apps (owner, epoch, owner since); a token scoped
    to apps sees those apps only (every role reads)."""
    store = call.backend.store
    servers = await store.list_servers()
    apps = [row for row in await store.list_apps() if call.principal.sees(row.name)]
    since: dict[str, float] = {}
    for change in await store.list_ownership_changes(limit=MAX_LIMIT):
        since.setdefault(change.app, change.ts)
    now = time.time()
    owned: dict[str, list[str]] = {}
    for row in apps:
        if row.owner is not None:
            owned.setdefault(row.owner, []).append(row.name)
    return {
        "server_id": call.backend.server_id,
        "servers": [{"id": s.id, "address": s.address, "http_address": s.http_address,
                     "heartbeat_age": round(now - s.heartbeat_at, 3), "started_at": s.started_at,
                     "load": s.load_score, "drain": s.drain, "apps": sorted(owned.get(s.id, []))} for s in servers],
        "apps": [{"name": row.name, "owner": row.owner, "epoch": row.epoch, "since": since.get(row.name)}
                 for row in apps],
    }


async def cluster_history(call: Call) -> dict[str, Any]:
    """Ownership changes, newest first (?app=, ?cursor=, ?limit=)."""
    app = call.request.query.get("app") or None
    if app is None and call.principal.apps is not None:
        raise HttpError("forbidden", "a token scoped to apps must name one: ?app=")
    call.require(Permission.READ, app)
    limit = call.query_int("limit", 100, 1, MAX_LIMIT) or 100
    before = call.query_int("cursor", None, 1, 2**62)
    changes = await call.backend.store.list_ownership_changes(app=app, before_id=before, limit=limit)
    return {"changes": [{"id": c.id, "app": c.app, "from": c.from_server, "to": c.to_server, "epoch": c.epoch,
                         "reason": c.reason, "at": c.ts} for c in changes],
            "next_cursor": str(changes[-1].id) if len(changes) == limit else None}


async def workers(call: Call) -> dict[str, Any]:
    """The app's connected workers, as its owner sees them (requests reach the owner)."""
    call.require(Permission.READ, call.app)
    backend = call.backend
    now = time.time()
    out = []
    for session in backend.workers_of(call.app):
        if not session.established or session.role != "worker":
            continue
        out.append({"id": session.worker_id, "address": _address(session.peername),
                    "handlers": session.handler_kinds, "tags": sorted(session.tags), "capacity": session.capacity,
                    "running": session.run_count, "draining": session.draining,
                    "connected_at": session.connected_at,
                    "heartbeat_age": round(session.silent_for(), 3),
                    "second_level_jobs": session.second_level_jobs()})
    out.sort(key=lambda w: str(w["id"]))
    return {"app": call.app, "owner": backend.server_id, "workers": out, "at": now}


def _address(peer: Any) -> str | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return None if peer is None else str(peer)


async def drain_server(call: Call) -> dict[str, Any]:
    """Ask a server to hand its apps to the others (body ``{"undo": true}`` lets it take apps again)."""
    call.require(Permission.MANAGE, None)
    server_id = call.request.match_info["id"]
    undo = bool((await call.body()).get("undo"))
    if not await call.backend.store.set_server_drain(server_id, not undo):
        raise HttpError("not_found", f"no server {server_id!r}")
    return {"server_id": server_id, "drain": not undo}


# ---- tokens ----------------------------------------------------------------------------------------------
def _token_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "role": row.role, "apps": row.apps, "created_at": row.created_at,
            "expires_at": row.expires_at, "revoked_at": row.revoked_at}


async def list_tokens(call: Call) -> dict[str, Any]:
    call.require(Permission.MANAGE, None)
    return {"tokens": [_token_json(row) for row in await call.backend.store.list_tokens()]}


async def create_token(call: Call) -> dict[str, Any]:
    """A new token; its secret is in this answer only."""
    call.require(Permission.MANAGE, None)
    body = await call.body()
    name, role, apps = body.get("name"), body.get("role"), body.get("apps")
    if not isinstance(name, str) or not 0 < len(name) <= 190:
        raise HttpError("invalid", "name is required: who holds the token (1 to 190 characters)")
    if role not in ROLES:
        raise HttpError("invalid", f"role must be one of {', '.join(ROLES)}")
    if apps is not None and (not isinstance(apps, list) or not apps or not all(isinstance(a, str) for a in apps)):
        raise HttpError("invalid", "apps must be a non-empty list of app names, or absent (every app)")
    expires_in = body.get("expires_in")
    if expires_in is not None and (type(expires_in) not in (int, float) or not 0 < expires_in < 1e10):
        raise HttpError("invalid", "expires_in must be a positive number of seconds")
    call.target = name
    token, row = await call.backend.auth.create(name, role, apps,
                                                None if expires_in is None else time.time() + expires_in)
    return {"token": token, **_token_json(row)}


async def revoke_token(call: Call) -> dict[str, Any]:
    call.require(Permission.MANAGE, None)
    token_id = call.request.match_info["id"]
    if not await call.backend.auth.revoke(token_id):
        raise HttpError("not_found", f"no active token {token_id!r}")
    return {"id": token_id, "revoked": True}


async def audit_log(call: Call) -> dict[str, Any]:
    """Mutating calls, newest first (?app=, ?cursor=, ?limit=); admins only."""
    app = call.request.query.get("app") or None
    if app is None and call.principal.apps is not None:
        raise HttpError("forbidden", "a token scoped to apps must name one: ?app=")
    call.require(Permission.MANAGE, app)
    await call.backend.audit.flush()
    limit = call.query_int("limit", 100, 1, MAX_LIMIT) or 100
    before = call.query_int("cursor", None, 1, 2**62)
    entries = await call.backend.store.list_audit(app=app, before_id=before, limit=limit)
    return {"entries": [{"id": e.id, "at": e.ts, "actor": e.actor, "action": e.action, "app": e.app,
                         "target": e.target, "outcome": e.outcome, "detail": e.detail, "via": e.via}
                        for e in entries],
            "next_cursor": str(entries[-1].id) if len(entries) == limit else None}
