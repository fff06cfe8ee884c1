"""A job as its users write it: the keyword arguments of ``Worker.schedule``, which are also the
JSON fields of the admin API, the CLI and the console. One model: :func:`build_spec` turns them
into the stored :class:`~fastjob.models.JobSpec` for every one of them, :func:`job_fields` turns
a stored job back into them.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from . import schedule
from .models import JOB_DEFAULTS, JobRow, JobSpec, Overlap, ScheduleType

_DEFAULT = JOB_DEFAULTS

#: The keywords that choose a schedule; at most one may be given (none: API-triggered or run_once).
SCHEDULE_KEYS = ("interval", "delay", "cron", "at")
_NUMBER = (int, float)
#: Each field a job definition may carry in JSON, with the types its value may have.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "handler": (str, type(None)),
    "interval": (*_NUMBER, type(None)),
    "delay": (*_NUMBER, type(None)),
    "cron": (str, type(None)),
    "at": (*_NUMBER, str, type(None)),
    "run_once": (bool,),
    "retries": (int,),
    "retry_backoff": _NUMBER,
    "timeout": (*_NUMBER, type(None)),
    "params": (object,),
    "timezone": (str,),
    "misfire": (str,),
    "catch_up_window": _NUMBER,
    "tags": (list,),
    "routing": (str,),
    "overlap": (str, type(None)),
    "max_queued": (int,),
    "enabled": (bool,),
    "alarm": (dict, type(None)),
    "mode": (str,),
    "min_success": _NUMBER,
}
#: Longest job name (the stores' key column).
MAX_NAME = 190


def build_spec(
    app: str,
    name: str,
    *,
    handler: str | None = None,
    interval: float | None = None,
    delay: float | None = None,
    cron: str | None = None,
    at: dt.datetime | float | str | None = None,
    run_once: bool = _DEFAULT.run_once,
    retries: int = _DEFAULT.retry_times,
    retry_backoff: float = _DEFAULT.retry_backoff,
    timeout: float | None = _DEFAULT.timeout,
    params: Any = _DEFAULT.params,
    timezone: str = _DEFAULT.timezone,
    misfire: str = _DEFAULT.misfire_policy,
    catch_up_window: float = _DEFAULT.catch_up_window,
    tags: Iterable[str] = (),
    routing: str = _DEFAULT.routing,
    overlap: str | None = None,
    max_queued: int = _DEFAULT.max_queued,
    enabled: bool = _DEFAULT.enabled,
    alarm: dict[str, Any] | None = None,
    mode: str = _DEFAULT.mode,
    min_success: float = _DEFAULT.min_success,
    allow_overlap: bool | None = None,
) -> JobSpec:
    """The JobSpec of a job definition, checked (ScheduleError naming the job if it is bad)."""
    if not name or len(name) > MAX_NAME:
        raise schedule.ScheduleError(f"a job name is 1 to {MAX_NAME} characters, got {len(name)}")
    given = [key for key, value in zip(SCHEDULE_KEYS, (interval, delay, cron, at), strict=True) if value is not None]
    if len(given) > 1:
        raise schedule.ScheduleError(f"job {name!r}: give only one of interval, delay, cron, at"
                                     f" (got {', '.join(given)})")
    if interval is not None:
        kind, expr = ScheduleType.FIXED_RATE, repr(float(interval))
    elif delay is not None:
        kind, expr = ScheduleType.FIXED_DELAY, repr(float(delay))
    elif cron is not None:
        kind, expr = ScheduleType.CRON, cron
    elif at is not None:
        kind, expr = ScheduleType.ONCE, repr(_one_shot_time(name, at))
    elif run_once:
        kind, expr = ScheduleType.ONCE, ""
    else:
        kind, expr = ScheduleType.API, ""
    spec = JobSpec(
        app=app, name=name, handler=handler or name, schedule_type=kind, schedule_expr=expr,
        timezone=timezone, params=params, timeout=None if timeout is None else float(timeout), retry_times=retries,
        retry_backoff=float(retry_backoff), misfire_policy=misfire, tags=[str(tag) for tag in tags], routing=routing,
        run_once=run_once, enabled=enabled, overlap=overlap or _overlap_of(allow_overlap),
        catch_up_window=float(catch_up_window), max_queued=max_queued, alarm=alarm, mode=mode,
        min_success=min_success,
    )
    try:
        schedule.validate(spec)
    except schedule.ScheduleError as exc:
        raise schedule.ScheduleError(f"job {name!r}: {exc}") from None
    return spec


def spec_from_json(app: str, body: Any, name: str | None = None) -> JobSpec:
    """A JSON job definition (``name`` from the URL, if given) as a JobSpec; a ScheduleError that
    names the first bad field otherwise."""
    if not isinstance(body, dict):
        raise schedule.ScheduleError("a job definition is a JSON object")
    unknown = sorted(set(body) - set(FIELD_TYPES))
    if unknown:
        raise schedule.ScheduleError(f"unknown job field {unknown[0]!r}; known: {', '.join(FIELD_TYPES)}")
    fields = dict(body)
    if name is not None:
        if fields.setdefault("name", name) != name:
            raise schedule.ScheduleError(f"the body names job {fields['name']!r}, the URL {name!r}")
    if not isinstance(fields.get("name"), str):
        raise schedule.ScheduleError("job field 'name' is required (a string)")
    for key, value in fields.items():
        kinds = FIELD_TYPES[key]
        if object not in kinds and (not isinstance(value, kinds) or (type(value) is bool and bool not in kinds)):
            raise schedule.ScheduleError(f"job field {key!r} has the wrong type {type(value).__name__}")
    if not all(isinstance(tag, str) for tag in fields.get("tags", ())):
        raise schedule.ScheduleError("job field 'tags' must be a list of strings")
    job_name = fields.pop("name")
    return build_spec(app, job_name, **fields)


def job_fields(job: JobSpec | JobRow) -> dict[str, Any]:
    """A job's definition in build_spec's keywords (the inverse of :func:`build_spec`)."""
    out: dict[str, Any] = {"name": job.name, "handler": job.handler}
    kind, expr = job.schedule_type, job.schedule_expr
    if kind is ScheduleType.FIXED_RATE:
        out["interval"] = float(expr)
    elif kind is ScheduleType.FIXED_DELAY:
        out["delay"] = float(expr)
    elif kind is ScheduleType.CRON:
        out["cron"] = expr
    elif kind is ScheduleType.ONCE and expr:
        out["at"] = float(expr)
    out.update(run_once=job.run_once, retries=job.retry_times, retry_backoff=job.retry_backoff, timeout=job.timeout,
               params=job.params, timezone=job.timezone, misfire=job.misfire_policy,
               catch_up_window=job.catch_up_window, tags=list(job.tags), routing=job.routing, overlap=job.overlap,
               max_queued=job.max_queued, enabled=job.enabled, alarm=job.alarm, mode=job.mode,
               min_success=job.min_success)
    return out


def _one_shot_time(name: str, at: dt.datetime | float | str) -> float:
    """``at=`` as epoch seconds: a datetime (naive: local time), epoch seconds, or an ISO 8601 string
    (naive: UTC), as the server reads it; a ScheduleError naming the job otherwise."""
    try:
        if isinstance(at, dt.datetime):
            return at.timestamp()
        if isinstance(at, str):
            return schedule.parse_at(at)
        return float(at)
    except (TypeError, ValueError) as exc:
        raise schedule.ScheduleError(f"job {name!r}: at= {exc}") from None


def _overlap_of(allow_overlap: bool | None) -> str:
    return str((Overlap.ALLOW if allow_overlap else Overlap.QUEUE).value)
