"""Writing a batch of job declarations in one transaction (Store.declare_jobs, Store.upsert_job).

A worker with 100,000 jobs declares them at every registration, nearly always unchanged, so the
batch is one SELECT per :data:`~.statements.CHUNK_ROWS` names and one multi-row INSERT per chunk of
new jobs; only a changed job costs an UPDATE of its own (guarded by its version, so a concurrent
change makes the transaction start over). What each declaration does is decided by
:func:`~.job_writes.plan_write`, shared with the in-memory store.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..models import JobRow, JobSpec, Origin
from .codecs import JOB_COLS, SPEC_COLS, row_to_job, spec_values
from .dialect import Dialect
from .job_writes import STORED_HEAD, JobWrite, StoredJob, plan_write
from .statements import CHUNK_ROWS, Op, RetryTx, Stmt, chunks, flat

#: Columns of a new job's row: SPEC_COLS and what the store adds.
INSERT_COLS = ("app", "name") + SPEC_COLS + ("origin", "paused_by", "next_trigger_ms", "created_time",
                                             "updated_time", "is_delete", "version")
#: New rows per INSERT: 27 parameters a row stays under SQLite's 32766 variables.
INSERT_ROWS = 500
_UPDATE_SETS = ", ".join(f"{c} = ?" for c in SPEC_COLS)


def op_declare_jobs(dialect: Dialect, app: str, specs: Sequence[JobSpec], origin: Origin,
                    first_fire: Callable[[JobSpec], int | None], now: float,
                    read_unchanged: bool = False) -> Op[list[JobRow]]:
    """Write the declarations; return the rows written (all of ``specs`` if ``read_unchanged``)."""
    stored = yield from _read_stored(app, [spec.name for spec in specs])
    new_rows: list[tuple[object, ...]] = []
    written: list[str] = []
    for spec in specs:
        old = stored.get(spec.name)
        write = plan_write(old, spec_values(spec), origin)
        if write is None:
            continue
        written.append(spec.name)
        next_ms = first_fire(spec) if write.new_next else None
        if old is None:
            new_rows.append((app, spec.name) + write.values + (write.origin, write.paused_by, next_ms, now, now, 0, 1))
        else:
            yield from _update(old, write, next_ms, now)
    for chunk in chunks(new_rows, INSERT_ROWS):
        result = yield Stmt(dialect.insert("jobs", INSERT_COLS, len(chunk), ignore=True), flat(chunk))
        if result.rowcount != len(chunk):
            raise RetryTx()  # a concurrent declaration created one of them: redo, as updates
    wanted = [spec.name for spec in specs] if read_unchanged else written
    return (yield from _read_rows(app, wanted))


def _read_stored(app: str, names: Sequence[str]) -> Op[dict[str, StoredJob]]:
    cols = ", ".join(STORED_HEAD + SPEC_COLS)
    stored: dict[str, StoredJob] = {}
    for chunk in chunks(names, CHUNK_ROWS):
        result = yield Stmt(f"SELECT name, {cols} FROM jobs WHERE app = ? AND name IN ({','.join('?' * len(chunk))})",
                            (app, *chunk))
        for row in result.rows:
            stored[row[0]] = StoredJob.from_row(tuple(row[1:]))
    return stored


def _update(old: StoredJob, write: JobWrite, next_ms: int | None, now: float) -> Op[None]:
    """Only a new next fire is written: the stored one may be moving (the owner's claims advance it)."""
    new_next = ", next_trigger_ms = ?" if write.new_next else ""
    result = yield Stmt(
        f"UPDATE jobs SET {_UPDATE_SETS}, origin = ?, paused_by = ?{new_next}, is_delete = 0,"
        " updated_time = ?, version = version + 1 WHERE id = ? AND version = ?",
        write.values + (write.origin, write.paused_by) + ((next_ms,) if write.new_next else ())
        + (now, old.id, old.version))
    if result.rowcount != 1:
        raise RetryTx()  # changed under us: read and compare again


def _read_rows(app: str, names: Sequence[str]) -> Op[list[JobRow]]:
    rows: list[JobRow] = []
    for chunk in chunks(names, CHUNK_ROWS):
        result = yield Stmt(f"SELECT {JOB_COLS} FROM jobs WHERE app = ? AND name IN ({','.join('?' * len(chunk))})",
                            (app, *chunk))
        rows.extend(row_to_job(row) for row in result.rows)
    return rows
