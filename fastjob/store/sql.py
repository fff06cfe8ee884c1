"""Backend-independent half of the SQL stores: every Store operation, written once as an op.

How ops are run (transactions, retries, migrations) is :mod:`.sql_runner`; the claim, the WAL's
hot path, is :mod:`.sql_wal`. The backends (:mod:`.sqlite`, :mod:`.mysql`) drive the ops.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from ..models import (
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
    AlarmRow,
    AppRow,
    AuditEntry,
    FirePlanner,
    NotOwnerError,
    OwnershipChange,
    ServerRow,
    TokenRow,
    WorkerRow,
)
from .codecs import (
    INST_COLS,
    INST_INSERT_COLS,
    JOB_COLS,
    SQL_RANK,
    SQL_UNFINISHED,
    dumps,
    loads,
    merge_updates,
    rank,
    row_to_instance,
    row_to_job,
)
from .sql_admin import (
    AUDIT_COLS,
    HISTORY_COLS,
    TOKEN_COLS,
    TOKEN_SELECT,
    instance_page_query,
    newest_first,
    op_add_alarms,
    op_add_audit,
    op_claim_alarms,
    op_delete_instances,
    op_delete_logs_of,
    op_finish_alarm,
    op_instance_counts,
    op_lateness_sample,
    op_old_instances,
    op_prune_older,
    op_reserve_key,
    op_settle_key,
    row_to_audit,
    row_to_change,
    row_to_token,
    token_values,
)
from .sql_declare import op_declare_jobs
from .sql_runner import Attempts, SQLRunner
from .sql_runs import op_add_job_runs, op_list_job_runs
from .sql_tasks import op_add_task_batches, op_list_task_batches, op_save_task_batches, op_task_progress
from .sql_wal import op_claim_due
from .statements import CHUNK_ROWS, Op, Stmt, chunks, flat

log = logging.getLogger("fastjob.store")


def like_escape(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern (escape character ``!``)."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


# ---- the shared store ----------------------------------------------------------------------
class SQLStore(SQLRunner):
    """Implements the whole :class:`Store` contract on top of :meth:`_attempt`."""

    # ---- cluster membership --------------------------------------------------------------
    async def register_server(self, server_id: str, address: str, now: float, http_address: str = "") -> None:
        sql = self.dialect.upsert("servers", ("id", "address", "started_at", "heartbeat_at", "http_address"), "id",
                                  ("address", "started_at", "heartbeat_at", "http_address"))
        await self._run("register_server", lambda: self._op_exec(sql, (server_id, address, now, now, http_address)),
                        tx=False)

    async def heartbeat_server(self, server_id: str, now: float, load: float = 0.0) -> bool:
        n = await self._run("heartbeat_server", lambda: self._op_exec(
            "UPDATE servers SET heartbeat_at = ?, load_score = ? WHERE id = ?", (now, load, server_id)), tx=False)
        return n > 0

    async def set_server_drain(self, server_id: str, drain: bool) -> bool:
        n = await self._run("set_server_drain", lambda: self._op_exec(
            "UPDATE servers SET drain = ? WHERE id = ?", (int(drain), server_id)), tx=False)
        return n > 0

    async def list_servers(self) -> list[ServerRow]:
        rows = await self._run("list_servers", lambda: self._op_query(
            "SELECT id, address, started_at, heartbeat_at, load_score, drain, http_address FROM servers ORDER BY id"),
            tx=False)
        return [ServerRow(r[0], r[1], float(r[2]), float(r[3]), float(r[4]), bool(r[5]), r[6]) for r in rows]

    async def remove_server(self, server_id: str) -> None:
        await self._run("remove_server", lambda: self._op_exec(
            "DELETE FROM servers WHERE id = ?", (server_id,)), tx=False)

    # ---- apps ------------------------------------------------------------------------------
    _APP_SELECT = "SELECT name, owner, epoch, token_hash, prev_owner, left_clean, adopted FROM apps"

    @staticmethod
    def _app(r: Sequence[Any]) -> AppRow:
        return AppRow(r[0], r[1], int(r[2]), r[3], r[4], bool(r[5]), bool(r[6]))

    async def ensure_app(self, app: str) -> AppRow:
        return await self._run("ensure_app", lambda: self._op_ensure_app(app), tx=False)

    def _op_ensure_app(self, app: str) -> Op[AppRow]:
        yield Stmt(self.dialect.insert("apps", ("name", "epoch", "updated_at"), 1, ignore=True),
                   (app, 0, time.time()))
        r = yield Stmt(self._APP_SELECT + " WHERE name = ?", (app,))
        return self._app(r.rows[0])

    async def get_app(self, app: str) -> AppRow | None:
        rows = await self._run("get_app", lambda: self._op_query(self._APP_SELECT + " WHERE name = ?", (app,)),
                               tx=False)
        return self._app(rows[0]) if rows else None

    async def list_apps(self) -> list[AppRow]:
        rows = await self._run("list_apps", lambda: self._op_query(self._APP_SELECT + " ORDER BY name"), tx=False)
        return [self._app(r) for r in rows]

    async def claim_app(self, app: str, server_id: str, seen_epoch: int, *, prev_owner: str | None = None,
                        left_clean: bool = False, adopted: bool = True) -> int | None:
        # A lost reply is retried; the retry then fails the CAS although we won. Recognise our
        # own win: if the row already says (us, seen_epoch + 1) after a failed CAS on a retry.
        state = Attempts()
        values = (server_id, prev_owner, int(left_clean), int(adopted))
        won = await self._run("claim_app", lambda: self._op_claim_app(state, app, values, seen_epoch), tx=False)
        return seen_epoch + 1 if won else None

    def _op_claim_app(self, state: Attempts, app: str, values: tuple[Any, ...], seen_epoch: int) -> Op[bool]:
        retry = state.tried_insert
        state.tried_insert = True
        server_id = values[0]
        r = yield Stmt("UPDATE apps SET owner = ?, prev_owner = ?, left_clean = ?, adopted = ?, epoch = epoch + 1,"
                       " updated_at = ? WHERE name = ? AND epoch = ?", (*values, time.time(), app, seen_epoch))
        if r.rowcount == 1:
            return True
        if retry:
            r = yield Stmt("SELECT owner, epoch FROM apps WHERE name = ?", (app,))
            return bool(r.rows) and r.rows[0][0] == server_id and int(r.rows[0][1]) == seen_epoch + 1
        return False

    async def release_apps(self, server_id: str, apps: Sequence[str] | None = None) -> list[str]:
        return await self._run("release_apps", lambda: self._op_release_apps(server_id, apps), tx=True)

    def _op_release_apps(self, server_id: str, apps: Sequence[str] | None) -> Op[list[str]]:
        r = yield Stmt("SELECT name, epoch FROM apps WHERE owner = ? ORDER BY name", (server_id,))
        released = []
        now = time.time()
        for name, epoch in r.rows:  # a CAS per app: a concurrent takeover keeps its win
            if apps is not None and name not in apps:
                continue
            u = yield Stmt("UPDATE apps SET owner = NULL, prev_owner = ?, left_clean = 1, adopted = 0,"
                           " epoch = epoch + 1, updated_at = ? WHERE name = ? AND owner = ? AND epoch = ?",
                           (server_id, now, name, server_id, epoch))
            if u.rowcount == 1:
                released.append(name)
        return released

    # ---- worker registry ---------------------------------------------------------------------
    async def register_worker(self, app: str, worker_id: str, server_id: str, now: float, info: Any) -> None:
        sql = self.dialect.upsert("workers", ("app", "worker_id", "server", "connected_at", "info"), "app, worker_id",
                                  ("server", "connected_at", "info"))
        await self._run("register_worker", lambda: self._op_exec(
            sql, (app, worker_id, server_id, now, dumps(info))), tx=False)

    async def unregister_worker(self, app: str, worker_id: str, server_id: str) -> None:
        await self._run("unregister_worker", lambda: self._op_exec(
            "DELETE FROM workers WHERE app = ? AND worker_id = ? AND server = ?", (app, worker_id, server_id)),
            tx=False)

    async def list_workers(self, app: str, server_id: str | None = None) -> list[WorkerRow]:
        sql = "SELECT app, worker_id, server, connected_at, info FROM workers WHERE app = ?"
        params: tuple[Any, ...] = (app,)
        if server_id is not None:
            sql, params = sql + " AND server = ?", (app, server_id)
        rows = await self._run("list_workers", lambda: self._op_query(sql + " ORDER BY worker_id", params), tx=False)
        return [WorkerRow(r[0], r[1], r[2], float(r[3]), loads(r[4])) for r in rows]

    async def set_app_token(self, app: str, token_hash: str | None) -> None:
        await self._run("set_app_token", lambda: self._op_set_app_token(app, token_hash), tx=True)

    def _op_set_app_token(self, app: str, token_hash: str | None) -> Op[None]:
        yield Stmt(self.dialect.insert("apps", ("name", "epoch", "updated_at"), 1, ignore=True), (app, 0, time.time()))
        yield Stmt("UPDATE apps SET token_hash = ? WHERE name = ?", (token_hash, app))

    def _fence(self, server_id: str, app: str, epoch: int) -> Op[None]:
        """Touch the app row only if we own it at ``epoch``. In MySQL the row lock taken here
        is held to COMMIT, so a concurrent takeover CAS on the same row waits for us (and we
        for it); in SQLite BEGIN IMMEDIATE already serialises every writer."""
        r = yield Stmt("UPDATE apps SET updated_at = ? WHERE name = ? AND owner = ? AND epoch = ?",
                       (time.time(), app, server_id, epoch))
        if r.rowcount != 1:
            raise NotOwnerError(app, epoch)

    # ---- jobs --------------------------------------------------------------------------------
    async def upsert_job(self, spec: JobSpec, next_trigger_ms: int | None, now: float) -> JobRow:
        rows = await self._run("upsert_job", lambda: op_declare_jobs(
            self.dialect, spec.app, [spec], Origin.API, lambda _: next_trigger_ms, now, read_unchanged=True), tx=True)
        return rows[0]

    async def declare_jobs(self, app: str, specs: Sequence[JobSpec], first_fire: Callable[[JobSpec], int | None],
                           now: float) -> list[JobRow]:
        return await self._run("declare_jobs", lambda: op_declare_jobs(
            self.dialect, app, specs, Origin.CODE, first_fire, now), tx=True)

    async def pause_jobs(self, app: str, names: Sequence[str], paused_by: PausedBy, now: float) -> list[JobRow]:
        return await self._run("pause_jobs", lambda: self._op_flip_jobs(app, names, paused_by, now, enable=False),
                               tx=True)

    async def resume_jobs(self, app: str, names: Sequence[str], paused_by: PausedBy, now: float) -> list[JobRow]:
        return await self._run("resume_jobs", lambda: self._op_flip_jobs(app, names, paused_by, now, enable=True),
                               tx=True)

    def _op_flip_jobs(self, app: str, names: Sequence[str], paused_by: PausedBy, now: float, *,
                      enable: bool) -> Op[list[JobRow]]:
        """Pause the named enabled jobs for ``paused_by``, or resume those paused for it; the stored
        next fire stays. Returns the jobs changed, read back after the update (the same transaction
        sees its own writes; a read first could list rows a concurrent change then took away)."""
        flipped: list[JobRow] = []
        set_sql, set_params = ("enabled = 1, paused_by = NULL", ()) if enable else ("enabled = 0, paused_by = ?",
                                                                                   (paused_by.value,))
        was_sql, was_params = ("enabled = 0 AND paused_by = ?", (paused_by.value,)) if enable else ("enabled = 1", ())
        for chunk in chunks(names, CHUNK_ROWS):
            named = f"app = ? AND name IN ({','.join('?' * len(chunk))}) AND is_delete = 0"
            yield Stmt(f"UPDATE jobs SET {set_sql}, updated_time = ?, version = version + 1"
                       f" WHERE {named} AND {was_sql}", (*set_params, now, app, *chunk, *was_params))
            r = yield Stmt(f"SELECT {JOB_COLS} FROM jobs WHERE {named} AND enabled = ? AND updated_time = ?",
                           (app, *chunk, int(enable), now))
            flipped.extend(row_to_job(row) for row in r.rows)
        return flipped

    async def get_job(self, job_id: int) -> JobRow | None:
        rows = await self._run("get_job", lambda: self._op_query(
            f"SELECT {JOB_COLS} FROM jobs WHERE id = ?", (job_id,)), tx=False)
        return row_to_job(rows[0]) if rows else None

    async def get_job_by_name(self, app: str, name: str) -> JobRow | None:
        rows = await self._run("get_job_by_name", lambda: self._op_query(
            f"SELECT {JOB_COLS} FROM jobs WHERE app = ? AND name = ? AND is_delete = 0", (app, name)), tx=False)
        return row_to_job(rows[0]) if rows else None

    async def list_jobs(self, app: str) -> list[JobRow]:
        rows = await self._run("list_jobs", lambda: self._op_query(
            f"SELECT {JOB_COLS} FROM jobs WHERE app = ? AND is_delete = 0 ORDER BY name", (app,)), tx=False)
        return [row_to_job(r) for r in rows]

    async def delete_job(self, app: str, name: str, now: float) -> bool:
        n = await self._run("delete_job", lambda: self._op_exec(
            "UPDATE jobs SET is_delete = 1, enabled = 0, next_trigger_ms = NULL, updated_time = ?,"
            " version = version + 1 WHERE app = ? AND name = ? AND is_delete = 0", (now, app, name)), tx=False)
        return n > 0

    async def set_job_enabled(self, app: str, name: str, enabled: bool, next_trigger_ms: int | None,
                              now: float) -> bool:
        n = await self._run("set_job_enabled", lambda: self._op_exec(
            "UPDATE jobs SET enabled = ?, paused_by = ?, next_trigger_ms = ?, anchor_ms = COALESCE(?, anchor_ms),"
            " updated_time = ?, version = version + 1 WHERE app = ? AND name = ? AND is_delete = 0",
            (int(enabled), None if enabled else PausedBy.OPERATOR.value, next_trigger_ms,
             int(now * 1000) if enabled else None, now, app, name)), tx=False)
        return n > 0

    async def set_next_trigger(self, server_id: str, app: str, epoch: int, job_id: int,
                               next_trigger_ms: int | None) -> None:
        await self._run("set_next_trigger", lambda: self._op_set_next_trigger(
            server_id, app, epoch, job_id, next_trigger_ms), tx=True)

    def _op_set_next_trigger(self, server_id: str, app: str, epoch: int, job_id: int,
                             next_trigger_ms: int | None) -> Op[None]:
        yield from self._fence(server_id, app, epoch)
        yield Stmt("UPDATE jobs SET next_trigger_ms = ? WHERE id = ? AND app = ?", (next_trigger_ms, job_id, app))

    async def mark_job_finished(self, job_id: int, finished_at: float) -> None:
        await self._run("mark_job_finished", lambda: self._op_exec(
            "UPDATE jobs SET last_finished_time = ? WHERE id = ?", (finished_at, job_id)), tx=False)

    async def set_job_stats(self, job_id: int, stats: Any, now: float) -> None:
        # updated_time tracks the job's definition, so a stats report leaves it alone.
        await self._run("set_job_stats", lambda: self._op_exec(
            "UPDATE jobs SET stats = ? WHERE id = ?", (dumps(stats), job_id)), tx=False)

    # ---- the WAL -------------------------------------------------------------------------------
    async def claim_due(self, server_id: str, app: str, epoch: int, horizon_ms: int, planner: FirePlanner,
                        now: float, limit: int = 5000,
                        exclude_types: Sequence[ScheduleType] = ()) -> list[InstanceRow]:
        """See :meth:`Store.claim_due`."""
        state = Attempts()
        excl = tuple(ScheduleType(t).value for t in exclude_types)
        return await self._run("claim_due", lambda: op_claim_due(
            self, self._fence(server_id, app, epoch), state, server_id, app, epoch, horizon_ms, planner, now, limit,
            excl), tx=True)

    async def insert_instance(self, server_id: str, app: str, epoch: int, job_id: int, planned_ms: int,
                              attempt: int, trigger: str, params: Any, now: float,
                              reruns: int = 0) -> InstanceRow | None:
        values = (job_id, app, planned_ms, attempt, Status.WAITING.value, trigger, dumps(params), server_id, epoch, now,
                  reruns)
        row = await self._run("insert_instance", lambda: self._op_insert_instance(server_id, app, epoch, values),
                              tx=True)
        return None if row is None else row_to_instance(row)

    async def written_at(self, server_id: str, app: str, epoch: int, created_at: float) -> list[InstanceRow]:
        rows = await self._run("written_at", lambda: self._op_query(
            f"SELECT {INST_COLS} FROM instances WHERE app = ? AND server = ? AND epoch = ? AND created_at = ?"
            " AND status = ? ORDER BY id", (app, server_id, epoch, created_at, Status.WAITING.value)), tx=False)
        return [row_to_instance(r) for r in rows]

    def _op_insert_instance(self, server_id: str, app: str, epoch: int,
                            values: tuple[Any, ...]) -> Op[tuple[Any, ...] | None]:
        yield from self._fence(server_id, app, epoch)
        if self.dialect.returning:
            w = yield Stmt(self.dialect.insert("instances", INST_INSERT_COLS, 1, ignore=True, returning=INST_COLS),
                           values)
            if w.rows:
                return w.rows[0]
        else:
            w = yield Stmt(self.dialect.insert("instances", INST_INSERT_COLS, 1, ignore=True), values)
            if w.rowcount == 1 and w.lastrowid:
                return (w.lastrowid,) + values[:7] + values[7:9] + (None, values[9]) + (None,) * 5 + values[10:11]
        # Skipped: is it the row an earlier attempt of ours committed without us hearing back
        # (same server, epoch and created_at, which a caller keeps across its retries)?
        r = yield Stmt(f"SELECT {INST_COLS} FROM instances WHERE job_id = ? AND planned_ms = ? AND attempt = ?",
                       values[0:1] + values[2:4])
        if r.rows:
            row = r.rows[0]
            if (row[8], row[9], row[11], row[6]) == (server_id, epoch, values[9], values[5]):
                return tuple(row)
        return None

    async def update_instances(self, updates: Iterable[InstanceUpdate]) -> int:
        rows = self._update_rows(updates)
        if not rows:
            return 0
        return await self._run("update_instances", lambda: self._op_update_instances(rows), tx=True)

    async def write_statuses(self, updates: Sequence[InstanceUpdate], lines: Sequence[LogLine],
                             finished: dict[int, float], alarms: Sequence[AlarmRow] = ()) -> None:
        """See :meth:`Store.write_statuses`: one transaction, a few multi-row statements."""
        if updates or lines or finished or alarms:
            await self._run("write_statuses", lambda: self._op_write_statuses(updates, lines, finished, alarms),
                            tx=True)

    def _op_write_statuses(self, updates: Sequence[InstanceUpdate], lines: Sequence[LogLine],
                           finished: dict[int, float], alarms: Sequence[AlarmRow]) -> Op[None]:
        # the rows are built here, in the op: on SQLite that is the store's thread, not the event loop
        rows = self._update_rows(updates)
        log_rows = [(ln.instance_id, ln.ts, ln.level, ln.message) for ln in lines]
        finish_rows = sorted(finished.items())
        if rows:
            yield from self._op_update_instances(rows)
        if log_rows:
            yield from self._op_append_logs(log_rows)
        for part in chunks(finish_rows):
            yield Stmt(self.dialect.update_join("jobs", ("id", "ft"), len(part), (("last_finished_time", "u.ft"),),
                                                "jobs.last_finished_time IS NULL OR jobs.last_finished_time < u.ft"),
                       flat(part))
        if alarms:
            yield from op_add_alarms(self.dialect, alarms)

    @staticmethod
    def _update_rows(updates: Iterable[InstanceUpdate]) -> list[tuple[Any, ...]]:
        """The parameter rows of ``_op_update_instances``, one per instance (updates merged)."""
        return [(u.id, u.status.value, rank(u.status), u.worker, u.dispatched_at, u.started_at, u.finished_at,
                 dumps(u.result), u.error) for u in merge_updates(updates)]

    _UPD_COLS = ("id", "st", "rnk", "worker", "dispatched_at", "started_at", "finished_at", "result", "error")
    _UPD_SETS = (("status", "u.st"),) + tuple(
        (c, f"COALESCE(u.{c}, instances.{c})")
        for c in ("worker", "dispatched_at", "started_at", "finished_at", "result", "error"))
    # Monotonic: only unfinished rows change, and only forward (a final status from anywhere).
    _UPD_WHERE = f"instances.status IN {SQL_UNFINISHED} AND u.rnk > {SQL_RANK}"

    def _op_update_instances(self, rows: list[tuple[Any, ...]]) -> Op[int]:
        changed = 0
        for part in chunks(rows):
            w = yield Stmt(self.dialect.update_join("instances", self._UPD_COLS, len(part), self._UPD_SETS,
                                                    self._UPD_WHERE), flat(part))
            changed += max(w.rowcount, 0)
        return changed

    async def get_instance(self, instance_id: int) -> InstanceRow | None:
        rows = await self._run("get_instance", lambda: self._op_query(
            f"SELECT {INST_COLS} FROM instances WHERE id = ?", (instance_id,)), tx=False)
        return row_to_instance(rows[0]) if rows else None

    async def list_instances(self, app: str, job_id: int | None = None,
                             statuses: Sequence[Status] | None = None, limit: int = 100) -> list[InstanceRow]:
        sql = f"SELECT {INST_COLS} FROM instances WHERE app = ?"
        params: list[Any] = [app]
        if job_id is not None:
            sql += " AND job_id = ?"
            params.append(job_id)
        if statuses is not None:
            if not statuses:
                return []
            sql += " AND status IN " + self.dialect.in_list(len(statuses))
            params.extend(Status(s).value for s in statuses)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        rows = await self._run("list_instances", lambda: self._op_query(sql, params), tx=False)
        return [row_to_instance(r) for r in rows]

    async def load_unfinished(self, app: str) -> list[InstanceRow]:
        rows = await self._run("load_unfinished", lambda: self._op_query(
            f"SELECT {INST_COLS} FROM instances WHERE app = ? AND status IN {SQL_UNFINISHED}"
            " ORDER BY planned_ms, id", (app,)), tx=False)
        return [row_to_instance(r) for r in rows]

    # ---- job logs --------------------------------------------------------------------------
    async def add_job_runs(self, runs: Sequence[JobRun], prune: Collection[int] = ()) -> None:
        if runs or prune:
            await self._run("add_job_runs", lambda: op_add_job_runs(self.dialect, runs, prune), tx=True)

    async def list_job_runs(self, job_id: int, limit: int = RUN_HISTORY) -> list[JobRun]:
        return await self._run("list_job_runs", lambda: op_list_job_runs(job_id, limit), tx=False)

    async def append_logs(self, lines: Sequence[LogLine]) -> None:
        rows = [(ln.instance_id, ln.ts, ln.level, ln.message) for ln in lines]
        if rows:
            await self._run("append_logs", lambda: self._op_append_logs(rows), tx=True)

    def _op_append_logs(self, rows: list[tuple[Any, ...]]) -> Op[None]:
        for part in chunks(rows):
            yield Stmt(self.dialect.insert("job_logs", ("instance_id", "ts", "level", "message"), len(part)),
                       flat(part))

    async def get_logs(self, instance_id: int, limit: int = 1000, offset: int = 0) -> list[LogLine]:
        rows = await self._run("get_logs", lambda: self._op_query(
            "SELECT instance_id, ts, level, message FROM job_logs WHERE instance_id = ? ORDER BY id LIMIT ? OFFSET ?",
            (instance_id, limit, max(offset, 0))), tx=False)
        return [LogLine(int(r[0]), float(r[1]), r[2], r[3]) for r in rows]

    # ---- the admin API ---------------------------------------------------------------------
    async def query_instances(self, app: str, *, job_id: int | None = None,
                              statuses: Sequence[Status] | None = None, since_ms: int | None = None,
                              until_ms: int | None = None, after: tuple[int, int] | None = None,
                              limit: int = 100) -> list[InstanceRow]:
        if statuses is not None and not statuses:
            return []
        sql, params = instance_page_query(app, job_id, statuses, since_ms, until_ms, after, limit, self.dialect)
        rows = await self._run("query_instances", lambda: self._op_query(sql, params), tx=False)
        return [row_to_instance(r) for r in rows]

    async def query_jobs(self, app: str, *, after: str = "", limit: int = 100, name_contains: str = "",
                         tag: str = "", enabled: bool | None = None) -> list[JobRow]:
        sql = f"SELECT {JOB_COLS} FROM jobs WHERE app = ? AND is_delete = 0 AND name > ?"
        params: list[Any] = [app, after]
        if name_contains:
            sql += " AND name LIKE ? ESCAPE '!'"
            params.append("%" + like_escape(name_contains) + "%")
        if tag:  # tags are stored as a JSON array of strings: the quoted tag is in its text
            sql += " AND tags LIKE ? ESCAPE '!'"
            params.append("%" + like_escape(dumps(tag) or "") + "%")
        if enabled is not None:
            sql += " AND enabled = ?"
            params.append(int(enabled))
        sql += " ORDER BY name LIMIT ?"
        params.append(max(limit, 0))
        rows = await self._run("query_jobs", lambda: self._op_query(sql, params), tx=False)
        return [job for job in map(row_to_job, rows) if not tag or tag in job.tags]

    async def job_outcomes(self, app: str, job_ids: Collection[int], since_ms: int) -> dict[int, dict[str, int]]:
        ids = sorted(set(job_ids))
        out: dict[int, dict[str, int]] = {}
        for part in chunks(ids):
            sql = ("SELECT job_id, status, COUNT(*) FROM instances WHERE app = ? AND planned_ms >= ? AND job_id IN "
                   + self.dialect.in_list(len(part)) + " GROUP BY job_id, status")
            rows = await self._run("job_outcomes", functools.partial(self._op_query, sql, (app, since_ms, *part)),
                                   tx=False)
            for job_id, status, n in rows:
                out.setdefault(int(job_id), {})[str(status)] = int(n)
        return out

    async def count_unfinished(self, app: str) -> dict[str, int]:
        rows = await self._run("count_unfinished", lambda: self._op_query(
            f"SELECT status, COUNT(*) FROM instances WHERE app = ? AND status IN {SQL_UNFINISHED} GROUP BY status",
            (app,)), tx=False)
        return {str(status): int(n) for status, n in rows}

    async def job_names(self, app: str, job_ids: Collection[int]) -> dict[int, str]:
        ids = sorted(set(job_ids))
        names: dict[int, str] = {}
        for part in chunks(ids):
            sql = "SELECT id, name FROM jobs WHERE app = ? AND id IN " + self.dialect.in_list(len(part))
            rows = await self._run("job_names", functools.partial(self._op_query, sql, (app, *part)), tx=False)
            names.update((int(r[0]), r[1]) for r in rows)
        return names

    async def instance_counts(self, app: str, since_ms: int, until_ms: int,
                              bucket_ms: int) -> list[tuple[int, str, int]]:
        return await self._run(
            "instance_counts", lambda: op_instance_counts(self.dialect, app, since_ms, until_ms, bucket_ms), tx=False)

    async def lateness_sample(self, app: str, since_ms: int, until_ms: int, limit: int) -> list[float]:
        return await self._run("lateness_sample", lambda: op_lateness_sample(app, since_ms, until_ms, limit),
                               tx=False)

    async def add_token(self, token: TokenRow) -> None:
        sql = self.dialect.insert("api_tokens", TOKEN_COLS, 1)
        await self._run("add_token", lambda: self._op_exec(sql, token_values(token)), tx=False)

    async def get_token(self, token_id: str) -> TokenRow | None:
        rows = await self._run("get_token", lambda: self._op_query(TOKEN_SELECT + " WHERE id = ?", (token_id,)),
                               tx=False)
        return row_to_token(rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRow]:
        rows = await self._run("list_tokens", lambda: self._op_query(TOKEN_SELECT + " ORDER BY created_at, id"),
                               tx=False)
        return [row_to_token(r) for r in rows]

    async def revoke_token(self, token_id: str, now: float) -> bool:
        n = await self._run("revoke_token", lambda: self._op_exec(
            "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, token_id)), tx=False)
        return n > 0

    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        for part in chunks(entries):
            await self._run("add_audit", functools.partial(op_add_audit, self.dialect, part), tx=False)

    async def list_audit(self, *, app: str | None = None, before_id: int | None = None,
                         limit: int = 100) -> list[AuditEntry]:
        sql, params = newest_first("audit_log", AUDIT_COLS, app, before_id, limit)
        rows = await self._run("list_audit", lambda: self._op_query(sql, params), tx=False)
        return [row_to_audit(r) for r in rows]

    async def add_ownership_change(self, change: OwnershipChange) -> None:
        c = change
        sql = self.dialect.insert("app_history", HISTORY_COLS, 1)
        await self._run("add_ownership_change", lambda: self._op_exec(
            sql, (c.app, c.from_server, c.to_server, c.epoch, c.reason, c.ts)), tx=False)

    async def list_ownership_changes(self, *, app: str | None = None, before_id: int | None = None,
                                     limit: int = 100) -> list[OwnershipChange]:
        sql, params = newest_first("app_history", HISTORY_COLS, app, before_id, limit)
        rows = await self._run("list_ownership_changes", lambda: self._op_query(sql, params), tx=False)
        return [row_to_change(r) for r in rows]

    async def add_alarms(self, alarms: Sequence[AlarmRow]) -> None:
        if alarms:
            await self._run("add_alarms", lambda: op_add_alarms(self.dialect, alarms), tx=True)

    async def claim_alarms(self, server_id: str, apps: Collection[str], now: float, lease: float,
                           limit: int, *, webhooks: Collection[str] | None = None) -> list[AlarmRow]:
        owned = frozenset(apps)
        return await self._run("claim_alarms", lambda: op_claim_alarms(self.dialect, server_id, owned, now, lease,
                                                                        limit, webhooks), tx=True)

    async def finish_alarm(self, alarm_id: int, now: float, delivered: bool, next_attempt_at: float,
                           error: str | None, claimed_by: str) -> None:
        await self._run("finish_alarm", lambda: op_finish_alarm(alarm_id, now, delivered, next_attempt_at, error,
                                                                claimed_by), tx=False)

    async def prune_instances(self, app: str, before_ms: int, limit: int) -> int:
        """Their log lines first, a bounded number per transaction (an instance may have thousands), then
        the instances: no transaction holds the database long. A crash between leaves instances with
        fewer lines, never lines without an instance for long (the next pass finds the instances again)."""
        ids = await self._run("prune_instances", lambda: op_old_instances(app, before_ms, limit), tx=False)
        for part in chunks(ids, 100):
            while await self._run("prune_logs", functools.partial(op_delete_logs_of, self.dialect, part, 2000),
                                  tx=True) == 2000:
                pass
        if ids:
            await self._run("prune_instances", lambda: op_delete_instances(self.dialect, ids), tx=True)
        return len(ids)

    async def prune_older(self, table: str, before: float, limit: int) -> int:
        return await self._run(f"prune_{table}", lambda: op_prune_older(self.dialect, table, before, limit), tx=True)

    async def reserve_idempotency_key(self, app: str, key: str, now: float) -> tuple[bool, int | None]:
        return await self._run("reserve_idempotency_key", lambda: op_reserve_key(self.dialect, app, key, now),
                               tx=True)

    async def settle_idempotency_key(self, app: str, key: str, instance_id: int | None) -> None:
        await self._run("settle_idempotency_key", lambda: op_settle_key(app, key, instance_id), tx=False)

    # ---- sub-tasks -------------------------------------------------------------------------------
    async def add_task_batches(self, batches: Sequence[TaskBatch]) -> dict[str, TaskBatch]:
        if not batches:
            return {}
        return await self._run("add_task_batches", lambda: op_add_task_batches(self.dialect, batches), tx=True)

    async def save_task_batches(self, batches: Sequence[TaskBatch]) -> None:
        if batches:
            await self._run("save_task_batches", lambda: op_save_task_batches(batches), tx=True)

    async def list_task_batches(self, root: str, *, parent: str | None = None, call: int | None = None,
                                after_key: str = "", limit: int = 1000) -> list[TaskBatch]:
        return await self._run("list_task_batches",
                               lambda: op_list_task_batches(root, parent, call, after_key, limit), tx=False)

    async def task_progress(self, roots: Collection[str]) -> dict[str, tuple[int, int, int]]:
        if not roots:
            return {}
        return await self._run("task_progress", lambda: op_task_progress(self.dialect, roots), tx=False)
