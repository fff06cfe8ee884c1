"""In-process store: the whole :class:`~fastjob.store.base.Store` contract on Python dicts.

For fast rule tests of the scheduler (in the spirit of APScheduler 4's MemoryDataStore), not
for production: nothing survives the process. ``memory://`` (see ``create_store``) builds a
store with a private database of its own; ``memory://NAME`` one on the database registered under
NAME in this process (created by the first store that names it), so that several stores (two
servers of a test, a server and its restarted successor) share state the way stores on one SQL
database do. A named database lives until :func:`drop_database` forgets it, or the process ends.

Behaviour follows the SQL stores (store/sql.py): the same fencing, compare-and-set claims,
monotonic status updates, UNIQUE keys, orderings and limits; rows are copied in and out as a
database would (store/memory_db.py). What a database does for a transaction, the event loop
does here: every method yields to the loop once when called (a database round trip would),
then reads and writes in ONE synchronous step, never awaiting between a check and its write. A
database is therefore for one event loop (one thread), and needs no locks. There is no
connection: no transient error, no retry, no lost reply and no session to end; a store that
is not open answers :class:`~fastjob.store.base.StoreError` like the SQL stores. No clock is
read: every time stored is a caller's ``now``, and the SQL stores' one wall-clock column
(``apps.updated_at``, written by claims and fences) is in no row the contract returns, so it is
not kept.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, TypeVar

from ..models import (
    FINAL_STATUSES,
    FINAL_TASK_STATUSES,
    RUN_HISTORY,
    InstanceRow,
    InstanceUpdate,
    JobRow,
    JobRun,
    JobSpec,
    LogLine,
    Origin,
    PausedBy,
    ScheduleType,
    Status,
    TaskBatch,
)
from .base import (
    IDEMPOTENCY_TTL,
    AlarmRow,
    AppRow,
    AuditEntry,
    FirePlanner,
    NotOwnerError,
    OwnershipChange,
    ServerRow,
    Store,
    StoreError,
    TokenRow,
    WorkerRow,
)
from .codecs import FIRST_ATTEMPT, SPEC_COLS, merge_updates, rank, spec_values
from .job_writes import StoredJob, plan_write
from .memory_db import (
    MemoryDatabase,
    OutboxEntry,
    copy_app,
    copy_instance,
    copy_job,
    copy_log,
    copy_run,
    copy_server,
    copy_worker,
    json_copy,
    planner_view,
    spec_fields,
    stored_spec_of,
)

#: The databases of ``memory://NAME`` URLs in this process, by NAME.
_NAMED: dict[str, MemoryDatabase] = {}


def drop_database(name: str) -> None:
    """Forget the database named ``name``: the next store built on ``memory://NAME`` starts empty
    (stores already built on it keep theirs). For tests that reuse names."""
    _NAMED.pop(name, None)


class MemoryStore(Store):
    """A store on a :class:`MemoryDatabase`: private, or shared by name (see the module docstring)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self._database = MemoryDatabase() if name is None else _NAMED.setdefault(name, MemoryDatabase())
        self._open = False

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """``memory://`` (a private database) or ``memory://NAME`` (the process's database NAME)."""
        if not url.startswith("memory://"):
            raise ValueError(f"bad memory URL {url!r}: use memory:// or memory://NAME")
        name = url[len("memory://"):]
        if any(c in name for c in "/?#"):
            raise ValueError(f"bad memory URL {url!r}: a NAME has no '/', '?' or '#' (and there are no options)")
        return cls(name or None)

    async def _db(self) -> MemoryDatabase:
        """Yield to the event loop (a method's one suspension), then the database if open."""
        await asyncio.sleep(0)
        if not self._open:
            raise StoreError("memory store is not open")
        return self._database

    # ---- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        """Start answering. There is no schema, so nothing to migrate. Idempotent."""
        self._open = True

    async def close(self) -> None:
        """Stop answering (StoreError until opened again); the data stays. Safe to call twice."""
        self._open = False

    # ---- cluster membership ------------------------------------------------------------
    async def register_server(self, server_id: str, address: str, now: float, http_address: str = "") -> None:
        """Insert or refresh the row; a refresh keeps its load and drain request (as SQL's upsert does)."""
        db = await self._db()
        row = db.servers.get(server_id)
        if row is None:
            db.servers[server_id] = ServerRow(server_id, address, float(now), float(now), http_address=http_address)
        else:
            row.address, row.started_at, row.heartbeat_at = address, float(now), float(now)
            row.http_address = http_address

    async def heartbeat_server(self, server_id: str, now: float, load: float = 0.0) -> bool:
        db = await self._db()
        row = db.servers.get(server_id)
        if row is None:
            return False
        row.heartbeat_at, row.load_score = float(now), float(load)
        return True

    async def set_server_drain(self, server_id: str, drain: bool) -> bool:
        db = await self._db()
        row = db.servers.get(server_id)
        if row is None:
            return False
        row.drain = bool(drain)
        return True

    async def list_servers(self) -> list[ServerRow]:
        db = await self._db()
        return [copy_server(db.servers[k]) for k in sorted(db.servers)]

    async def remove_server(self, server_id: str) -> None:
        db = await self._db()
        db.servers.pop(server_id, None)

    async def fence_server(self, server_id: str) -> int:
        """No-op: there are no database sessions, and nothing a frozen server could hold (a call
        runs to completion in one step). Always 0."""
        return 0

    # ---- app ownership -------------------------------------------------------------------
    @staticmethod
    def _app_row(db: MemoryDatabase, app: str) -> AppRow:
        """The app's row, inserted unowned at epoch 0 if missing. ``adopted`` starts true: the
        SQL column's default (an app nobody was handed is not awaiting anyone)."""
        row = db.apps.get(app)
        if row is None:
            row = db.apps[app] = AppRow(app, None, 0, adopted=True)
        return row

    async def ensure_app(self, app: str) -> AppRow:
        db = await self._db()
        return copy_app(self._app_row(db, app))

    async def get_app(self, app: str) -> AppRow | None:
        db = await self._db()
        row = db.apps.get(app)
        return None if row is None else copy_app(row)

    async def list_apps(self) -> list[AppRow]:
        db = await self._db()
        return [copy_app(db.apps[k]) for k in sorted(db.apps)]

    async def claim_app(self, app: str, server_id: str, seen_epoch: int, *, prev_owner: str | None = None,
                        left_clean: bool = False, adopted: bool = True) -> int | None:
        db = await self._db()
        row = db.apps.get(app)
        if row is None or row.epoch != seen_epoch:
            return None
        row.owner, row.prev_owner, row.left_clean, row.adopted = server_id, prev_owner, bool(left_clean), bool(adopted)
        row.epoch += 1
        return row.epoch

    async def release_apps(self, server_id: str, apps: Sequence[str] | None = None) -> list[str]:
        """Release in name order; returns the names released, in that order."""
        db = await self._db()
        released: list[str] = []
        for name in sorted(db.apps):
            row = db.apps[name]
            if row.owner != server_id or (apps is not None and name not in apps):
                continue
            row.owner, row.prev_owner, row.left_clean, row.adopted = None, server_id, True, False
            row.epoch += 1
            released.append(name)
        return released

    @staticmethod
    def _fence(db: MemoryDatabase, server_id: str, app: str, epoch: int) -> None:
        """Raise NotOwnerError unless ``server_id`` owns ``app`` at ``epoch``."""
        row = db.apps.get(app)
        if row is None or row.owner != server_id or row.epoch != epoch:
            raise NotOwnerError(app, epoch)

    # ---- worker registry ------------------------------------------------------------------
    async def register_worker(self, app: str, worker_id: str, server_id: str, now: float, info: Any) -> None:
        db = await self._db()
        db.workers[(app, worker_id)] = WorkerRow(app, worker_id, server_id, float(now), json_copy(info))

    async def unregister_worker(self, app: str, worker_id: str, server_id: str) -> None:
        db = await self._db()
        row = db.workers.get((app, worker_id))
        if row is not None and row.server == server_id:
            del db.workers[(app, worker_id)]

    async def list_workers(self, app: str, server_id: str | None = None) -> list[WorkerRow]:
        """By worker id."""
        db = await self._db()
        rows = [w for (a, _), w in db.workers.items() if a == app and (server_id is None or w.server == server_id)]
        return [copy_worker(w) for w in sorted(rows, key=lambda w: w.worker_id)]

    async def set_app_token(self, app: str, token_hash: str | None) -> None:
        db = await self._db()
        self._app_row(db, app).token_hash = token_hash

    # ---- jobs --------------------------------------------------------------------------
    async def upsert_job(self, spec: JobSpec, next_trigger_ms: int | None, now: float) -> JobRow:
        db = await self._db()
        self._declare(db, spec.app, [spec], Origin.API, lambda _: next_trigger_ms, now)
        job = db.job_named(spec.app, spec.name)
        assert job is not None
        return copy_job(job)

    async def declare_jobs(self, app: str, specs: Sequence[JobSpec], first_fire: Callable[[JobSpec], int | None],
                           now: float) -> list[JobRow]:
        db = await self._db()
        return [copy_job(job) for job in self._declare(db, app, specs, Origin.CODE, first_fire, now)]

    @staticmethod
    def _declare(db: MemoryDatabase, app: str, specs: Sequence[JobSpec], origin: Origin,
                 first_fire: Callable[[JobSpec], int | None], now: float) -> list[JobRow]:
        """The rules of store/job_writes.py, as the SQL stores apply them ("changed" is judged on
        the stored form of each declared field: 5 and 5.0 are no change)."""
        # raises ValueError for a schedule type that does not exist, before any write
        declared = [(spec, spec_values(spec)) for spec in specs]
        written = []
        for spec, values in declared:
            job = db.job_named(app, spec.name)
            old = None if job is None else StoredJob(job.id, job.version, job.is_delete, job.origin, job.paused_by,
                                                     tuple(stored_spec_of(job).values()))
            write = plan_write(old, values, origin)
            if write is None:
                continue
            next_ms = first_fire(spec) if write.new_next else None
            fields = spec_fields(dict(zip(SPEC_COLS, write.values, strict=True)))
            if job is None:
                job = db.add_job(JobRow(
                    0, app, spec.name, **fields, next_trigger_ms=None if next_ms is None else int(next_ms),
                    created_time=float(now), updated_time=float(now), last_finished_time=None, is_delete=False,
                    version=1, origin=write.origin, paused_by=write.paused_by, anchor_ms=int(now * 1000)))
            else:
                for name, value in fields.items():
                    setattr(job, name, value)
                if write.new_next:
                    job.next_trigger_ms = None if next_ms is None else int(next_ms)
                    job.anchor_ms = int(now * 1000)
                job.origin, job.paused_by, job.is_delete = write.origin, write.paused_by, False
                job.updated_time = float(now)
                job.version += 1
            written.append(job)
        return written

    async def pause_jobs(self, app: str, names: Sequence[str], paused_by: PausedBy, now: float) -> list[JobRow]:
        return self._flip(await self._db(), app, names, paused_by, now, enable=False)

    async def resume_jobs(self, app: str, names: Sequence[str], paused_by: PausedBy, now: float) -> list[JobRow]:
        return self._flip(await self._db(), app, names, paused_by, now, enable=True)

    @staticmethod
    def _flip(db: MemoryDatabase, app: str, names: Sequence[str], paused_by: PausedBy, now: float, *,
              enable: bool) -> list[JobRow]:
        """As the SQL stores' _op_flip_jobs: pause enabled jobs, or resume those paused for ``paused_by``."""
        flipped = []
        for name in names:
            job = db.live_job(app, name)
            if job is None or job.enabled == enable or (enable and job.paused_by != paused_by.value):
                continue
            job.enabled, job.paused_by, job.updated_time = enable, None if enable else paused_by.value, float(now)
            job.version += 1
            flipped.append(copy_job(job))
        return flipped

    async def get_job(self, job_id: int) -> JobRow | None:
        db = await self._db()
        job = db.jobs.get(job_id)
        return None if job is None else copy_job(job)

    async def get_job_by_name(self, app: str, name: str) -> JobRow | None:
        db = await self._db()
        job = db.live_job(app, name)
        return None if job is None else copy_job(job)

    async def list_jobs(self, app: str) -> list[JobRow]:
        db = await self._db()
        jobs = [j for j in db.jobs.values() if j.app == app and not j.is_delete]
        return [copy_job(j) for j in sorted(jobs, key=lambda j: j.name)]

    async def delete_job(self, app: str, name: str, now: float) -> bool:
        db = await self._db()
        job = db.live_job(app, name)
        if job is None:
            return False
        job.is_delete, job.enabled, job.next_trigger_ms = True, False, None
        job.updated_time = float(now)
        job.version += 1
        return True

    async def set_job_enabled(self, app: str, name: str, enabled: bool, next_trigger_ms: int | None,
                              now: float) -> bool:
        db = await self._db()
        job = db.live_job(app, name)
        if job is None:
            return False
        job.enabled = bool(enabled)
        job.paused_by = None if enabled else PausedBy.OPERATOR.value
        job.next_trigger_ms = None if next_trigger_ms is None else int(next_trigger_ms)
        if enabled:
            job.anchor_ms = int(now * 1000)
        job.updated_time = float(now)
        job.version += 1
        return True

    async def set_next_trigger(self, server_id: str, app: str, epoch: int, job_id: int,
                               next_trigger_ms: int | None) -> None:
        """Fenced. Like SQL's, it touches a job of that app whatever its state, and bumps no version."""
        db = await self._db()
        self._fence(db, server_id, app, epoch)
        job = db.jobs.get(job_id)
        if job is not None and job.app == app:
            job.next_trigger_ms = None if next_trigger_ms is None else int(next_trigger_ms)

    async def mark_job_finished(self, job_id: int, finished_at: float) -> None:
        db = await self._db()
        job = db.jobs.get(job_id)
        if job is not None:
            job.last_finished_time = float(finished_at)

    async def set_job_stats(self, job_id: int, stats: Any, now: float) -> None:
        """``updated_time`` tracks the job's definition, so a report leaves it alone (as in SQL)."""
        db = await self._db()
        job = db.jobs.get(job_id)
        if job is not None:
            job.stats = json_copy(stats)

    # ---- the WAL -----------------------------------------------------------------------
    async def claim_due(self, server_id: str, app: str, epoch: int, horizon_ms: int, planner: FirePlanner,
                        now: float, limit: int = 5000,
                        exclude_types: Sequence[ScheduleType] = ()) -> list[InstanceRow]:
        """See :meth:`Store.claim_due`. Every plan is made before anything is written, so a
        planner that raises leaves the database as it was (its exception propagates as is)."""
        db = await self._db()
        excluded = {ScheduleType(t) for t in exclude_types}
        self._fence(db, server_id, app, epoch)
        if limit <= 0:
            return []
        due = sorted(((j.next_trigger_ms, j.id, j) for j in db.jobs.values()
                      if j.app == app and j.enabled and not j.is_delete and j.next_trigger_ms is not None
                      and j.next_trigger_ms <= horizon_ms and j.schedule_type not in excluded),
                     key=lambda d: (d[0], d[1]))[:limit]
        runs: list[tuple[int, int]] = []  # (job_id, planned_ms)
        catch_ups: list[tuple[int, int]] = []
        skips: list[tuple[int, int, str]] = []  # (job_id, planned_ms, reason)
        advances: list[tuple[JobRow, int | None]] = []
        budget = limit
        for _, job_id, job in due:
            if budget <= 0:
                break
            plan = planner(planner_view(job), horizon_ms, budget)
            runs.extend((job_id, t) for t in plan.runs)
            catch_ups.extend((job_id, t) for t in plan.catch_up)
            skips.extend((job_id, t, reason) for t, reason in plan.skipped)
            budget -= len(plan)
            advances.append((job, plan.next_ms))

        def row(job_id: int, planned_ms: int, trigger: str, status: Status) -> InstanceRow:
            return InstanceRow(0, job_id, app, int(planned_ms), FIRST_ATTEMPT, status, trigger, None, server_id,
                               epoch, created_at=float(now))

        out: list[InstanceRow] = []
        for fires, trigger in ((runs, "schedule"), (catch_ups, "catch_up")):
            for job_id, planned_ms in fires:
                written = db.add_instance(row(job_id, planned_ms, trigger, Status.WAITING))
                if written is not None:  # a fire already recorded is skipped
                    out.append(copy_instance(written))
        for job_id, planned_ms, reason in skips:
            skipped = row(job_id, planned_ms, "schedule", Status.SKIPPED)
            skipped.error, skipped.finished_at = reason, float(now)
            db.add_instance(skipped)
        # SQL guards this with the version it read; here nothing can change a job in between.
        for job, next_ms in advances:
            job.next_trigger_ms = None if next_ms is None else int(next_ms)
        return out

    async def insert_instance(self, server_id: str, app: str, epoch: int, job_id: int, planned_ms: int,
                              attempt: int, trigger: str, params: Any, now: float,
                              reruns: int = 0) -> InstanceRow | None:
        db = await self._db()
        self._fence(db, server_id, app, epoch)
        row = db.add_instance(InstanceRow(0, job_id, app, int(planned_ms), int(attempt), Status.WAITING, trigger,
                                          json_copy(params), server_id, epoch, created_at=float(now),
                                          reruns=int(reruns)))
        if row is None:  # recorded already: answer it only if it is this very write, made before
            row = db.fire(job_id, int(planned_ms), int(attempt))
            if row is None or (row.server, row.epoch, row.created_at, row.trigger) != (server_id, epoch, now, trigger):
                return None
        return copy_instance(row)

    async def write_statuses(self, updates: Sequence[InstanceUpdate], lines: Sequence[LogLine],
                             finished: dict[int, float], alarms: Sequence[AlarmRow] = ()) -> None:
        """See :meth:`Store.write_statuses`: all of it in one step."""
        db = await self._db()
        self._update(db, updates)
        self._append(db, lines)
        self._add_alarms(db, alarms)
        for job_id, finished_at in finished.items():
            job = db.jobs.get(job_id)
            if job is not None and (job.last_finished_time is None or job.last_finished_time < finished_at):
                job.last_finished_time = float(finished_at)

    async def update_instances(self, updates: Iterable[InstanceUpdate]) -> int:
        db = await self._db()
        return self._update(db, updates)

    @staticmethod
    def _update(db: MemoryDatabase, updates: Iterable[InstanceUpdate]) -> int:
        """Apply the updates, merged per instance as SQL merges them (``codecs.merge_updates``):
        only an unfinished row changes, and only forward (by ``codecs.rank``). Rows changed."""
        changed = 0
        for u in merge_updates(updates):
            row = db.instances.get(u.id)
            if row is None or row.status in FINAL_STATUSES or rank(u.status) <= rank(row.status):
                continue
            row.status = u.status  # and, like SQL's COALESCE, every field the update gives
            if u.worker is not None:
                row.worker = u.worker
            if u.dispatched_at is not None:
                row.dispatched_at = float(u.dispatched_at)
            if u.started_at is not None:
                row.started_at = float(u.started_at)
            if u.finished_at is not None:
                row.finished_at = float(u.finished_at)
            if u.result is not None:
                row.result = json_copy(u.result)
            if u.error is not None:
                row.error = u.error
            changed += 1
        return changed

    async def get_instance(self, instance_id: int) -> InstanceRow | None:
        db = await self._db()
        row = db.instances.get(instance_id)
        return None if row is None else copy_instance(row)

    async def list_instances(self, app: str, job_id: int | None = None, statuses: Sequence[Status] | None = None,
                             limit: int = 100) -> list[InstanceRow]:
        """Newest (highest id) first, at most ``limit``."""
        db = await self._db()
        wanted = None if statuses is None else {Status(s) for s in statuses}
        out: list[InstanceRow] = []
        for row in reversed(db.instances.values()):
            if len(out) >= limit:
                break
            if row.app == app and (job_id is None or row.job_id == job_id) and (wanted is None or row.status in wanted):
                out.append(copy_instance(row))
        return out

    async def load_unfinished(self, app: str) -> list[InstanceRow]:
        """By (planned_ms, id)."""
        db = await self._db()
        rows = [r for r in db.instances.values() if r.app == app and r.status not in FINAL_STATUSES]
        return [copy_instance(r) for r in sorted(rows, key=lambda r: (r.planned_ms, r.id))]

    async def written_at(self, server_id: str, app: str, epoch: int, created_at: float) -> list[InstanceRow]:
        """By id. A write here is never unanswered, but the rows are there to be found all the same."""
        db = await self._db()
        return [copy_instance(r) for r in db.instances.values()
                if r.app == app and r.server == server_id and r.epoch == epoch and r.created_at == created_at
                and r.status is Status.WAITING]

    # ---- job logs ----------------------------------------------------------------------
    async def add_job_runs(self, runs: Sequence[JobRun], prune: Collection[int] = ()) -> None:
        db = await self._db()
        for run in runs:
            db.last_run_id += 1
            db.runs.setdefault(run.job_id, []).append(copy_run(run, db.last_run_id))
        for job_id in prune:
            del db.runs.get(job_id, [])[:-RUN_HISTORY]

    async def list_job_runs(self, job_id: int, limit: int = RUN_HISTORY) -> list[JobRun]:
        db = await self._db()
        kept = db.runs.get(job_id, [])
        return [copy_run(run) for run in reversed(kept[-limit:])] if limit > 0 else []

    async def append_logs(self, lines: Sequence[LogLine]) -> None:
        db = await self._db()
        self._append(db, lines)

    @staticmethod
    def _append(db: MemoryDatabase, lines: Sequence[LogLine]) -> None:
        for line in lines:
            db.logs.setdefault(int(line.instance_id), []).append(copy_log(line))

    async def get_logs(self, instance_id: int, limit: int = 1000, offset: int = 0) -> list[LogLine]:
        db = await self._db()
        start = max(offset, 0)
        return [copy_log(line) for line in db.logs.get(instance_id, [])[start:start + max(limit, 0)]]

    # ---- the admin API ---------------------------------------------------------------------
    async def query_instances(self, app: str, *, job_id: int | None = None, statuses: Sequence[Status] | None = None,
                              since_ms: int | None = None, until_ms: int | None = None,
                              after: tuple[int, int] | None = None, limit: int = 100) -> list[InstanceRow]:
        """(planned_ms, id) descending, as the SQL stores' index gives them."""
        db = await self._db()
        wanted = None if statuses is None else {Status(s) for s in statuses}
        rows = [r for r in db.instances.values() if r.app == app and (job_id is None or r.job_id == job_id)
                and (wanted is None or r.status in wanted) and (since_ms is None or r.planned_ms >= since_ms)
                and (until_ms is None or r.planned_ms < until_ms)
                and (after is None or (r.planned_ms, r.id) < after)]
        rows.sort(key=lambda r: (r.planned_ms, r.id), reverse=True)
        return [copy_instance(r) for r in rows[:max(limit, 0)]]

    async def query_jobs(self, app: str, *, after: str = "", limit: int = 100, name_contains: str = "",
                         tag: str = "", enabled: bool | None = None) -> list[JobRow]:
        db = await self._db()
        jobs = sorted((j for j in db.jobs.values() if j.app == app and not j.is_delete and j.name > after
                       and name_contains in j.name and (not tag or tag in j.tags)
                       and (enabled is None or j.enabled == enabled)), key=lambda j: j.name)
        return [copy_job(j) for j in jobs[:max(limit, 0)]]

    async def job_outcomes(self, app: str, job_ids: Collection[int], since_ms: int) -> dict[int, dict[str, int]]:
        db = await self._db()
        wanted = set(job_ids)
        out: dict[int, dict[str, int]] = {}
        for row in db.instances.values():
            if row.app == app and row.job_id in wanted and row.planned_ms >= since_ms:
                counts = out.setdefault(row.job_id, {})
                counts[row.status.value] = counts.get(row.status.value, 0) + 1
        return out

    async def count_unfinished(self, app: str) -> dict[str, int]:
        db = await self._db()
        counts: dict[str, int] = {}
        for row in db.instances.values():
            if row.app == app and row.status not in FINAL_STATUSES:
                counts[row.status.value] = counts.get(row.status.value, 0) + 1
        return counts

    async def job_names(self, app: str, job_ids: Collection[int]) -> dict[int, str]:
        db = await self._db()
        return {job_id: db.jobs[job_id].name for job_id in set(job_ids)
                if job_id in db.jobs and db.jobs[job_id].app == app}

    async def instance_counts(self, app: str, since_ms: int, until_ms: int,
                              bucket_ms: int) -> list[tuple[int, str, int]]:
        db = await self._db()
        counts: dict[tuple[int, str], int] = {}
        for r in db.instances.values():
            if r.app == app and since_ms <= r.planned_ms < until_ms:
                key = (r.planned_ms - (r.planned_ms - since_ms) % bucket_ms, r.status.value)
                counts[key] = counts.get(key, 0) + 1
        return [(bucket, status, n) for (bucket, status), n in sorted(counts.items())]

    async def lateness_sample(self, app: str, since_ms: int, until_ms: int, limit: int) -> list[float]:
        db = await self._db()
        rows = sorted((r for r in db.instances.values() if r.app == app and since_ms <= r.planned_ms < until_ms
                       and r.started_at is not None and r.attempt == 1), key=lambda r: r.planned_ms, reverse=True)
        return [float(r.started_at) - r.planned_ms / 1000.0 for r in rows[:max(limit, 0)] if r.started_at is not None]

    async def add_token(self, token: TokenRow) -> None:
        db = await self._db()
        if token.id in db.tokens:
            raise StoreError(f"token id {token.id!r} exists")
        db.tokens[token.id] = dataclasses.replace(token, apps=None if token.apps is None else list(token.apps))

    async def get_token(self, token_id: str) -> TokenRow | None:
        db = await self._db()
        token = db.tokens.get(token_id)
        return None if token is None else dataclasses.replace(token)

    async def list_tokens(self) -> list[TokenRow]:
        db = await self._db()
        return [dataclasses.replace(t) for t in sorted(db.tokens.values(), key=lambda t: (t.created_at, t.id))]

    async def revoke_token(self, token_id: str, now: float) -> bool:
        db = await self._db()
        token = db.tokens.get(token_id)
        if token is None or token.revoked_at is not None:
            return False
        token.revoked_at = float(now)
        return True

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        db = await self._db()
        for entry in entries:
            db.last_audit_id += 1
            db.audit.append(dataclasses.replace(entry, id=db.last_audit_id))

    async def list_audit(self, *, app: str | None = None, before_id: int | None = None,
                         limit: int = 100) -> list[AuditEntry]:
        db = await self._db()
        return _newest_first(db.audit, app, before_id, limit)

    async def add_ownership_change(self, change: OwnershipChange) -> None:
        db = await self._db()
        db.last_history_id += 1
        db.history.append(dataclasses.replace(change, id=db.last_history_id))

    async def list_ownership_changes(self, *, app: str | None = None, before_id: int | None = None,
                                     limit: int = 100) -> list[OwnershipChange]:
        db = await self._db()
        return _newest_first(db.history, app, before_id, limit)

    async def add_alarms(self, alarms: Sequence[AlarmRow]) -> None:
        self._add_alarms(await self._db(), alarms)

    @staticmethod
    def _add_alarms(db: MemoryDatabase, alarms: Sequence[AlarmRow]) -> None:
        for alarm in alarms:
            key = (alarm.event_id, alarm.webhook)
            if key not in db.outbox_keys:
                db.last_alarm_id += 1
                db.outbox_keys[key] = db.last_alarm_id
                db.outbox[db.last_alarm_id] = OutboxEntry(dataclasses.replace(
                    alarm, id=db.last_alarm_id, payload=json_copy(alarm.payload),
                    next_attempt_at=alarm.next_attempt_at or alarm.created_at))

    async def claim_alarms(self, server_id: str, apps: Collection[str], now: float, lease: float,
                           limit: int, *, webhooks: Collection[str] | None = None) -> list[AlarmRow]:
        db = await self._db()
        won: list[AlarmRow] = []
        for entry in db.outbox.values():
            if len(won) >= limit:
                break
            row = entry.row
            if (entry.delivered_at is None and row.next_attempt_at <= now and entry.claimed_until < now
                    and (row.app is None or row.app in apps) and (webhooks is None or row.webhook in webhooks)):
                entry.claimed_until = now + lease
                entry.claimed_by = server_id
                won.append(dataclasses.replace(row, payload=json_copy(row.payload)))
        return won

    async def finish_alarm(self, alarm_id: int, now: float, delivered: bool, next_attempt_at: float,
                           error: str | None, claimed_by: str) -> None:
        db = await self._db()
        entry = db.outbox.get(alarm_id)
        if entry is None or entry.claimed_by != claimed_by:
            return
        entry.claimed_until = 0.0
        entry.last_error = error
        if delivered:
            entry.delivered_at = now
        else:
            entry.row.attempts += 1
            entry.row.next_attempt_at = next_attempt_at

    async def prune_instances(self, app: str, before_ms: int, limit: int) -> int:
        db = await self._db()
        old = sorted((r for r in db.instances.values() if r.app == app and r.planned_ms < before_ms
                      and r.status in FINAL_STATUSES), key=lambda r: (r.planned_ms, r.id))[:max(limit, 0)]
        for row in old:
            del db.instances[row.id]
            db.fire_ids.pop((row.job_id, row.planned_ms, row.attempt), None)
            db.logs.pop(row.id, None)
        return len(old)

    async def prune_older(self, table: str, before: float, limit: int) -> int:
        db = await self._db()
        if table == "job_logs":  # lines keep no id here: the old ones of each instance, up to the limit
            pruned = 0
            for instance_id, lines in db.logs.items():
                kept = []
                for line in lines:
                    if line.ts < before and pruned < limit:
                        pruned += 1
                    else:
                        kept.append(line)
                db.logs[instance_id] = kept
            return pruned
        if table == "idempotency_keys":
            expired = [key for key, (_, at) in db.idempotency.items() if at < before]
            for key in expired:
                del db.idempotency[key]
            return len(expired)
        if table == "alarm_outbox":
            done = sorted((i for i, e in db.outbox.items() if e.delivered_at is not None and e.delivered_at < before),
                          key=lambda i: db.outbox[i].delivered_at or 0.0)[:max(limit, 0)]
            for alarm_id in done:
                entry = db.outbox.pop(alarm_id)
                db.outbox_keys.pop((entry.row.event_id, entry.row.webhook), None)
            return len(done)
        if table == "task_batches":  # in the order written, as SQL reads them by id
            old_keys = [name for name, _ in zip(db.tasks, range(max(limit, 0)), strict=False)
                        if db.tasks[name].created_at < before]
            for name in old_keys:
                del db.tasks[name]
            return len(old_keys)
        rows: list[Any] = db.audit if table == "audit_log" else db.history
        old_ids = {r.id for r in rows[:max(limit, 0)] if r.ts < before}  # of the oldest, as SQL reads them
        rows[:] = [r for r in rows if r.id not in old_ids]
        return len(old_ids)

    async def reserve_idempotency_key(self, app: str, key: str, now: float) -> tuple[bool, int | None]:
        db = await self._db()
        held = db.idempotency.get((app, key))
        if held is not None and held[1] >= now - IDEMPOTENCY_TTL:
            return False, held[0]
        db.idempotency[(app, key)] = (None, float(now))
        return True, None

    async def settle_idempotency_key(self, app: str, key: str, instance_id: int | None) -> None:
        db = await self._db()
        held = db.idempotency.get((app, key))
        if instance_id is None:
            db.idempotency.pop((app, key), None)
        elif held is not None:
            db.idempotency[(app, key)] = (instance_id, held[1])

    # ---- sub-tasks -------------------------------------------------------------------------------
    async def add_task_batches(self, batches: Sequence[TaskBatch]) -> dict[str, TaskBatch]:
        db = await self._db()
        stored = {b.key: _copy_batch(db.tasks[b.key]) for b in batches if b.key in db.tasks}
        for batch in batches:
            if batch.key not in db.tasks:
                db.tasks[batch.key] = _copy_batch(batch)
        return stored

    async def save_task_batches(self, batches: Sequence[TaskBatch]) -> None:
        db = await self._db()
        for batch in batches:
            if batch.key in db.tasks:
                db.tasks[batch.key] = _copy_batch(batch, db.tasks[batch.key].items)

    async def list_task_batches(self, root: str, *, parent: str | None = None, call: int | None = None,
                                after_key: str = "", limit: int = 1000) -> list[TaskBatch]:
        db = await self._db()
        out: list[TaskBatch] = []
        passed = not after_key
        for batch in db.tasks.values():
            if not passed:
                passed = batch.key == after_key
                continue
            if len(out) >= limit:
                break
            if batch.root != root or (parent is not None and batch.parent != parent):
                continue
            if call is None or batch.call == call:
                out.append(_copy_batch(batch))
        return out

    async def task_progress(self, roots: Collection[str]) -> dict[str, tuple[int, int, int]]:
        db = await self._db()
        wanted = set(roots)
        out: dict[str, tuple[int, int, int]] = {}
        for batch in db.tasks.values():
            if batch.root in wanted:
                items, ended, failed = out.get(batch.root, (0, 0, 0))
                done = batch.status in FINAL_TASK_STATUSES
                out[batch.root] = (items + batch.size, ended + (batch.size if done else 0),
                                   failed + len(batch.errors or ()))
        return out


_Logged = TypeVar("_Logged", AuditEntry, OwnershipChange)


def _newest_first(table: list[_Logged], app: str | None, before_id: int | None, limit: int) -> list[_Logged]:
    """A page of an append-only table (in id order), newest first, of one app if given."""
    out: list[_Logged] = []
    for entry in reversed(table):
        if len(out) >= limit:
            break
        if (before_id is None or entry.id < before_id) and (app is None or entry.app == app):
            out.append(dataclasses.replace(entry))
    return out


def _copy_batch(batch: TaskBatch, items: list[Any] | None = None) -> TaskBatch:
    """A batch as a database would give it back: JSON columns copied, nothing shared."""
    return dataclasses.replace(
        batch, items=json_copy(batch.items if items is None else items), results=json_copy(batch.results),
        errors=json_copy(batch.errors), extra=json_copy(batch.extra), logs=json_copy(batch.logs))


__all__ = ["MemoryStore", "drop_database"]
