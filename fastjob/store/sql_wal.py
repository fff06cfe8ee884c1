"""The claim: the one transaction that writes a scan's fires to the WAL and advances their jobs.

It is the store's hot path (10,000 per-second jobs make 10,000 rows a second), so it reads only
the columns a planner needs, writes fires in chunks (one JSON parameter per chunk where the
database has JSON_TABLE) and learns the new rows' ids without reading them back when it can.
"""
from __future__ import annotations

from typing import Any

from ..models import InstanceRow, Status
from .base import FirePlanner
from .codecs import (
    CLAIM_COLS,
    DUE_ORDER,
    FIRE_COLS,
    FIRST_ATTEMPT,
    INST_COLS,
    SHARED_COLS,
    SKIPPED_COLS,
    claim_job,
    json_ints,
    load_json,
    row_to_instance,
)
from .sql_runner import Attempts, SQLRunner
from .statements import CHUNK_ROWS, JSON_CHUNK_ROWS, Op, Stmt, chunks, flat


def op_due_jobs(store: SQLRunner, app: str, horizon_ms: int, limit: int, excl: tuple[str, ...]) -> Op[list[Any]]:
    """The CLAIM_COLS rows of the app's due jobs, by (next_trigger_ms, id), at most ``limit``."""
    sql = (f"SELECT {CLAIM_COLS} FROM jobs WHERE app = ? AND enabled = 1 AND is_delete = 0"
           " AND next_trigger_ms IS NOT NULL AND next_trigger_ms <= ?")
    params: list[Any] = [app, horizon_ms]
    if excl:
        sql += " AND schedule_type NOT IN " + store.dialect.in_list(len(excl))
        params.extend(excl)
    sql += " ORDER BY next_trigger_ms, id LIMIT ?"
    params.append(limit)
    if store.json_rows:
        r = yield Stmt(f"SELECT COUNT(*), JSON_ARRAYAGG(JSON_ARRAY({CLAIM_COLS})) FROM ({sql}) AS due", params)
        count, text = r.rows[0]
        try:
            rows = [] if not count else load_json(text)
        except (TypeError, ValueError):
            rows = None  # NULL or cut short: larger than group_concat_max_len (MariaDB)
        if rows is not None and len(rows) == count:
            rows.sort(key=DUE_ORDER)  # an aggregate's order is not guaranteed
            return rows
    r = yield Stmt(sql, params)
    return r.rows

def op_claim_due(store: SQLRunner, fence: Op[None], state: Attempts, server_id: str, app: str, epoch: int,
                 horizon_ms: int, planner: FirePlanner, now: float, limit: int,
                 excl: tuple[str, ...]) -> Op[list[InstanceRow]]:
    """Fence, read the due jobs, plan each, write their fires (runs, catch-ups, skipped) and
    advance the jobs; the rows written waiting are returned (also those of an earlier attempt
    whose commit we did not hear about)."""
    yield from fence
    out: list[InstanceRow] = []
    if state.tried_insert:
        # An earlier attempt may have committed without us hearing back: its rows carry
        # our (server, epoch, created_at) and belong in the answer.
        r = yield Stmt(f"SELECT {INST_COLS} FROM instances WHERE app = ? AND server = ? AND epoch = ?"
                       " AND created_at = ? AND trigger_kind IN ('schedule', 'catch_up') AND status = ?"
                       " ORDER BY id", (app, server_id, epoch, now, Status.WAITING.value))
        out.extend(row_to_instance(x) for x in r.rows)
    if limit <= 0:
        return out
    due = yield from op_due_jobs(store, app, horizon_ms, limit, excl)

    # Scheduled fires are written with params NULL: the job's params apply (see
    # Store.claim_due), so they are neither read, decoded nor copied here.
    fires: list[tuple[int, int]] = []  # (job_id, planned_ms)
    catch_ups: list[tuple[int, int]] = []
    skips: list[tuple[int, int, str]] = []  # (job_id, planned_ms, reason)
    advances: list[tuple[int, int, int | None]] = []
    budget = limit
    for jr in due:
        if budget <= 0:
            break
        job = claim_job(app, jr)
        plan = planner(job, horizon_ms, budget)
        job_id = job.id
        fires.extend([(job_id, t) for t in plan.runs])
        if plan.catch_up:
            catch_ups.extend((job_id, t) for t in plan.catch_up)
        if plan.skipped:
            skips.extend((job_id, t, reason) for t, reason in plan.skipped)
        budget -= len(plan)
        advances.append((job_id, job.version, plan.next_ms))
    if not advances:
        return out

    state.tried_insert = True
    if fires:
        yield from op_insert_fires(store, app, server_id, epoch, now, fires, "schedule", out)
    if catch_ups:
        yield from op_insert_fires(store, app, server_id, epoch, now, catch_ups, "catch_up", out)
    if skips:
        shared = (app, FIRST_ATTEMPT, Status.SKIPPED.value, "schedule", server_id, epoch, now, now)
        for skipped in chunks(skips):
            yield Stmt(store.dialect.insert("instances", SKIPPED_COLS, len(skipped), ignore=True),
                       [v for row in skipped for v in (*row, *shared)])

    # Move next_trigger_ms in one statement per chunk. The version guard leaves a job alone
    # if a user changed it since we read it (MySQL; SQLite writers are serialised anyway).
    d = store.dialect
    jt = store.json_table
    sql_sets = (("next_trigger_ms", "u.nt"),)
    cols, where = ("id", "ver", "nt"), "jobs.version = u.ver"
    for part in chunks(advances, JSON_CHUNK_ROWS if jt else CHUNK_ROWS):
        if jt:
            yield Stmt(d.update_join_json("jobs", cols, sql_sets, where), (json_ints(part),))
        else:
            yield Stmt(d.update_join("jobs", cols, len(part), sql_sets, where), flat(part))
    return out

def op_insert_fires(store: SQLRunner, app: str, server_id: str, epoch: int, now: float, fires: list[tuple[int, int]],
                     trigger: str, out: list[InstanceRow]) -> Op[None]:
    """Write ``waiting`` rows of (job_id, planned_ms) and append those that went in to ``out``."""
    waiting = Status.WAITING
    # Every column but job_id and planned_ms is the same in all rows of a claim.
    shared = (app, FIRST_ATTEMPT, waiting.value, trigger, None, server_id, epoch, now)
    d = store.dialect
    jt = store.json_table
    returning = d.returning and not store.consecutive_ids
    for part in chunks(fires, JSON_CHUNK_ROWS if jt else CHUNK_ROWS):
        if jt:
            w = yield Stmt(d.insert_shared_json("instances", FIRE_COLS, SHARED_COLS),
                           [*shared, json_ints(part)])
        else:
            w = yield Stmt(d.insert_shared("instances", FIRE_COLS, SHARED_COLS, len(part),
                                           returning="id, job_id, planned_ms" if returning else None),
                           d.shared_params(part, shared))
        # Which rows went in (a fire already recorded is skipped): (id, job_id, planned_ms).
        if returning:
            got = w.rows
        else:
            first = d.first_inserted_id(w.lastrowid, len(part), max((x.id for x in out), default=0))
            if w.rowcount <= 0:
                got = []
            elif w.rowcount == len(part) and store.consecutive_ids:
                got = [(first + i, j, pms) for i, (j, pms) in enumerate(part)]
            else:
                # Every instance write of the app is fenced and the fence serialises them, so
                # the app's rows from this statement's first id on, with its stamp and trigger,
                # are this statement's. ``first`` is only a lower bound (SQLite's lastrowid is
                # the last row that went in): without the stamp an older row (say one recorded
                # skipped) above it would be reported as a fire just written.
                g = yield Stmt("SELECT id, job_id, planned_ms FROM instances WHERE app = ? AND id >= ?"
                               " AND created_at = ? AND trigger_kind = ? ORDER BY id", (app, first, now, trigger))
                got = g.rows
        out.extend(InstanceRow(i, j, app, pms, FIRST_ATTEMPT, waiting, trigger, None, server_id,
                               epoch, None, now) for i, j, pms in got)
