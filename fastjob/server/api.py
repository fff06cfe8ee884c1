"""The client API: job definitions, triggers, instance and log queries, scoped to one app."""
from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .. import schedule
from ..models import (
    JOB_FIELD_TYPES,
    JOB_REQUIRED,
    RUN_HISTORY,
    SCHEDULE_TYPES,
    InstanceRow,
    JobRow,
    JobSpec,
    Overlap,
    Status,
    to_wire,
)
from ..protocol import ErrorCode
from ..store import NotOwnerError, Store


class ApiBackend(Protocol):
    """What the API needs of its server, and nothing more."""

    @property
    def store(self) -> Store: ...
    def owns(self, app: str) -> bool: ...
    def first_fire_ms(self, job: JobRow | JobSpec, now_ms: int) -> int | None: ...
    async def upsert_job(self, spec: JobSpec) -> JobRow: ...
    async def reload_job(self, job_id: int) -> None: ...
    async def trigger(self, app: str, job: JobRow, params: Any) -> InstanceRow: ...
    async def flush_statuses(self) -> None: ...


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: The JOB_FIELD_TYPES fields of a given type, with the types they may have (not ``object``).
_TYPED = {name: kinds for name, kinds in JOB_FIELD_TYPES.items() if object not in kinds}
_MISSING = object()
#: Exact types of the _TYPED fields (``object`` for a missing one) of job maps already found
#: good: a 100,000-job declaration repeats a handful of them, so most jobs cost one set lookup.
_GOOD_TYPES: set[tuple[type, ...]] = set()


def _check_types(body: dict[str, Any]) -> None:
    """Every field of a type it may have; a bool is not taken for an int."""
    found = tuple(map(type, map(body.get, _TYPED, itertools.repeat(_MISSING))))
    if found in _GOOD_TYPES:
        return
    for name, kinds in _TYPED.items():
        value = body.get(name, _MISSING)
        if value is not _MISSING and (not isinstance(value, kinds) or (type(value) is bool and bool not in kinds)):
            raise ApiError(ErrorCode.INVALID, f"job field {name!r} has the wrong type {type(value).__name__}")
    if len(_GOOD_TYPES) < 1024:
        _GOOD_TYPES.add(found)


def spec_from_wire(app: str, body: dict[str, Any]) -> JobSpec:
    """Check a job map field by field and build a JobSpec; a clear INVALID error otherwise."""
    for name in JOB_REQUIRED:
        if not body.get(name):
            raise ApiError(ErrorCode.INVALID, f"job field {name!r} is required")
    _check_types(body)
    kwargs: dict[str, Any] = {name: body[name] for name in JOB_FIELD_TYPES if name in body}
    kind = SCHEDULE_TYPES.get(kwargs["schedule_type"])
    if kind is None:
        raise ApiError(ErrorCode.INVALID, f"unknown schedule_type {body['schedule_type']!r}")
    kwargs["schedule_type"] = kind
    if "overlap" not in kwargs and "allow_overlap" in body:  # version 1's boolean
        if not isinstance(body["allow_overlap"], bool):
            raise ApiError(ErrorCode.INVALID, "job field 'allow_overlap' must be a boolean")
        kwargs["overlap"] = (Overlap.ALLOW if body["allow_overlap"] else Overlap.QUEUE).value
    if "tags" in kwargs:
        kwargs["tags"] = [str(tag) for tag in kwargs["tags"]]
    if len(kwargs["name"]) > 190:
        raise ApiError(ErrorCode.INVALID, "job name longer than 190 characters")
    spec = JobSpec(app=app, **kwargs)
    schedule.validate(spec)
    return spec


#: Jobs one JOB_DECLARE may carry (a worker sends at most 1000; the frame bounds the bytes).
MAX_DECLARED_PER_MESSAGE = 10_000


def declared_specs(app: str, jobs: list[Any]) -> list[JobSpec]:
    """A JOB_DECLARE batch checked job by job; the INVALID error names the job at fault."""
    if len(jobs) > MAX_DECLARED_PER_MESSAGE:
        raise ApiError(ErrorCode.INVALID, f"{len(jobs)} jobs in one JOB_DECLARE; at most {MAX_DECLARED_PER_MESSAGE}")
    specs: list[JobSpec] = []
    for job in jobs:  # maps (the schema layer checked that much)
        name = job.get("name")
        try:
            specs.append(spec_from_wire(app, job))
        except ApiError as exc:
            raise ApiError(exc.code, f"job {name!r}: {exc.message}") from None
        except schedule.ScheduleError as exc:
            raise ApiError(ErrorCode.INVALID, f"job {name!r}: {exc}") from None
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        raise ApiError(ErrorCode.INVALID, f"jobs declared twice in one batch: {', '.join(map(repr, twice[:5]))}")
    return specs


async def _job_or_404(server: ApiBackend, app: str, name: Any) -> JobRow:
    if not isinstance(name, str):
        raise ApiError(ErrorCode.INVALID, "job name must be a string")
    job = await server.store.get_job_by_name(app, name)
    if job is None:
        raise ApiError(ErrorCode.NOT_FOUND, f"no job {name!r} in app {app!r}")
    return job


def job_to_wire(job: JobRow) -> dict[str, Any]:
    """A job record; ``allow_overlap`` is kept for version-1 readers (overlap == "allow")."""
    out = to_wire(job)
    out["allow_overlap"] = job.overlap == Overlap.ALLOW.value
    return out


async def job_upsert(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body.get("job"), dict):
        raise ApiError(ErrorCode.INVALID, "JOB_UPSERT needs a 'job' map")
    spec = spec_from_wire(app, body["job"])
    job = await server.upsert_job(spec)
    return {"job": job_to_wire(job)}


async def job_delete(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    job = await _job_or_404(server, app, body["name"])
    deleted = await server.store.delete_job(app, job.name, time.time())
    await server.reload_job(job.id)
    return {"deleted": deleted}


async def job_enable(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    job = await _job_or_404(server, app, body["name"])
    enabled = bool(body["enabled"])
    next_ms = server.first_fire_ms(job, schedule.now_ms()) if enabled else None
    ok = await server.store.set_job_enabled(app, job.name, enabled, next_ms, time.time())
    await server.reload_job(job.id)
    return {"ok": ok}


async def job_get(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"job": job_to_wire(await _job_or_404(server, app, body["name"]))}


async def job_list(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"jobs": [job_to_wire(job) for job in await server.store.list_jobs(app)]}


async def trigger(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    job = await _job_or_404(server, app, body["name"])
    row = await server.trigger(app, job, body.get("params"))
    return {"instance_id": row.id}


async def instance_get(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    row = await server.store.get_instance(body["instance_id"])
    if row is None or row.app != app:
        raise ApiError(ErrorCode.NOT_FOUND, f"no instance {body['instance_id']} in app {app!r}")
    return {"instance": to_wire(row)}


async def instance_list(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    job_id = None
    if body.get("job"):
        job_id = (await _job_or_404(server, app, body["job"])).id
    statuses = None
    if body.get("status"):
        try:
            statuses = [Status(s) for s in body["status"]]
        except ValueError as exc:
            raise ApiError(ErrorCode.INVALID, str(exc)) from None
    limit = max(1, min(int(body.get("limit") or 100), 10_000))
    rows = await server.store.list_instances(app, job_id, statuses, limit)
    return {"instances": [to_wire(row) for row in rows]}


async def log_get(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    row = await server.store.get_instance(body["instance_id"])
    if row is None or row.app != app:
        raise ApiError(ErrorCode.NOT_FOUND, f"no instance {body['instance_id']} in app {app!r}")
    await server.flush_statuses()  # so a caller sees the lines its worker already sent
    limit = max(1, min(int(body.get("limit") or 1000), 100_000))
    lines = await server.store.get_logs(row.id, limit)
    return {"lines": [[line.ts, line.level, line.message] for line in lines]}


async def run_list(server: ApiBackend, app: str, body: dict[str, Any]) -> dict[str, Any]:
    """The run history of a second-level job (sampled: see server/sl_stats.py), newest first."""
    job = await _job_or_404(server, app, body["job"])
    await server.flush_statuses()  # so a caller sees the runs its worker already reported
    limit = max(1, min(int(body.get("limit") or RUN_HISTORY), RUN_HISTORY))
    return {"runs": [to_wire(run) for run in await server.store.list_job_runs(job.id, limit)]}


Handler = Callable[[ApiBackend, str, dict[str, Any]], Awaitable[dict[str, Any]]]

API_HANDLERS: dict[str, Handler] = {
    "JOB_UPSERT": job_upsert,
    "JOB_DELETE": job_delete,
    "JOB_ENABLE": job_enable,
    "JOB_GET": job_get,
    "JOB_LIST": job_list,
    "TRIGGER": trigger,
    "INSTANCE_GET": instance_get,
    "INSTANCE_LIST": instance_list,
    "LOG_GET": log_get,
    "RUN_LIST": run_list,
}
API_TYPES = frozenset(API_HANDLERS)


async def handle_api(server: ApiBackend, app: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    if not server.owns(app):
        raise NotOwnerError(app, -1)
    return await API_HANDLERS[kind](server, app, body)
