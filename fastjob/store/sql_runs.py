"""The run history of second-level jobs on SQL (Store.add_job_runs, Store.list_job_runs)."""
from __future__ import annotations

from collections.abc import Collection, Sequence

from ..models import RUN_HISTORY, JobRun
from .codecs import dumps, loads
from .dialect import Dialect
from .statements import Op, Stmt, chunks, flat

RUN_COLS = ("job_id", "app", "worker", "planned_at", "started_at", "duration", "status", "error", "logs")
#: Runs per INSERT (9 parameters each).
INSERT_ROWS = 500


def op_add_job_runs(dialect: Dialect, runs: Sequence[JobRun], prune: Collection[int]) -> Op[None]:
    rows = [(r.job_id, r.app, r.worker, r.planned_at, r.started_at, r.duration, r.status, r.error,
             dumps(r.logs) if r.logs else None) for r in runs]
    for part in chunks(rows, INSERT_ROWS):
        yield Stmt(dialect.insert("job_runs", RUN_COLS, len(part)), flat(part))
    for job_id in sorted(set(prune)):
        newest_dropped = yield Stmt("SELECT id FROM job_runs WHERE job_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                                    (job_id, RUN_HISTORY))
        if newest_dropped.rows:
            yield Stmt("DELETE FROM job_runs WHERE job_id = ? AND id <= ?", (job_id, newest_dropped.rows[0][0]))


def op_list_job_runs(job_id: int, limit: int) -> Op[list[JobRun]]:
    result = yield Stmt(f"SELECT {', '.join(RUN_COLS)}, id FROM job_runs WHERE job_id = ? ORDER BY id DESC LIMIT ?",
                        (job_id, max(limit, 0)))
    return [JobRun(int(r[0]), r[1], r[2], float(r[3]), float(r[4]), float(r[5]), r[6], r[7], loads(r[8]) or [],
                   int(r[9])) for r in result.rows]
