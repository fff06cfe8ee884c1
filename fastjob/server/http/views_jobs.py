"""Jobs: list, read, create, change, delete, pause, resume, trigger, preview, run history.

A job travels as the keyword arguments of ``Worker.schedule`` (fastjob/jobdef.py), plus the
state the server keeps of it. Jobs declared by workers' code are changed in code: the API
pauses, resumes and triggers them, and refuses to edit or delete them (the next declaration
would undo it).
"""
from __future__ import annotations

import time
from typing import Any

from ... import jobdef, schedule
from ...models import FINAL_STATUSES, JobRow, Origin
from ..auth import Permission, definition_refusal
from .backend import MAX_LIMIT, Call
from .errors import HttpError

FINAL_VALUES = frozenset(status.value for status in FINAL_STATUSES)
#: Most fire times a job read or a preview lists.
MAX_NEXT = 100
#: Longest Idempotency-Key.
MAX_KEY = 128


def job_json(job: JobRow) -> dict[str, Any]:
    """A stored job: its definition (jobdef fields) and its state."""
    out = jobdef.job_fields(job)
    out.update(
        id=job.id, app=job.app, origin=job.origin, paused_by=job.paused_by,
        next_fire_at=None if job.next_trigger_ms is None else job.next_trigger_ms / 1000.0,
        created_at=job.created_time, updated_at=job.updated_time, last_finished_at=job.last_finished_time,
        version=job.version, stats=job.stats,
    )
    return out


async def job_exists(call: Call) -> None:
    """Before an action is placed at the app's owner: an unknown job is a 404 here, and claims no app."""
    await job_or_404(call)


async def job_or_404(call: Call, name: str | None = None) -> JobRow:
    name = name if name is not None else call.request.match_info["name"]
    job = await call.backend.store.get_job_by_name(call.app, name)
    if job is None:
        raise HttpError("not_found", f"no job {name!r} in app {call.app!r}")
    return job


def spec_or_400(app: str, body: Any, name: str | None = None) -> Any:
    try:
        return jobdef.spec_from_json(app, body, name)
    except schedule.ScheduleError as exc:
        raise HttpError("invalid", str(exc)) from None


def _next_fires(job: Any, count: int, start_ms: int | None) -> list[float]:
    try:
        return [t / 1000.0 for t in schedule.upcoming_fires(job, count, schedule.now_ms(), start_ms)]
    except schedule.ScheduleError as exc:
        raise HttpError("invalid", str(exc)) from None


def _admin_only(call: Call, *handlers: str) -> None:
    """Command and container jobs choose programs that workers run: only an admin defines them."""
    for handler in handlers:
        refusal = definition_refusal(call.principal, handler)
        if refusal is not None:
            raise HttpError("forbidden", refusal)


def _code_owned(job: JobRow, what: str) -> None:
    if job.origin == Origin.CODE.value:
        raise HttpError("conflict", f"job {job.name!r} is declared by its workers' code: {what} it there (the API"
                                    " pauses, resumes and triggers it)")


# ---- reads --------------------------------------------------------------------------------------
async def list_jobs(call: Call) -> dict[str, Any]:
    """Jobs by name, filtered by ?name= (a part of it), ?tag=, ?enabled=; paginated by name."""
    call.require(Permission.READ, call.app)
    limit = call.query_int("limit", 100, 1, MAX_LIMIT) or 100
    query = call.request.query
    enabled = query.get("enabled")
    jobs = await call.backend.store.query_jobs(
        call.app, after=query.get("cursor") or "", limit=limit + 1, name_contains=query.get("name") or "",
        tag=query.get("tag") or "", enabled=None if enabled is None else enabled.lower() in ("1", "true", "yes"))
    page = jobs[:limit]
    cursor = page[-1].name if len(jobs) > limit else None
    day_ago = schedule.now_ms() - 86_400_000
    outcomes = await call.backend.store.job_outcomes(call.app, [job.id for job in page], day_ago)
    return {"jobs": [{**job_json(job), "last_day": _summary(outcomes.get(job.id, {}))} for job in page],
            "next_cursor": cursor}


def _summary(counts: dict[str, int]) -> dict[str, Any]:
    """A job's last 24 hours: fires by outcome, and the share of finished ones that succeeded."""
    finished = sum(n for status, n in counts.items() if status in FINAL_VALUES)
    rate = None if not finished else round(counts.get("succeeded", 0) / finished, 4)
    return {"outcomes": counts, "success_rate": rate}


async def get_job(call: Call) -> dict[str, Any]:
    call.require(Permission.READ, call.app)
    job = await job_or_404(call)
    out: dict[str, Any] = {"job": job_json(job)}
    count = call.query_int("next", None, 0, MAX_NEXT)
    if count:
        out["next_fires"] = _next_fires(job, count, job.next_trigger_ms) if job.enabled else []
    return out


async def preview_job(call: Call) -> dict[str, Any]:
    """Check an unsaved job and list its next fire times (?next=, default 10)."""
    call.require(Permission.READ, call.app)
    spec = spec_or_400(call.app, await call.body())
    count = call.query_int("next", 10, 0, MAX_NEXT) or 0
    return {"valid": True, "job": jobdef.job_fields(spec), "next_fires": _next_fires(spec, count, None)}


async def list_runs(call: Call) -> dict[str, Any]:
    """The run history of a worker-run (second-level) job, newest first."""
    call.require(Permission.READ, call.app)
    job = await job_or_404(call)
    await call.backend.flush_statuses()
    limit = call.query_int("limit", 100, 1, MAX_LIMIT) or 100
    runs = await call.backend.store.list_job_runs(job.id, limit)
    return {"runs": [{"worker": r.worker, "planned_at": r.planned_at, "started_at": r.started_at,
                      "duration": r.duration, "status": r.status, "error": r.error, "logs": r.logs}
                     for r in runs], "stats": job.stats}


# ---- changes (applied by the app's owner) -----------------------------------------------------------
async def create_job(call: Call) -> dict[str, Any]:
    call.require(Permission.MANAGE, call.app)
    spec = spec_or_400(call.app, await call.body())
    call.target = spec.name
    _admin_only(call, spec.handler)
    if await call.backend.store.get_job_by_name(call.app, spec.name) is not None:
        raise HttpError("conflict", f"job {spec.name!r} exists in app {call.app!r}; PATCH it to change it")
    return {"job": job_json(await call.backend.upsert_job(spec))}


async def patch_job(call: Call) -> dict[str, Any]:
    """Change some fields; giving one schedule keyword replaces the job's schedule."""
    call.require(Permission.MANAGE, call.app)
    job = await job_or_404(call)
    _code_owned(job, "change")
    patch = await call.body()
    fields = jobdef.job_fields(job)
    if any(patch.get(key) is not None for key in jobdef.SCHEDULE_KEYS):
        for key in jobdef.SCHEDULE_KEYS:
            fields.pop(key, None)
    fields.update(patch)
    spec = spec_or_400(call.app, fields, job.name)
    _admin_only(call, job.handler, spec.handler)
    return {"job": job_json(await call.backend.upsert_job(spec))}


async def delete_job(call: Call) -> dict[str, Any]:
    call.require(Permission.MANAGE, call.app)
    job = await job_or_404(call)
    _code_owned(job, "delete")
    deleted = await call.backend.store.delete_job(call.app, job.name, time.time())
    await call.backend.reload_job(job.id)
    return {"deleted": deleted}


async def pause_job(call: Call) -> dict[str, Any]:
    return await _set_enabled(call, False)


async def resume_job(call: Call) -> dict[str, Any]:
    return await _set_enabled(call, True)


async def _set_enabled(call: Call, enabled: bool) -> dict[str, Any]:
    call.require(Permission.OPERATE, call.app)
    job = await job_or_404(call)
    next_ms = call.backend.first_fire_ms(job, schedule.now_ms()) if enabled else None
    await call.backend.store.set_job_enabled(call.app, job.name, enabled, next_ms, time.time())
    await call.backend.reload_job(job.id)
    return {"job": job_json(await job_or_404(call))}


async def trigger_job(call: Call) -> dict[str, Any]:
    """Fire the job now; an Idempotency-Key header makes a repeated request answer the first's instance."""
    call.require(Permission.TRIGGER, call.app)
    body = await call.body()
    job = await job_or_404(call)
    header = call.request.headers.get("Idempotency-Key")
    if header is None:
        return {"instance_id": await _trigger(call, job, body)}
    if not 0 < len(header) <= MAX_KEY:
        raise HttpError("invalid", f"Idempotency-Key must be 1 to {MAX_KEY} characters")
    key = f"{job.name}\0{header}"  # keys are per job
    store = call.backend.store
    took, instance_id = await store.reserve_idempotency_key(call.app, key, time.time())
    if not took:  # before any other check: a repeated request gets the first one's answer
        if instance_id is None:
            raise HttpError("conflict", "a trigger with this Idempotency-Key is in progress, or its outcome is"
                                        " unknown (the database failed); it will not fire twice")
        return {"instance_id": instance_id, "replayed": True}
    try:
        instance_id = await _trigger(call, job, body)
    except HttpError:
        await store.settle_idempotency_key(call.app, key, None)  # refused: nothing fired, the key is free
        raise
    # a StoreError leaves the key reserved: the trigger may have been written (the scanner then fires it)
    await store.settle_idempotency_key(call.app, key, instance_id)
    return {"instance_id": instance_id}


async def _trigger(call: Call, job: JobRow, body: dict[str, Any]) -> int:
    force = bool(body.get("force"))
    if not force:
        refusal = call.backend.overlap_refusal(job)
        if refusal is not None:
            raise HttpError("conflict", refusal)
    return (await call.backend.trigger(call.app, job, body.get("params"), force)).id
