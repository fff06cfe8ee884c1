"""Sub-task batches on SQL (Store.add_task_batches and the rest): ctx.map slices, broadcast
sub-runs and workflow steps, one row per batch with its items and results as JSON."""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from ..models import FINAL_TASK_STATUSES, TaskBatch
from .codecs import dumps, loads
from .dialect import Dialect
from .statements import Op, Stmt, chunks, flat

#: The columns a batch is written with (``id`` is the table's own).
BATCH_COLS = ("batch_key", "app", "root", "parent", "call_no", "start_index", "size", "handler", "items", "status",
              "parent_attempt", "attempt", "worker", "results", "errors", "failed", "extra", "logs", "created_at",
              "finished_at")
#: The columns the owner changes while a batch runs (save_task_batches).
SAVED_COLS = ("status", "parent_attempt", "attempt", "worker", "results", "errors", "failed", "logs", "finished_at")
#: Batches per INSERT (20 parameters each) and keys per SELECT.
INSERT_ROWS = 200
_SELECT = "SELECT " + ", ".join(BATCH_COLS) + " FROM task_batches"
_FINAL = "(" + ", ".join(f"'{s}'" for s in sorted(FINAL_TASK_STATUSES)) + ")"


def _row(b: TaskBatch) -> tuple[Any, ...]:
    return (b.key, b.app, b.root, b.parent, b.call, b.start, b.size, b.handler, dumps(b.items), b.status,
            b.parent_attempt, b.attempt, b.worker, dumps(b.results), dumps(b.errors), len(b.errors or ()),
            dumps(b.extra), dumps(b.logs), b.created_at, b.finished_at)


def _batch(r: Sequence[Any]) -> TaskBatch:
    return TaskBatch(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), r[7], loads(r[8]), r[9], int(r[10]), int(r[11]),
                     r[12], loads(r[13]), loads(r[14]), loads(r[16]), loads(r[17]), float(r[18]),
                     None if r[19] is None else float(r[19]))


def op_add_task_batches(dialect: Dialect, batches: Sequence[TaskBatch]) -> Op[dict[str, TaskBatch]]:
    stored: dict[str, TaskBatch] = {}
    keys = [b.key for b in batches]
    for part in chunks(keys, INSERT_ROWS):
        found = yield Stmt(f"{_SELECT} WHERE batch_key IN {dialect.in_list(len(part))}", part)
        stored.update((r[0], _batch(r)) for r in found.rows)
    new = [_row(b) for b in batches if b.key not in stored]
    for rows in chunks(new, INSERT_ROWS):
        yield Stmt(dialect.insert("task_batches", BATCH_COLS, len(rows), ignore=True), flat(rows))
    return stored


def op_save_task_batches(batches: Sequence[TaskBatch]) -> Op[None]:
    sets = ", ".join(f"{c} = ?" for c in SAVED_COLS)
    for b in batches:
        yield Stmt(f"UPDATE task_batches SET {sets} WHERE batch_key = ?",
                   (b.status, b.parent_attempt, b.attempt, b.worker, dumps(b.results), dumps(b.errors),
                    len(b.errors or ()), dumps(b.logs), b.finished_at, b.key))


def op_list_task_batches(root: str, parent: str | None, call: int | None, after_key: str,
                         limit: int) -> Op[list[TaskBatch]]:
    where = ["root = ?"]
    params: list[Any] = [root]
    if parent is not None:
        where.append("parent = ?")
        params.append(parent)
    if call is not None:
        where.append("call_no = ?")
        params.append(call)
    if after_key:
        where.append("id > (SELECT id FROM task_batches WHERE batch_key = ?)")
        params.append(after_key)
    found = yield Stmt(f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                       (*params, max(0, min(limit, 10_000))))
    return [_batch(r) for r in found.rows]


def op_task_progress(dialect: Dialect, roots: Collection[str]) -> Op[dict[str, tuple[int, int, int]]]:
    out: dict[str, tuple[int, int, int]] = {}
    for part in chunks(sorted(roots)):
        found = yield Stmt(
            f"SELECT root, SUM(size), SUM(CASE WHEN status IN {_FINAL} THEN size ELSE 0 END), SUM(failed)"
            f" FROM task_batches WHERE root IN {dialect.in_list(len(part))} GROUP BY root", part)
        out.update((r[0], (int(r[1] or 0), int(r[2] or 0), int(r[3] or 0))) for r in found.rows)
    return out
