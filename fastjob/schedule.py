"""Next fire times for every schedule type: cron, fixed rate, fixed delay, one-shot, api.

All planned times are integer milliseconds since the epoch, the unit of the instance table's
UNIQUE key. croniter does the calendar arithmetic; this module keeps it behind two functions.
"""
from __future__ import annotations

import datetime as dt
import math
import time
import zoneinfo
from typing import Optional

from croniter import croniter

from .store.base import JobRow, JobSpec, NextFire, ScheduleType

Job = JobRow | JobSpec


class ScheduleError(ValueError):
    """A schedule that can never fire: a bad cron string, a non-positive period, a bad time."""


def now_ms() -> int:
    """Wall-clock now in epoch milliseconds, the unit of planned fire times."""
    return int(time.time() * 1000)


def _cron_fields(expr: str) -> int:
    return len(expr.split())


def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleError(f"unknown timezone {name!r}") from exc


def parse_period(expr: str) -> float:
    """The period in seconds of a fixed-rate or fixed-delay job."""
    try:
        period = float(expr)
    except (TypeError, ValueError):
        raise ScheduleError(f"period must be a number of seconds, got {expr!r}") from None
    if not math.isfinite(period) or period <= 0:
        raise ScheduleError(f"period must be a positive number of seconds, got {expr!r}")
    return period


def parse_at(expr: str) -> float:
    """The epoch seconds of a one-shot job: a number, or an ISO 8601 time (naive means UTC)."""
    try:
        return float(expr)
    except (TypeError, ValueError):
        pass
    try:
        when = dt.datetime.fromisoformat(expr)
    except (TypeError, ValueError):
        raise ScheduleError(f"one-shot time must be epoch seconds or ISO 8601, got {expr!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def validate(job: Job) -> None:
    """Raise :class:`ScheduleError` with a clear message if the job's schedule is unusable."""
    kind = ScheduleType(job.schedule_type)
    if kind is ScheduleType.CRON:
        fields = _cron_fields(job.schedule_expr)
        if fields not in (5, 6) or not croniter.is_valid(job.schedule_expr, second_at_beginning=fields == 6):
            raise ScheduleError(
                f"bad cron expression {job.schedule_expr!r}: want 5 fields (min hour dom month dow) "
                "or 6 with seconds first"
            )
        _zone(job.timezone)
    elif kind in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY):
        parse_period(job.schedule_expr)
    elif kind is ScheduleType.ONCE:
        if job.schedule_expr:
            parse_at(job.schedule_expr)
    if job.misfire_policy not in ("fire_once", "skip"):
        raise ScheduleError(f"misfire_policy must be 'fire_once' or 'skip', got {job.misfire_policy!r}")
    if job.routing not in ("round_robin", "random", "least_busy"):
        raise ScheduleError(f"routing must be round_robin, random or least_busy, got {job.routing!r}")
    if job.retry_times < 0 or job.retry_backoff < 0:
        raise ScheduleError("retry_times and retry_backoff must not be negative")
    if job.timeout is not None and not (job.timeout > 0):
        raise ScheduleError(f"timeout must be positive, got {job.timeout!r}")


def cron_after(expr: str, timezone: str, after_ms: int) -> int:
    """The first cron time strictly after ``after_ms``."""
    start = dt.datetime.fromtimestamp(after_ms / 1000.0, _zone(timezone))
    it = croniter(expr, start, second_at_beginning=_cron_fields(expr) == 6)
    return int(round(it.get_next(float) * 1000))


def first_fire_ms(job: Job, now_ms: int) -> Optional[int]:
    """When a new (or re-scheduled) job fires first; None if only an API call fires it."""
    kind = ScheduleType(job.schedule_type)
    if kind is ScheduleType.CRON:
        return cron_after(job.schedule_expr, job.timezone, now_ms)
    if kind in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY):
        return now_ms  # like the seed's interval job: first run at once, then every period
    if kind is ScheduleType.ONCE:
        return int(round(parse_at(job.schedule_expr) * 1000)) if job.schedule_expr else now_ms
    return None


def period_seconds(job: Job) -> Optional[float]:
    """The period of a fixed-rate/fixed-delay job, else None."""
    if ScheduleType(job.schedule_type) in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY):
        return parse_period(job.schedule_expr)
    return None


def make_next_fire(now_ms: int, catch_up_ms: int) -> NextFire:
    """A ``NextFire`` for the store's claim: the fire after ``prev_ms``, skipping a late backlog.

    After downtime a job may be far behind. Only the first late fire is kept (the misfire
    policy then decides whether it runs); later fires resume from ``now - catch_up_ms``,
    so a 10 s job that was down for an hour yields one late row, not 360.
    Fixed delay, one-shot, api and run-once jobs have no next fire here: fixed delay's next
    fire is written when the previous one finishes.
    """
    floor_ms = now_ms - catch_up_ms

    def next_fire(job: JobRow, prev_ms: int) -> Optional[int]:
        if job.run_once:
            return None
        kind = job.schedule_type
        if kind is ScheduleType.FIXED_RATE:
            period_ms = max(1, int(round(parse_period(job.schedule_expr) * 1000)))
            nxt = prev_ms + period_ms
            if nxt < floor_ms:
                nxt += ((floor_ms - nxt) // period_ms + 1) * period_ms
            return nxt
        if kind is ScheduleType.CRON:
            return cron_after(job.schedule_expr, job.timezone, max(prev_ms, floor_ms))
        return None

    return next_fire


def retry_delay(job: Job, attempt: int) -> float:
    """Exponential backoff before attempt ``attempt + 1``: backoff * 2**(attempt-1), capped at 5 min."""
    return min(300.0, job.retry_backoff * (2 ** max(0, attempt - 1)))
