"""Next fire times for every schedule type: cron, fixed rate, fixed delay, one-shot, api.

All planned times are integer milliseconds since the epoch, the unit of the instance table's
UNIQUE key. Cron arithmetic is fastjob.cron's compiled evaluator (croniter is its reference model
in the tests); this module keeps it behind two functions.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
from typing import Any

from . import cron
from .fanout import WORKFLOW_HANDLER, normalize_steps
from .models import MODES, JobRow, JobSpec, Misfire, Overlap, Routing, ScheduleType, check_alarm
from .store.base import FirePlan, FirePlanner, NextFire

Job = JobRow | JobSpec
log = logging.getLogger("fastjob.schedule")


_MISFIRE_POLICIES = tuple(m.value for m in Misfire)
_OVERLAP_POLICIES = tuple(o.value for o in Overlap)
_ROUTINGS = tuple(r.value for r in Routing)


class ScheduleError(ValueError):
    """A schedule that can never fire: a bad cron string, a non-positive period, a bad time."""


def now_ms() -> int:
    """Wall-clock now in epoch milliseconds, the unit of planned fire times."""
    return int(time.time() * 1000)


#: The largest period, timeout, catch-up window or backoff (ten years): larger ones are mistakes,
#: and their milliseconds would overflow the stores' 64-bit columns.
MAX_SECONDS = 10 * 365 * 86400.0
#: The latest one-shot time (epoch seconds, the year 2286).
MAX_AT = 1e10
#: The most retries, and the longest overlap queue, a job may ask for.
MAX_RETRIES = 1000
MAX_QUEUED = 1_000_000


def _cron_fields(expr: str) -> int:
    return len(expr.split())


def parse_period(expr: str) -> float:
    """The period in seconds of a fixed-rate or fixed-delay job."""
    try:
        period = float(expr)
    except (TypeError, ValueError):
        raise ScheduleError(f"period must be a number of seconds, got {expr!r}") from None
    if not math.isfinite(period) or not 0 < period <= MAX_SECONDS:
        raise ScheduleError(f"period must be a positive number of seconds, at most ten years, got {expr!r}")
    return period


def parse_at(expr: str) -> float:
    """The epoch seconds of a one-shot job: a number, or an ISO 8601 time (naive means UTC)."""
    try:
        when = float(expr)
    except (TypeError, ValueError):
        pass
    else:
        if not math.isfinite(when) or not 0 <= when <= MAX_AT:
            raise ScheduleError(f"one-shot time must be epoch seconds from 1970 to 2286, got {expr!r}")
        return when
    try:
        moment = dt.datetime.fromisoformat(expr)
    except (TypeError, ValueError):
        raise ScheduleError(f"one-shot time must be epoch seconds or ISO 8601, got {expr!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    when = moment.timestamp()
    if not 0 <= when <= MAX_AT:
        raise ScheduleError(f"one-shot time must be from 1970 to 2286, got {expr!r}")
    return when


def validate(job: Job) -> None:
    """Raise :class:`ScheduleError` with a clear message if the job's schedule is unusable."""
    kind = ScheduleType(job.schedule_type)
    if kind is ScheduleType.CRON:
        if _cron_fields(job.schedule_expr) not in (5, 6):
            raise ScheduleError(
                f"bad cron expression {job.schedule_expr!r}: want 5 fields (min hour dom month dow) "
                "or 6 with seconds first"
            )
        cron_after(job.schedule_expr, job.timezone, now_ms())  # bad fields, a bad zone, or never fires
    elif kind in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY):
        parse_period(job.schedule_expr)
    elif kind is ScheduleType.ONCE:
        if job.schedule_expr:
            parse_at(job.schedule_expr)
    if kind is not ScheduleType.CRON:  # a cron's zone was checked with it
        try:
            cron.check_timezone(job.timezone)
        except cron.CronError as exc:
            raise ScheduleError(str(exc)) from None
    _validate_policies(job)



def _finite_seconds(name: str, value: Any, zero_ok: bool = False) -> None:
    if not (type(value) in (int, float) and math.isfinite(value) and (0 <= value if zero_ok else 0 < value)
            and value <= MAX_SECONDS):
        raise ScheduleError(f"{name} must be {'zero or more' if zero_ok else 'a positive number of'} seconds,"
                            f" at most ten years, got {value!r}")


def _validate_policies(job: Job) -> None:
    """The job's policies and numbers (its schedule was checked by :func:`validate`)."""
    if job.misfire_policy not in _MISFIRE_POLICIES:
        raise ScheduleError(f"misfire_policy must be one of {', '.join(_MISFIRE_POLICIES)}, got {job.misfire_policy!r}")
    if job.overlap not in _OVERLAP_POLICIES:
        raise ScheduleError(f"overlap must be one of {', '.join(_OVERLAP_POLICIES)}, got {job.overlap!r}")
    _finite_seconds("catch_up_window", job.catch_up_window)
    if not isinstance(job.max_queued, int) or isinstance(job.max_queued, bool) or not 0 <= job.max_queued <= MAX_QUEUED:
        raise ScheduleError(f"max_queued must be a whole number from 0 to {MAX_QUEUED}, got {job.max_queued!r}")
    if job.routing not in _ROUTINGS:
        raise ScheduleError(f"routing must be one of {', '.join(_ROUTINGS)}, got {job.routing!r}")
    if not 0 <= job.retry_times <= MAX_RETRIES:
        raise ScheduleError(f"retries (retry_times) must be from 0 to {MAX_RETRIES}, got {job.retry_times!r}")
    _finite_seconds("retry_backoff", job.retry_backoff, zero_ok=True)
    if job.timeout is not None:
        _finite_seconds("timeout", job.timeout)
    if job.mode not in MODES:
        raise ScheduleError(f"mode must be one of {', '.join(MODES)}, got {job.mode!r}")
    if not (type(job.min_success) in (int, float) and 0 < job.min_success <= 1):  # NaN fails both
        raise ScheduleError(f"min_success must be a fraction above 0 and at most 1, got {job.min_success!r}")
    try:
        check_alarm(job.alarm)
    except ValueError as exc:
        raise ScheduleError(str(exc)) from None
    if job.handler == WORKFLOW_HANDLER:
        _validate_workflow(job)


def _validate_workflow(job: Job) -> None:
    """A workflow's steps (its params) must form a graph: every upstream a step, no cycle."""
    if job.mode != "single":
        raise ScheduleError("a workflow runs in mode 'single' (its steps go to the app's workers)")
    steps = job.params.get("steps") if isinstance(job.params, dict) else None
    try:
        normalize_steps(steps)
    except ValueError as exc:
        raise ScheduleError(f"workflow {job.name!r}: {exc}") from None


def cron_after(expr: str, timezone: str, after_ms: int) -> int:
    """The first cron time strictly after ``after_ms`` (the parsed form is cached)."""
    try:
        return cron.parse(expr, timezone or "UTC").next_after(after_ms)
    except cron.CronError as exc:
        raise ScheduleError(str(exc)) from None


def first_fire_ms(job: Job, now_ms: int) -> int | None:
    """When a new (or re-scheduled) job fires first; None if only an API call fires it."""
    kind = ScheduleType(job.schedule_type)
    if kind is ScheduleType.CRON:
        return cron_after(job.schedule_expr, job.timezone, now_ms)
    if kind in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY):
        return now_ms  # like the seed's interval job: first run at once, then every period
    if kind is ScheduleType.ONCE:
        return int(round(parse_at(job.schedule_expr) * 1000)) if job.schedule_expr else now_ms
    return None


def period_seconds(job: Job) -> float | None:
    """The period of a fixed-rate/fixed-delay job, else None."""
    if ScheduleType(job.schedule_type) in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY):
        return parse_period(job.schedule_expr)
    return None


def next_fire(job: JobRow, prev_ms: int) -> int | None:
    """The planned time after ``prev_ms``, or None when the job has no further fire here:
    one-shot, run-once and api jobs, and fixed delay (its next fire is written when the
    previous one finishes)."""
    if job.run_once:
        return None
    kind = job.schedule_type
    if kind is ScheduleType.FIXED_RATE:
        return prev_ms + max(1, int(round(parse_period(job.schedule_expr) * 1000)))
    if kind is ScheduleType.CRON:
        return cron_after(job.schedule_expr, job.timezone, prev_ms)
    return None


def make_planner(now_ms: int, misfire_threshold_ms: int, following: NextFire = next_fire) -> FirePlanner:
    """A ``FirePlanner`` for the store's claim at ``now_ms``.

    A fire planned more than ``misfire_threshold_ms`` before now was never written to the WAL
    in time (the app had no owner for longer than the scan horizon): its job's misfire policy
    decides, and every missed fire that does not run is planned as ``skipped`` with its reason,
    so that each planned fire gets one final record. Fires written in time always run, subject
    only to their overlap policy; so do a fixed-delay job's late fire (one fire, counted from
    when it can run) and fires of the future.
    """
    missed_before = now_ms - misfire_threshold_ms

    def plan(job: JobRow, horizon_ms: int, budget: int) -> FirePlan:
        t = job.next_trigger_ms
        out = FirePlan()
        if t is not None and t < missed_before and job.schedule_type is not ScheduleType.FIXED_DELAY:
            t = _plan_missed(job, t, missed_before, now_ms, budget, following, out)
            budget -= len(out)
        runs = out.runs
        while t is not None and t <= horizon_ms and budget > 0:  # the hot loop: one step per fire
            runs.append(t)
            budget -= 1
            nxt = _following_or_none(following, job, t)
            if nxt is not None and nxt <= t:
                raise ValueError(f"next fire did not advance for job {job.id}: {t} -> {nxt}")
            t = nxt
        out.next_ms = t
        return out

    return plan


def _following_or_none(following: NextFire, job: JobRow, t: int) -> int | None:
    """The next fire; None (the job stops) if its schedule has no more, so that one job whose cron
    never fires again cannot fail the claim of its whole app."""
    try:
        return following(job, t)
    except ScheduleError as exc:
        log.warning("job %d of app %s: no next fire after %d: %s", job.id, job.app, t, exc)
        return None


def _plan_missed(job: JobRow, t: int | None, missed_before: int, now_ms: int, budget: int,
                 following: NextFire, out: FirePlan) -> int | None:
    """Plan the job's missed fires from ``t`` by its misfire policy; return the first fire not planned."""
    policy = job.misfire_policy
    window_start = now_ms - int(job.catch_up_window * 1000)
    catch_up, skipped = out.catch_up, out.skipped
    while t is not None and t < missed_before and len(catch_up) + len(skipped) < budget:
        nxt = _following_or_none(following, job, t)
        if nxt is not None and nxt <= t:
            raise ValueError(f"next fire did not advance for job {job.id}: {t} -> {nxt}")
        last = nxt is None or nxt >= missed_before
        if policy == Misfire.FIRE_ALL.value:
            if t >= window_start:
                catch_up.append(t)
            else:
                skipped.append((t, f"misfire: older than the catch-up window of {job.catch_up_window:g}s"))
        elif policy == Misfire.FIRE_ONCE.value and last:
            catch_up.append(t)
        elif policy == Misfire.FIRE_ONCE.value:
            skipped.append((t, "misfire: coalesced into the last missed fire (policy fire_once)"))
        else:
            skipped.append((t, "misfire: not run (policy skip)"))
        t = nxt
    return t


def retry_delay(job: Job, attempt: int) -> float:
    """Exponential backoff before attempt ``attempt + 1``: backoff * 2**(attempt-1), capped at 5 min."""
    # a float power (inf past the largest float, not an OverflowError like a huge int would give)
    return min(300.0, job.retry_backoff * 2.0 ** min(max(0, attempt - 1), 1023))


def upcoming_fires(job: Job, count: int, now_ms: int, start_ms: int | None = None) -> list[int]:
    """The job's next ``count`` planned times (ms) from ``start_ms`` (its stored next fire) or, for
    a job not stored yet, from now. A fixed-delay job's are the earliest times (each run's length
    moves the next one)."""
    t = start_ms if start_ms is not None else first_fire_ms(job, now_ms)
    kind = ScheduleType(job.schedule_type)
    out: list[int] = []
    while t is not None and len(out) < count:
        out.append(t)
        if job.run_once or kind in (ScheduleType.ONCE, ScheduleType.API):
            break
        if kind is ScheduleType.CRON:
            t = cron_after(job.schedule_expr, job.timezone, t)
        else:
            t += max(1, int(round(parse_period(job.schedule_expr) * 1000)))
    return out
