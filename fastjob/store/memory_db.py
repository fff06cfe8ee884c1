"""The tables of the in-memory store (store/memory.py), and how rows go in and out of them.

A :class:`MemoryDatabase` holds what the SQL schema's tables hold, as dicts of the model's row
dataclasses, with the SQL tables' keys: the primary keys, UNIQUE (app, name) of jobs and UNIQUE
(job_id, planned_ms, attempt) of instances. Ids count up from 1 per table, like AUTOINCREMENT.

Rows never leave or enter a table by reference. Values travel as a database column would carry
them: JSON values (params, result, tags, stats, a worker's info) are written and read as the SQL
stores' codecs encode them (a tuple comes back a list, a key a string, another object its
``str``), so a caller that mutates a row it got, or the object it passed in, changes nothing
stored; a job's declared fields are stored in the form :func:`~fastjob.store.codecs.spec_values`
gives them (``timeout`` a float, ``schedule_expr`` never None), which is also what
``upsert_job`` compares to decide whether anything changed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..models import InstanceRow, JobRow, JobRun, JobSpec, LogLine, ScheduleType, TaskBatch
from .base import AlarmRow, AppRow, AuditEntry, OwnershipChange, ServerRow, TokenRow, WorkerRow
from .codecs import SPEC_COLS, claim_job, dumps, loads, spec_values

#: Values a JSON column gives back as they went in (and that nobody can mutate).
_SCALARS = (str, int, float, bool)
#: SQL columns of a job derived from others for readers of schema version 1, not in JobRow.
_DERIVED_COLS = ("allow_overlap", "`interval`")


def json_copy(value: Any) -> Any:
    """``value`` as a JSON column of the SQL stores gives it back: a fresh copy."""
    if value is None or type(value) in _SCALARS:
        return value
    return loads(dumps(value))


# ---- jobs ------------------------------------------------------------------------------------
def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The columns ``upsert_job`` writes for ``spec`` (SPEC_COLS), as the SQL stores write them.

    Raises ValueError for a schedule type that does not exist, before anything is written."""
    return dict(zip(SPEC_COLS, spec_values(spec), strict=True))


def stored_spec_of(job: JobRow) -> dict[str, Any]:
    """The SPEC_COLS columns of a stored job, to compare with :func:`stored_spec` of a new spec."""
    return stored_spec(JobSpec(**{f.name: getattr(job, f.name) for f in dataclasses.fields(JobSpec)}))


def spec_fields(stored: dict[str, Any]) -> dict[str, Any]:
    """JobRow's fields from :func:`stored_spec` columns, decoded as ``codecs.row_to_job`` decodes them."""
    out = {col: value for col, value in stored.items() if col not in _DERIVED_COLS}
    out["schedule_type"] = ScheduleType(out["schedule_type"])
    out["params"] = loads(out["params"])
    out["alarm"] = loads(out["alarm"])
    out["tags"] = loads(out["tags"])
    out["run_once"] = bool(out["run_once"])
    out["enabled"] = bool(out["enabled"])
    return out


def copy_job(job: JobRow) -> JobRow:
    return dataclasses.replace(job, params=json_copy(job.params), tags=json_copy(job.tags),
                               stats=json_copy(job.stats))


def planner_view(job: JobRow) -> JobRow:
    """What ``claim_due`` shows its FirePlanner of a due job: the SQL stores' view, built by the
    same codec from a row of the columns they read (CLAIM_COLS), placeholders elsewhere."""
    return claim_job(job.app, (job.id, job.schedule_type.value, job.schedule_expr, job.timezone, int(job.run_once),
                               job.next_trigger_ms, job.version, job.misfire_policy, job.catch_up_window))


# ---- the other rows ------------------------------------------------------------------------------
def copy_instance(row: InstanceRow) -> InstanceRow:
    return dataclasses.replace(row, params=json_copy(row.params), result=json_copy(row.result))


def copy_run(run: JobRun, run_id: int | None = None) -> JobRun:
    """``run`` as stored (under ``run_id``, if given) or read back: a fresh copy."""
    return dataclasses.replace(run, id=run.id if run_id is None else run_id, logs=json_copy(run.logs) or [])


def copy_worker(row: WorkerRow) -> WorkerRow:
    return dataclasses.replace(row, info=json_copy(row.info))


def copy_log(line: LogLine) -> LogLine:
    return LogLine(int(line.instance_id), float(line.ts), line.level, line.message)


def copy_app(row: AppRow) -> AppRow:
    return dataclasses.replace(row)


def copy_server(row: ServerRow) -> ServerRow:
    return dataclasses.replace(row)


@dataclass(slots=True)
class OutboxEntry:
    """An alarm in the outbox, with what the SQL table keeps beside it."""

    row: AlarmRow
    claimed_until: float = 0.0
    claimed_by: str | None = None
    delivered_at: float | None = None
    last_error: str | None = None


# ---- the tables ----------------------------------------------------------------------------------
@dataclass(eq=False)
class MemoryDatabase:
    """Every table of one in-memory database. Only the store's methods touch it, each in one
    synchronous step (see store/memory.py)."""

    servers: dict[str, ServerRow] = field(default_factory=dict)
    apps: dict[str, AppRow] = field(default_factory=dict)
    workers: dict[tuple[str, str], WorkerRow] = field(default_factory=dict)  # (app, worker_id)
    jobs: dict[int, JobRow] = field(default_factory=dict)  # by id, in id order
    job_ids: dict[tuple[str, str], int] = field(default_factory=dict)  # UNIQUE (app, name), deleted jobs too
    instances: dict[int, InstanceRow] = field(default_factory=dict)  # by id, in id order
    fire_ids: dict[tuple[int, int, int], int] = field(default_factory=dict)  # UNIQUE (job_id, planned_ms, attempt)
    logs: dict[int, list[LogLine]] = field(default_factory=dict)  # by instance id, in the order written
    runs: dict[int, list[JobRun]] = field(default_factory=dict)  # by job id, in the order written
    tokens: dict[str, TokenRow] = field(default_factory=dict)  # by token id
    audit: list[AuditEntry] = field(default_factory=list)  # in id order
    history: list[OwnershipChange] = field(default_factory=list)  # in id order
    last_audit_id: int = 0
    last_history_id: int = 0
    outbox: dict[int, OutboxEntry] = field(default_factory=dict)  # by id
    outbox_keys: dict[tuple[str, str], int] = field(default_factory=dict)  # UNIQUE (event_id, webhook)
    last_alarm_id: int = 0
    idempotency: dict[tuple[str, str], tuple[int | None, float]] = field(default_factory=dict)  # (instance, at)
    last_run_id: int = 0
    last_job_id: int = 0
    last_instance_id: int = 0
    tasks: dict[str, TaskBatch] = field(default_factory=dict)  # by key, in the order written

    def add_job(self, job: JobRow) -> JobRow:
        """Store a new job (its (app, name) must be free) under the next id."""
        self.last_job_id += 1
        job.id = self.last_job_id
        self.jobs[job.id] = job
        self.job_ids[(job.app, job.name)] = job.id
        return job

    def job_named(self, app: str, name: str) -> JobRow | None:
        """The job of that app and name, logically deleted or not."""
        job_id = self.job_ids.get((app, name))
        return None if job_id is None else self.jobs[job_id]

    def live_job(self, app: str, name: str) -> JobRow | None:
        job = self.job_named(app, name)
        return None if job is None or job.is_delete else job

    def add_instance(self, row: InstanceRow) -> InstanceRow | None:
        """INSERT … ON CONFLICT DO NOTHING: store ``row`` under the next id and return it, or
        return None if its (job_id, planned_ms, attempt) is already recorded."""
        key = (row.job_id, row.planned_ms, row.attempt)
        if key in self.fire_ids:
            return None
        self.last_instance_id += 1
        row.id = self.last_instance_id
        self.instances[row.id] = row
        self.fire_ids[key] = row.id
        return row

    def fire(self, job_id: int, planned_ms: int, attempt: int) -> InstanceRow | None:
        """The instance recorded under that UNIQUE key, or None."""
        instance_id = self.fire_ids.get((job_id, planned_ms, attempt))
        return None if instance_id is None else self.instances[instance_id]
