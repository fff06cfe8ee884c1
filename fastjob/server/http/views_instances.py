"""Instances: pages of them, one with all its attempts, its log (and a live tail), kill, retry,
and an app's stats. Every read comes from the database, so any server answers it."""
from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time
from typing import Any

from aiohttp import web

from ... import schedule
from ...models import FINAL_STATUSES, InstanceRow, JobRow, Status, fire_key, to_wire
from ..auth import Permission
from ..interventions import InterventionError, fire_attempts
from .backend import MAX_LIMIT, Call
from .encode import SLICE, dumps, encode
from .errors import HttpError

#: Answers of the same list query within this many seconds are shared (they are at most this old).
LIST_TTL = 1.0
MAX_CACHED = 256
MAX_CACHED_BYTES = 64 << 20
#: The parameters of the instance list (its cache key).
LIST_PARAMS = ("job", "status", "since", "until", "cursor", "limit")
#: How often a live log tail looks for new lines, and how long it may last.
TAIL_POLL = 0.25
TAIL_MAX_SECONDS = 3600.0
TAIL_BATCH = 1000
#: Live tails one server serves at once (each polls the database): more get 429.
MAX_TAILS = 64
#: The most log lines one read returns (page with ?offset=).
MAX_LOG_LINES = 10_000
#: How long a kill waits for the worker's report before answering with status "killing" (still stopping).
KILL_WAIT = 5.0
#: Stats windows (?window=) and the longest one.
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = 31 * 86400
STATS_BUCKETS = 60
LATENESS_SAMPLE = 10_000


def instance_json(row: InstanceRow, job_name: str | None = None) -> dict[str, Any]:
    out = to_wire(row)
    out["planned_at"] = row.planned_ms / 1000.0
    out["lateness"] = None if row.started_at is None else round(row.started_at - row.planned_ms / 1000.0, 6)
    out["duration"] = (None if row.started_at is None or row.finished_at is None
                       else round(row.finished_at - row.started_at, 6))
    if job_name is not None:
        out["job"] = job_name
    return out


def _cursor(row: InstanceRow) -> str:
    return base64.urlsafe_b64encode(f"{row.planned_ms}:{row.id}".encode()).decode()


def _parse_cursor(raw: str) -> tuple[int, int]:
    try:
        planned, _, ident = base64.urlsafe_b64decode(raw.encode()).decode().partition(":")
        cursor = int(planned), int(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        cursor = (-1, -1)
    if not all(0 <= part < 2**63 for part in cursor):
        raise HttpError("invalid", "bad cursor: pass back the next_cursor of the previous page")
    return cursor


class PageCache:
    """List answers by query, encoded, for LIST_TTL: a client polling ten times a second costs one
    read and one encoding a second."""

    def __init__(self) -> None:
        self._pages: dict[str, tuple[float, bytes]] = {}
        self._bytes = 0

    def get(self, key: str) -> bytes | None:
        hit = self._pages.get(key)
        if hit is None or time.monotonic() - hit[0] > LIST_TTL:
            return None
        return hit[1]

    def put(self, key: str, page: bytes) -> None:
        if len(self._pages) >= MAX_CACHED or self._bytes + len(page) > MAX_CACHED_BYTES:
            now = time.monotonic()
            self._pages = {k: v for k, v in self._pages.items() if now - v[0] <= LIST_TTL}
            self._bytes = sum(len(v[1]) for v in self._pages.values())
            if len(self._pages) >= MAX_CACHED or self._bytes + len(page) > MAX_CACHED_BYTES:
                self._pages.clear()
                self._bytes = 0
        old = self._pages.get(key)
        self._bytes += len(page) - (len(old[1]) if old else 0)
        self._pages[key] = (time.monotonic(), page)


PAGE_CACHE = web.AppKey("page_cache", PageCache)
TAILS = web.AppKey("tails", list)  # [live tails open now]


async def _instance_or_404(call: Call) -> InstanceRow:
    """The instance the URL names (read once per request: placement reads it before the view)."""
    if call.instance is not None:
        return call.instance
    raw = call.request.match_info["id"]
    try:
        instance_id = int(raw)
    except ValueError:
        instance_id = 0
    if not 0 < instance_id < 2**63:
        raise HttpError("invalid", f"an instance id is a positive 64-bit integer, got {raw[:40]!r}")
    row = await call.backend.store.get_instance(instance_id)
    if row is None or not call.principal.sees(row.app):
        raise HttpError("not_found", f"no instance {instance_id}")
    call.instance = row
    return row


async def app_of_instance(call: Call) -> str:
    """The app an instance route acts on (for forwarding to its owner)."""
    return (await _instance_or_404(call)).app


# ---- reads --------------------------------------------------------------------------------------------
async def list_instances(call: Call) -> web.Response:
    call.require(Permission.READ, call.app)
    query = call.request.query
    key = "\0".join([call.app, *(query.get(name, "") for name in LIST_PARAMS)])  # junk parameters share it
    cache = call.request.app[PAGE_CACHE]
    cached = cache.get(key)
    if cached is not None:
        return web.Response(body=cached, content_type="application/json")
    store = call.backend.store
    job_id = None
    names: dict[int, str] = {}
    job_name = call.request.query.get("job")
    if job_name:
        job = await store.get_job_by_name(call.app, job_name)
        if job is None:
            raise HttpError("not_found", f"no job {job_name!r} in app {call.app!r}")
        job_id, names = job.id, {job.id: job.name}
    raw_cursor = call.request.query.get("cursor")
    limit = call.query_int("limit", 100, 1, MAX_LIMIT) or 100
    rows = await store.query_instances(
        call.app, job_id=job_id, statuses=call.query_statuses(), since_ms=call.query_time_ms("since"),
        until_ms=call.query_time_ms("until"), after=_parse_cursor(raw_cursor) if raw_cursor else None,
        limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    if not names:
        names = await store.job_names(call.app, {row.job_id for row in rows})
    items: list[dict[str, Any]] = []
    for start in range(0, len(rows), SLICE):  # a slice at a time, yielding to the scheduler between
        items.extend(instance_json(row, names.get(row.job_id)) for row in rows[start:start + SLICE])
        await asyncio.sleep(0)
    body = await encode({"instances": items, "next_cursor": _cursor(rows[-1]) if more else None})
    cache.put(key, body)
    return web.Response(body=body, content_type="application/json")


async def get_instance(call: Call) -> dict[str, Any]:
    """One instance with every attempt of its fire."""
    row = await _instance_or_404(call)
    call.require(Permission.READ, row.app)
    store = call.backend.store
    job = await store.get_job(row.job_id)
    attempts = await fire_attempts(store, row, MAX_LIMIT)
    name = job.name if job is not None else None
    out: dict[str, Any] = {"instance": instance_json(row, name),
                           "attempts": [instance_json(a, name) for a in sorted(attempts, key=lambda a: a.attempt)]}
    root = fire_key(row.job_id, row.planned_ms)
    progress = (await store.task_progress([root])).get(root)
    if progress is not None:  # its fire mapped, broadcast or ran a workflow: /subtasks lists them
        out["progress"] = dict(zip(("items", "done", "failed"), progress, strict=True))
    return out


async def get_logs(call: Call) -> web.StreamResponse | dict[str, Any]:
    """The instance's log lines; ``?follow=1``: server-sent events, each new line as it is
    written, until the instance ends (then an ``end`` event with its status)."""
    row = await _instance_or_404(call)
    call.require(Permission.READ, row.app)
    if call.query_flag("follow"):
        tails = call.request.app[TAILS]
        if tails[0] >= MAX_TAILS:
            raise HttpError("rate_limited", f"{MAX_TAILS} live tails are open on this server; try again later")
        tails[0] += 1
        try:
            return await _tail(call, row)
        finally:
            tails[0] -= 1
    if call.backend.owned_apps().get(row.app) is not None:
        await call.backend.flush_statuses()
    limit = call.query_int("limit", 1000, 1, MAX_LOG_LINES) or 1000
    offset = call.query_int("offset", 0, 0, 2**31) or 0
    lines = await call.backend.store.get_logs(row.id, limit, offset)
    return {"lines": [{"ts": ln.ts, "level": ln.level, "message": ln.message} for ln in lines]}


async def _tail(call: Call, row: InstanceRow) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(call.request)
    store = call.backend.store
    sent = 0
    deadline = time.monotonic() + TAIL_MAX_SECONDS
    last_write = time.monotonic()
    while time.monotonic() < deadline:
        current = await store.get_instance(row.id)
        ended = current is None or current.status in FINAL_STATUSES
        lines = await store.get_logs(row.id, TAIL_BATCH, offset=sent)  # only what is new
        for line in lines:
            payload = dumps({"ts": line.ts, "level": line.level, "message": line.message})
            await response.write(f"event: line\ndata: {payload}\n\n".encode())
            last_write = time.monotonic()
        sent += len(lines)
        if len(lines) == TAIL_BATCH:
            continue  # more is waiting: read on before sleeping
        if ended:
            status = current.status.value if current is not None else "gone"
            await response.write(f"event: end\ndata: {dumps({'status': status})}\n\n".encode())
            break
        if time.monotonic() - last_write > 15:
            await response.write(b": keep-alive\n\n")
            last_write = time.monotonic()
        await asyncio.sleep(TAIL_POLL)
    await response.write_eof()
    return response


async def app_stats(call: Call) -> dict[str, Any]:
    """Fires by outcome per time bucket over ``?window=`` (e.g. 15m, 1h, 7d; default 1h), and
    lateness percentiles (planned to started), from the instance table."""
    call.require(Permission.READ, call.app)
    window = _window_seconds(call.request.query.get("window") or "1h")
    bucket_s = max(1, window // STATS_BUCKETS)
    now_ms = schedule.now_ms()
    until_ms = now_ms - now_ms % (bucket_s * 1000) + bucket_s * 1000  # the current bucket included
    since_ms = until_ms - bucket_s * 1000 * STATS_BUCKETS
    store = call.backend.store
    counts = await store.instance_counts(call.app, since_ms, until_ms, bucket_s * 1000)
    series: dict[int, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for start, status, n in counts:
        series.setdefault(start, {})[status] = n
        totals[status] = totals.get(status, 0) + n
    lateness = sorted(await store.lateness_sample(call.app, since_ms, until_ms, LATENESS_SAMPLE))
    return {
        "window": window, "bucket": bucket_s, "since": since_ms / 1000.0, "until": until_ms / 1000.0,
        "series": [{"t": start / 1000.0, **series[start]} for start in sorted(series)],
        "totals": totals,
        "lateness": {"count": len(lateness), **{f"p{q}": _quantile(lateness, q / 100) for q in (50, 90, 99)},
                     "max": lateness[-1] if lateness else None},
    }


def _window_seconds(raw: str) -> int:
    unit = _UNITS.get(raw[-1:])
    try:
        value = float(raw[:-1]) * unit if unit else float(raw)
        seconds = int(value) if math.isfinite(value) else -1
    except ValueError:
        seconds = -1
    if not 60 <= seconds <= MAX_WINDOW:
        raise HttpError("invalid", f"window must be 1m to 31d (like 15m, 1h, 7d), got {raw[:20]!r}")
    return seconds


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 6)


# ---- interventions (applied by the app's owner) ------------------------------------------------------
async def kill_instance(call: Call) -> dict[str, Any]:
    row = await _instance_or_404(call)
    call.require(Permission.OPERATE, row.app)
    job = await call.backend.store.get_job(row.job_id)
    try:
        outcome = call.backend.kill(row, job)
    except InterventionError as exc:
        raise HttpError(exc.code, exc.message) from None
    if outcome is Status.CANCELLED:
        await call.backend.flush_statuses()
        return {"instance_id": row.id, "status": Status.CANCELLED.value}
    deadline = time.monotonic() + KILL_WAIT
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        await call.backend.flush_statuses()
        current = await call.backend.store.get_instance(row.id)
        if current is not None and current.status in FINAL_STATUSES:
            return {"instance_id": row.id, "status": current.status.value}
    return {"instance_id": row.id, "status": "killing"}


async def retry_instance(call: Call) -> dict[str, Any]:
    row = await _instance_or_404(call)
    call.require(Permission.OPERATE, row.app)
    body = await call.body()
    job: JobRow | None = await call.backend.store.get_job(row.job_id)
    if job is None or job.is_delete:
        raise HttpError("conflict", f"instance {row.id}: its job was deleted")
    try:
        new = await call.backend.retry(row, job, bool(body.get("force")), body.get("params"))
    except InterventionError as exc:
        raise HttpError(exc.code, exc.message) from None
    return {"instance_id": new.id, "attempt": new.attempt}
