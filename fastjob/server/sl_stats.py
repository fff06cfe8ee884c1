"""What workers report of second-level jobs: totals that survive reconnects and failovers, and
a sampled run history.

Counts in an SL_REPORT are cumulative since that worker took the job (the report's ``since``).
The job's stored ``stats`` hold totals over every runner: the counts of the current runner
added to a ``base``, the totals when it took over. A report from the same runner (worker and
``since``) keeps the base; one from a new runner first folds the totals into the base. Runner
and base are stored with the totals, so a server that takes the app over counts on, and a
report that arrives twice, or a stats write that lags, counts nothing twice.

The run history (models.JobRun) is sampled so that a 0.2 s job does not write five rows a
second: every failed run and every run that logged (at most :data:`NOTABLE_PER_WRITE` per job
per write, the latest kept), and one plain successful run per :data:`SUCCESS_SAMPLE_EVERY`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..context import RUN_LOG_CHARS, RUN_LOG_LINES
from ..models import FINAL_STATUSES, JobRow, JobRun, Status
from ..store import Store, StoreError
from ..tasks import BackgroundTasks
from .metrics import Metrics

log = logging.getLogger("fastjob.second_level")

_RUN_STATUSES = frozenset(status.value for status in FINAL_STATUSES)
#: Characters of a run's error kept in its history.
MAX_ERROR = 2000
#: The counts a report gives since ``since``, and the stored stats hold in total.
COUNTERS = ("runs", "failures", "skipped")
#: A plain successful run enters the history at most this often per job (seconds of its start).
SUCCESS_SAMPLE_EVERY = 60.0
#: Failed or logging runs kept per job between two writes (a flood keeps the latest).
NOTABLE_PER_WRITE = 10
#: Runs added to a job's history between two prunes of it (so it holds at most
#: models.RUN_HISTORY + PRUNE_EVERY rows, and a write prunes few jobs).
PRUNE_EVERY = 20


def merge_report(previous: dict[str, Any] | None, report: dict[str, Any], worker: str) -> dict[str, Any]:
    """The job's stats after ``report`` from ``worker``: its latest figures, with totals."""
    previous = previous or {}
    runner = [worker, report.get("since")]
    if previous.get("runner") == runner:
        base = previous.get("base") or {}
    elif "runner" not in previous:  # none yet, or stats of before totals (one runner's own counts): start at 0
        base = {}
    else:  # a new runner: what was counted so far is its base
        base = {name: int(previous.get(name) or 0) for name in COUNTERS}
    merged = {key: value for key, value in report.items() if key not in ("sampled", "job_id")}
    for name in COUNTERS:
        merged[name] = int(base.get(name) or 0) + int(report.get(name) or 0)
    for name in ("last_run_at", "last_error"):  # a new runner has none yet: keep the job's
        if merged.get(name) is None:
            merged[name] = previous.get(name)
    merged["runner"], merged["base"] = runner, base
    return merged


def run_from_wire(job: JobRow, worker: str, run: dict[str, Any]) -> JobRun | None:
    """A reported run as stored, bounded as a worker bounds it (context.RUN_LOG_*); None for one
    no column can hold (an unknown status, a time that is not finite)."""
    times = (float(run["planned_at"]), float(run["started_at"]), float(run["duration"]))
    if run["status"] not in _RUN_STATUSES or not all(math.isfinite(t) for t in times):
        return None
    error = run.get("error")
    logs = [[float(ts), str(level)[:16], str(text)[:RUN_LOG_CHARS]]
            for ts, level, text in (run.get("logs") or [])[:RUN_LOG_LINES] if math.isfinite(float(ts))]
    return JobRun(job.id, job.app, worker, *times, run["status"], None if error is None else str(error)[:MAX_ERROR],
                  logs)


class SecondLevelStats:
    """Totals and sampled runs of the second-level jobs of the apps this server owns, written
    every ``interval`` seconds (a row per job, not one per report)."""

    def __init__(self, store: Store, tasks: BackgroundTasks, interval: float, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.tasks = tasks
        self.interval = interval
        self._totals: dict[int, dict[str, Any]] = {}  # job id -> stats as stored (and to be stored)
        self._unwritten: set[int] = set()  # jobs whose totals changed since the last write
        self._runs: dict[int, list[JobRun]] = {}  # sampled runs not yet written, per job
        self._sampled_success: dict[int, float] = {}  # job id -> start of its last sampled plain run
        self._added: Counter[int] = Counter()  # runs added per job since its history was pruned
        self._writer: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    def totals(self, job: JobRow) -> dict[str, Any] | None:
        """The job's figures as last reported (or stored)."""
        stats = self._totals.get(job.id) or job.stats
        return stats if isinstance(stats, dict) else None

    def last_run_at(self, job: JobRow) -> float | None:
        """When the job last started a run, as far as the reports tell (None: it never ran)."""
        stats = self._totals.get(job.id) or job.stats or {}
        value = stats.get("last_run_at") if isinstance(stats, dict) else None
        return None if value is None else float(value)

    def on_report(self, job: JobRow, worker: str, report: dict[str, Any]) -> None:
        previous = self._totals.get(job.id, job.stats if isinstance(job.stats, dict) else None)
        merged = self._totals[job.id] = merge_report(previous, report, worker)
        self._count(job, previous or {}, merged, report)
        self._unwritten.add(job.id)
        for reported in report.get("sampled") or ():
            run = run_from_wire(job, worker, reported)
            if run is not None:
                self._sample(run)
        if self._writer is None or self._writer.done():
            self._writer = self.tasks.spawn(self._write_later(), "fastjob-sl-stats")

    def _count(self, job: JobRow, before: dict[str, Any], after: dict[str, Any], report: dict[str, Any]) -> None:
        """The metrics: runs, failures and skips this report added, and its lateness figures."""
        for name in COUNTERS:
            added = int(after.get(name) or 0) - int(before.get(name) or 0)
            if added > 0:
                self.metrics.sl_runs[(job.app, name)] += added
        self.metrics.sl_lateness[job.id] = (job.app, float(report.get("lateness_p50") or 0.0),
                                            float(report.get("lateness_p99") or 0.0))

    def _sample(self, run: JobRun) -> None:
        if run.status == Status.SUCCEEDED.value and not run.logs:
            last = self._sampled_success.get(run.job_id)
            if last is not None and run.started_at - last < SUCCESS_SAMPLE_EVERY:
                return
            self._sampled_success[run.job_id] = run.started_at
        pending = self._runs.setdefault(run.job_id, [])
        pending.append(run)
        del pending[:-NOTABLE_PER_WRITE]

    def forget(self, job_ids: Iterable[int]) -> None:
        """Jobs of an app no longer owned (their figures were written first: see flush)."""
        for job_id in job_ids:
            self._totals.pop(job_id, None)
            self._unwritten.discard(job_id)
            self._runs.pop(job_id, None)
            self._sampled_success.pop(job_id, None)
            self.metrics.sl_lateness.pop(job_id, None)

    async def _write_later(self) -> None:
        await asyncio.sleep(self.interval)
        await self.flush()

    async def flush(self) -> None:
        """Write the totals and runs gathered so far; on a database error keep them for the next."""
        async with self._write_lock:
            stats = {job_id: self._totals[job_id] for job_id in self._unwritten if job_id in self._totals}
            runs = [run for pending in self._runs.values() for run in pending]
            self._unwritten, self._runs = set(), {}
            for run in runs:
                self._added[run.job_id] += 1
            prune = [job_id for job_id, added in self._added.items() if added >= PRUNE_EVERY]
            try:
                if stats:
                    await self.store.set_jobs_stats(stats, time.time())
                if runs or prune:
                    await self.store.add_job_runs(runs, prune)
            except StoreError as exc:
                log.warning("%d second-level reports and %d runs not stored, keeping them: %s",
                            len(stats), len(runs), exc)
                self._unwritten |= set(stats)
                newer, self._runs = self._runs, {}
                for run in runs:  # before what arrived meanwhile: a trim keeps the latest
                    self._added[run.job_id] -= 1
                    self._runs.setdefault(run.job_id, []).append(run)
                for job_id, pending in newer.items():
                    kept = self._runs.setdefault(job_id, [])
                    kept.extend(pending)
                    del kept[:-NOTABLE_PER_WRITE]
                return
            for job_id in prune:
                del self._added[job_id]

