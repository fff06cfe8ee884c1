"""Writing a batch of job declarations in one transaction (Store.declare_jobs, Store.upsert_job).

A worker with 100,000 jobs declares them at every registration, nearly always unchanged. So a
batch reads, per :data:`~.statements.CHUNK_ROWS` names, only the head of each stored job (its
id, version, state and :func:`~.codecs.spec_digest`); the definition itself is read only for
jobs whose digest differs (a row written before digests gets its digest then, if it is
unchanged). New jobs go in multi-row INSERTs and come back as rows built from
what was written (only their ids are read); a changed job costs an UPDATE of its own (guarded
by its version, so a concurrent change makes the transaction start over) and is read back.
What each declaration does is decided by :func:`~.job_writes.plan_write`, shared with the
in-memory store.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..models import JobRow, JobSpec, Origin
from .codecs import ENABLED, JOB_COLS, LATER_COLS, SPEC_COLS, row_to_job, spec_digest, spec_values
from .dialect import Dialect
from .job_writes import JobWrite, StoredJob, plan_write
from .statements import CHUNK_ROWS, Op, RetryTx, Stmt, chunks, flat

#: Columns of a new job's row: SPEC_COLS and what the store adds.
INSERT_COLS = ("app", "name") + SPEC_COLS + ("origin", "paused_by", "next_trigger_ms", "anchor_ms", "spec_digest",
                                             "created_time", "updated_time", "is_delete", "version")
#: New rows per INSERT: their parameters stay under SQLite's 32766 variables.
INSERT_ROWS = 500
assert INSERT_ROWS * len(INSERT_COLS) < 32766
_UPDATE_SETS = ", ".join(f"{c} = ?" for c in SPEC_COLS)
#: The JOB_COLS between ``name`` and ``next_trigger_ms`` are SPEC_COLS but the derived
#: ``allow_overlap`` and ``interval``: a new job's row is built from what was inserted.
_DERIVED = slice(SPEC_COLS.index("allow_overlap"), SPEC_COLS.index("`interval`") + 1)
#: The LATER_COLS (declared fields added after the store's own columns), last of SPEC_COLS, are
#: the last of JOB_COLS too (the model's order: they came last).
_LATER = len(SPEC_COLS) - len(LATER_COLS)
assert [c.strip() for c in JOB_COLS.split(",")[3:19]] == [*SPEC_COLS[:_DERIVED.start], *SPEC_COLS[_DERIVED.stop:_LATER]]
assert [c.strip() for c in JOB_COLS.split(",")[19:]] == [
    "next_trigger_ms", "created_time", "updated_time", "last_finished_time", "is_delete", "version", "stats",
    "origin", "paused_by", "anchor_ms", *SPEC_COLS[_LATER:]]


@dataclass(slots=True)
class _Head:
    """What is read of every declared name that is stored."""

    id: int
    version: int
    is_delete: bool
    origin: str
    paused_by: str | None
    enabled: bool
    digest: str | None

    def stored(self, values: tuple[Any, ...]) -> StoredJob:
        return StoredJob(self.id, self.version, self.is_delete, self.origin, self.paused_by, values)


def op_declare_jobs(dialect: Dialect, app: str, specs: Sequence[JobSpec], origin: Origin,
                    first_fire: Callable[[JobSpec], int | None], now: float,
                    read_unchanged: bool = False) -> Op[list[JobRow]]:
    """Write the declarations; return the rows written (all of ``specs`` if ``read_unchanged``)."""
    declared = {spec.name: spec_values(spec) for spec in specs}
    digests = {name: spec_digest(values) for name, values in declared.items()}
    heads = yield from _read_heads(app, list(declared))
    definitions = yield from _read_definitions(
        app, [name for name, head in heads.items() if head.digest != digests[name]])
    anchor_ms = int(now * 1000)
    new_rows: list[tuple[Any, ...]] = []
    updated: list[str] = []
    for spec in specs:
        values, head = declared[spec.name], heads.get(spec.name)
        old = None if head is None else head.stored(
            definitions.get(spec.name) or values[:ENABLED] + (int(head.enabled),) + values[ENABLED + 1:])
        write = plan_write(old, values, origin)
        if write is None:
            if head is not None and head.digest != digests[spec.name]:  # a row of before digests: note it
                yield Stmt("UPDATE jobs SET spec_digest = ? WHERE id = ? AND version = ?",
                           (digests[spec.name], head.id, head.version))  # not if it changed since we read it
            continue
        next_ms = first_fire(spec) if write.new_next else None
        if old is None:
            new_rows.append((app, spec.name) + write.values + (
                write.origin, write.paused_by, next_ms, anchor_ms, digests[spec.name], now, now, 0, 1))
        else:
            yield from _update(old, write, next_ms, anchor_ms, digests[spec.name], now)
            updated.append(spec.name)
    for chunk in chunks(new_rows, INSERT_ROWS):
        result = yield Stmt(dialect.insert("jobs", INSERT_COLS, len(chunk), ignore=True), flat(chunk))
        if result.rowcount != len(chunk):
            raise RetryTx()  # a concurrent declaration created one of them: redo, as updates
    rows = yield from _inserted_rows(app, new_rows)
    inserted = {row.name for row in rows}
    again = [name for name in declared if name not in inserted] if read_unchanged else updated
    rows.extend((yield from _read_rows(app, again)))
    return rows


def _in_names(cols: str, chunk: Sequence[str]) -> str:
    return f"SELECT {cols} FROM jobs WHERE app = ? AND name IN ({','.join('?' * len(chunk))})"


def _read_heads(app: str, names: Sequence[str]) -> Op[dict[str, _Head]]:
    heads: dict[str, _Head] = {}
    for chunk in chunks(names, CHUNK_ROWS):
        result = yield Stmt(_in_names("name, id, version, is_delete, origin, paused_by, enabled, spec_digest", chunk),
                            (app, *chunk))
        for r in result.rows:
            heads[r[0]] = _Head(r[1], r[2], bool(r[3]), r[4], r[5], bool(r[6]), r[7])
    return heads


def _read_definitions(app: str, names: Sequence[str]) -> Op[dict[str, tuple[Any, ...]]]:
    """The SPEC_COLS of jobs whose stored digest differs from the declared one (or is NULL)."""
    definitions: dict[str, tuple[Any, ...]] = {}
    for chunk in chunks(names, CHUNK_ROWS):
        result = yield Stmt(_in_names("name, " + ", ".join(SPEC_COLS), chunk), (app, *chunk))
        for row in result.rows:
            definitions[row[0]] = tuple(row[1:])
    return definitions


def _update(old: StoredJob, write: JobWrite, next_ms: int | None, anchor_ms: int, digest: str,
            now: float) -> Op[None]:
    """Only a new next fire is written: the stored one may be moving (the owner's claims advance it)."""
    new_next = ", next_trigger_ms = ?, anchor_ms = ?" if write.new_next else ""
    result = yield Stmt(
        f"UPDATE jobs SET {_UPDATE_SETS}, origin = ?, paused_by = ?, spec_digest = ?{new_next}, is_delete = 0,"
        " updated_time = ?, version = version + 1 WHERE id = ? AND version = ?",
        write.values + (write.origin, write.paused_by, digest) + ((next_ms, anchor_ms) if write.new_next else ())
        + (now, old.id, old.version))
    if result.rowcount != 1:
        raise RetryTx()  # changed under us: read and compare again


def _inserted_rows(app: str, new_rows: list[tuple[Any, ...]]) -> Op[list[JobRow]]:
    """The new jobs as read back would give them, from their INSERT_COLS values and their ids."""
    ids: dict[str, int] = {}
    for chunk in chunks([row[1] for row in new_rows], CHUNK_ROWS):
        result = yield Stmt(_in_names("name, id", chunk), (app, *chunk))
        ids.update((r[0], r[1]) for r in result.rows)
    spec_at = len(("app", "name"))
    head = slice(spec_at, spec_at + _DERIVED.start)
    tail = slice(spec_at + _DERIVED.stop, spec_at + _LATER)
    later = slice(spec_at + _LATER, spec_at + len(SPEC_COLS))
    rest = later.stop  # origin, paused_by, next_trigger_ms, anchor_ms, spec_digest, created, updated
    return [row_to_job((ids[row[1]], app, row[1]) + row[head] + row[tail] + (
        row[rest + 2], row[rest + 5], row[rest + 6], None, 0, 1, None, row[rest], row[rest + 1], row[rest + 3],
        *row[later])) for row in new_rows]


def _read_rows(app: str, names: Sequence[str]) -> Op[list[JobRow]]:
    rows: list[JobRow] = []
    for chunk in chunks(names, CHUNK_ROWS):
        result = yield Stmt(_in_names(JOB_COLS, chunk), (app, *chunk))
        rows.extend(row_to_job(row) for row in result.rows)
    return rows
