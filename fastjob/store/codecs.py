"""Rows as the SQL stores write and read them: column lists, row codecs, the status ranks
that order a batch of updates, and the JSON of stored values."""
from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

from ..models import (
    FINAL_STATUSES,
    JOB_DEFAULTS,
    SCHEDULE_TYPES,
    UNFINISHED_STATUSES,
    InstanceRow,
    InstanceUpdate,
    JobRow,
    JobSpec,
    Overlap,
    ScheduleType,
    Status,
)

#: Attempt number of a first fire; a retry writes attempt + 1 with the same planned time.
FIRST_ATTEMPT = 1


# ---- JSON / row codecs -----------------------------------------------------------------
#: json.dumps with these options builds a new encoder per call; one, bound, serves every row
_encode = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> str | None:
    """JSON text for a params/result/tags/stats column; None stays NULL."""
    if value is None:
        return None
    return _encode(value)


def json_ints(rows: Sequence[Sequence[int | None]]) -> str:
    """A JSON array of arrays of integers (or null), for Dialect.json_rel."""
    return json.dumps(rows, separators=(",", ":"))


def loads(text: str | None) -> Any:
    if text is None:
        return None
    return json.loads(text)


JOB_COLS = (
    "id, app, name, handler, schedule_type, schedule_expr, timezone, params, timeout, retry_times,"
    " retry_backoff, misfire_policy, tags, routing, run_once, enabled, overlap, catch_up_window, max_queued,"
    " next_trigger_ms, created_time, updated_time, last_finished_time, is_delete, version, stats, origin, paused_by,"
    " anchor_ms, alarm, mode, min_success"
)

# What claim_due reads of a due job: the fields a FirePlanner uses (schedule_type, schedule_expr,
# timezone, run_once, misfire_policy, catch_up_window) and those it needs itself. Reading and
# decoding all the columns of 10k jobs was most of a claim's time (pure-Python row parsing on
# MySQL, JSON decoding on SQLite).
CLAIM_COLS = ("id, schedule_type, schedule_expr, timezone, run_once, next_trigger_ms, version, misfire_policy,"
              " catch_up_window")
DUE_ORDER = operator.itemgetter(5, 0)  # (next_trigger_ms, id) of a CLAIM_COLS row

INST_COLS = (
    "id, job_id, app, planned_ms, attempt, status, trigger_kind, params, server, epoch, worker,"
    " created_at, dispatched_at, started_at, finished_at, result, error, reruns"
)
# Columns written when an instance is created (the rest start NULL).
INST_INSERT_COLS = (
    "job_id", "app", "planned_ms", "attempt", "status", "trigger_kind", "params", "server",
    "epoch", "created_at", "reruns",
)
# A fire recorded skipped by a claim (misfire policy): final at once, with its reason.
SKIPPED_COLS = ("job_id", "planned_ms", "error", "app", "attempt", "status", "trigger_kind", "server", "epoch",
                 "created_at", "finished_at")
# How claim_due writes them: per fire, and shared by every fire of the claim.
FIRE_COLS = ("job_id", "planned_ms")
SHARED_COLS = ("app", "attempt", "status", "trigger_kind", "params", "server", "epoch", "created_at")
# Columns upsert_job writes from a JobSpec (plus `interval`, derived).
SPEC_COLS = (
    "handler", "schedule_type", "schedule_expr", "timezone", "params", "timeout", "retry_times",
    "retry_backoff", "misfire_policy", "tags", "routing", "run_once", "enabled", "allow_overlap",
    "`interval`", "overlap", "catch_up_window", "max_queued", "alarm", "mode", "min_success",
)
#: The SPEC_COLS added after digests existed (the last ones): a job that leaves them at the model's
#: defaults keeps the digest it was stored with before they existed (nothing is rewritten at an upgrade).
LATER_COLS = ("alarm", "mode", "min_success")
assert SPEC_COLS[-len(LATER_COLS):] == LATER_COLS


_STATUSES = {t.value: t for t in Status}
#: json.loads, bound once (the row codecs call it per row)
load_json = json.loads


# The converters run once per claimed job / written row, so they are kept lean: positional
# dataclass construction, dict lookups instead of Enum(value), and JSON decoding skipped for
# NULL and the common empty values.
def row_to_job(r: Sequence[Any]) -> JobRow:
    tags = r[12]
    return JobRow(
        r[0], r[1], r[2], r[3], SCHEDULE_TYPES[r[4]], r[5], r[6],
        None if r[7] is None else load_json(r[7]), r[8], r[9], float(r[10]), r[11],
        [] if tags is None or tags == "[]" else load_json(tags), r[13], bool(r[14]), bool(r[15]),
        r[16], float(r[17]), int(r[18]), r[19], r[20], r[21], r[22], bool(r[23]), r[24],
        None if r[25] is None else load_json(r[25]), r[26], r[27], r[28], None if r[29] is None else load_json(r[29]),
        r[30], float(r[31]),
    )


def claim_job(app: str, r: Sequence[Any]) -> JobRow:
    """A JobRow from a CLAIM_COLS row, for ``next_fire``: the fields not read hold the
    placeholders that Store.claim_due documents (never the job's real values)."""
    return JobRow(
        r[0], app, "", "", SCHEDULE_TYPES[r[1]], r[2], r[3], None, None, 0, 1.0, r[7], [],
        "round_robin", bool(r[4]), True, "queue", float(r[8]), 0, r[5], 0.0, 0.0, None, False, r[6],
    )


def row_to_instance(r: Sequence[Any]) -> InstanceRow:
    return InstanceRow(
        r[0], r[1], r[2], r[3], r[4], _STATUSES[r[5]], r[6], None if r[7] is None else load_json(r[7]),
        r[8], r[9], r[10], r[11], r[12], r[13], r[14], None if r[15] is None else load_json(r[15]), r[16],
        r[17],
    )


def spec_values(spec: JobSpec) -> tuple[Any, ...]:
    """The stored form of a spec's columns, in SPEC_COLS order (comparable with a row)."""
    st = SCHEDULE_TYPES.get(spec.schedule_type) or ScheduleType(spec.schedule_type)  # str or member
    interval = spec.schedule_expr if st in (ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY) else None
    return (
        spec.handler, st.value, spec.schedule_expr or "", spec.timezone, dumps(spec.params),
        None if spec.timeout is None else float(spec.timeout), int(spec.retry_times),
        float(spec.retry_backoff), spec.misfire_policy, _encode(list(spec.tags)) if spec.tags else "[]", spec.routing,
        int(bool(spec.run_once)), int(bool(spec.enabled)), int(spec.overlap == Overlap.ALLOW.value), interval,
        spec.overlap, float(spec.catch_up_window), int(spec.max_queued),
        None if spec.alarm is None else json.dumps(spec.alarm, sort_keys=True, separators=(",", ":")),
        spec.mode, float(spec.min_success),
    )


#: Position of ``enabled`` in SPEC_COLS.
ENABLED = SPEC_COLS.index("enabled")
#: The stored LATER_COLS of a job that leaves them at the model's defaults.
_UNUSED = spec_values(JOB_DEFAULTS)[-len(LATER_COLS):]


def spec_digest(values: tuple[Any, ...]) -> str:
    """A digest of a job's definition (``spec_values`` but ``enabled``, which has its own rules):
    stored with the job, so that re-declaring 100,000 unchanged jobs reads 8 columns, not 30."""
    definition = values[:ENABLED] + values[ENABLED + 1:]
    later = len(_UNUSED)
    while later and definition[-1] == _UNUSED[later - 1]:  # unused: the digest of before the column existed
        definition = definition[:-1]
        later -= 1
    return hashlib.blake2b(msgpack.packb(definition), digest_size=12).hexdigest()  # packb: 3x faster than repr


# Rank used to keep status updates monotonic; every final status has the top rank.
_RANK = {Status.WAITING: 0, Status.QUEUED: 1, Status.DISPATCHED: 2, Status.RUNNING: 3}
_FINAL_RANK = len(_RANK)
assert set(_RANK) == UNFINISHED_STATUSES
#: SQL: the rank of the stored status of an unfinished instance, and the unfinished statuses
SQL_RANK = "(CASE instances.status " + " ".join(f"WHEN '{s.value}' THEN {r}" for s, r in _RANK.items()) + " END)"
SQL_UNFINISHED = "(" + ", ".join(f"'{s.value}'" for s in _RANK) + ")"
SQL_FINAL = "(" + ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATUSES, key=lambda s: s.value)) + ")"


def rank(status: Status) -> int:
    return _RANK.get(status, _FINAL_RANK)


def merge_updates(updates: Iterable[InstanceUpdate]) -> list[InstanceUpdate]:
    """Collapse several updates of one instance into one, as if applied in order.

    A multi-row UPDATE … JOIN may apply only one source row per target row, so the batch is
    reduced first: the furthest status wins, a first final status is never replaced, and
    fields given by earlier updates are kept unless a later applied one gives them too.
    """
    merged: dict[int, InstanceUpdate] = {}
    for u in updates:
        u = InstanceUpdate(u.id, Status(u.status), u.worker, u.dispatched_at, u.started_at,
                           u.finished_at, u.result, u.error)
        cur = merged.get(u.id)
        if cur is None:
            merged[u.id] = u
            continue
        if cur.status in FINAL_STATUSES or rank(u.status) <= rank(cur.status):
            continue  # stale or duplicate report: the database would ignore it too
        for f in ("worker", "dispatched_at", "started_at", "finished_at", "result", "error"):
            if getattr(u, f) is None:
                setattr(u, f, getattr(cur, f))
        merged[u.id] = u
    return list(merged.values())


def differs(old: Any, new: Any) -> bool:
    """Column comparison tolerant of driver types (1 vs True, 5 vs 5.0)."""
    if old is None or new is None:
        return old is not new
    if isinstance(new, (int, float)) and isinstance(old, (int, float)):
        return float(old) != float(new)
    return bool(old != new)
