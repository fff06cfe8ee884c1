"""Second-level jobs: handed down to one worker of the app, which schedules and runs them itself.

Fixed-rate and fixed-delay jobs whose period is under ``--second-level-threshold`` are too
frequent for an instance row per fire. The owner server assigns each to one live worker of
the app (the one with fewest such jobs) with SL_ASSIGN and a lease; the worker runs it from
its own wheel and reports aggregated outcomes with SL_REPORT.

No two runners: a worker stops its handed-down jobs when it has heard nothing from its
server for ``lease`` seconds. So when a worker goes silent, the server waits until that
worker's lease has surely run out (last frame from it + lease + margin) before handing its
jobs to another worker; and after gaining an app it waits one lease before assigning jobs
that no reconnecting worker reported as its own. Both waits are below one heartbeat timeout.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import schedule
from ..clock import SYSTEM_CLOCK, Clock
from ..models import JobRow, Overlap
from ..store import Store
from ..tasks import BackgroundTasks
from .metrics import Metrics
from .sl_stats import SecondLevelStats

if TYPE_CHECKING:
    from .session import WorkerSession

log = logging.getLogger("fastjob.second_level")

#: Run a callback at a monotonic time (``loop.call_at``; fake time in tests).
CallAt = Callable[[float, Callable[[], None]], object]



class SecondLevel:
    """Which worker runs each second-level job of the apps this server owns."""

    def __init__(self, store: Store, tasks: BackgroundTasks, *, heartbeat_interval: float,
                 heartbeat_timeout: float, owns: Callable[[str], bool],
                 workers_of: Callable[[str], list[WorkerSession]],
                 is_second_level: Callable[[JobRow], bool], clock: Clock = SYSTEM_CLOCK,
                 call_at: CallAt | None = None, metrics: Metrics | None = None) -> None:
        self.store = store
        self._clock = clock  # monotonic; sessions' last_received is on the same clock (asyncio's loop.time())
        self._call_at: CallAt = call_at or (lambda when, fn: asyncio.get_running_loop().call_at(when, fn))
        self.tasks = tasks
        self._owns = owns
        self._workers_of = workers_of
        self._is_second_level = is_second_level
        self.lease = 0.75 * heartbeat_timeout  # a worker stops its jobs after this much server silence
        self.margin = 0.1 * heartbeat_timeout  # extra wait before reassigning, for clock-rate skew and RTT
        # reports are written this often (a row per job): 10 s by default
        self.stats = SecondLevelStats(store, tasks, interval=5 * heartbeat_interval, metrics=metrics)
        self.jobs: dict[int, JobRow] = {}  # second-level jobs of owned apps
        self.runner: dict[int, WorkerSession] = {}  # job id -> the session running it
        #: job id -> when it was first handed down here (wall clock): from then on it may have run
        #: without its runner's report having arrived yet, so a new runner must not run it "at once"
        self._handed_at: dict[int, float] = {}
        self._quiet_until: dict[str, float] = {}  # app -> monotonic time before which only reports assign
        self._retry_armed: set[str] = set()  # apps with an assignment pass armed for the quiet period's end

    # ---- who runs what ----------------------------------------------------------------------
    def _wire(self, job: JobRow) -> dict[str, Any]:
        """The job as SL_ASSIGN hands it down: with the grid's anchor and its last run, so that
        a new runner runs it at once only if it never ran, and otherwise keeps its grid."""
        return {
            "id": job.id, "name": job.name, "handler": job.handler,
            "schedule_type": job.schedule_type.value, "period": schedule.parse_period(job.schedule_expr),
            "params": job.params, "timeout": job.timeout, "allow_overlap": job.overlap == Overlap.ALLOW.value,
            "version": job.version, "anchor": None if job.anchor_ms is None else job.anchor_ms / 1000.0,
            "last_run_at": max((t for t in (self.stats.last_run_at(job), self._handed_at.get(job.id))
                                if t is not None), default=None),
        }

    def _hand_to(self, session: WorkerSession, job: JobRow) -> None:
        self.runner[job.id] = session
        session.hand_down(job.id)
        session.send("SL_ASSIGN", {"job": self._wire(job), "lease": self.lease})
        anchor = -math.inf if job.anchor_ms is None else job.anchor_ms / 1000.0
        if self._handed_at.get(job.id, -math.inf) < anchor:  # not handed out since its schedule took effect
            self._handed_at[job.id] = self._clock.wall()
        log.info("second-level job %s (%d) of app %s handed to worker %s", job.name, job.id, job.app, session.worker_id)

    def _revoke(self, job_id: int, reason: str) -> None:
        session = self.runner.pop(job_id, None)
        if session is not None:
            session.take_back(job_id)
            session.send("SL_REVOKE", {"job_id": job_id, "reason": reason})

    def _pick(self, job: JobRow) -> WorkerSession | None:
        candidates = [s for s in self._workers_of(job.app) if s.accepts_jobs and s.has_tags(job.tags)]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.second_level_count, s.worker_id))

    def _in_quiet_period(self, app: str) -> bool:
        """True while a newly gained app waits for its old runners' reports; one retry is armed then."""
        quiet_until = self._quiet_until.get(app, 0.0)
        if self._clock.monotonic() >= quiet_until:
            return False
        if app not in self._retry_armed:
            self._retry_armed.add(app)
            self._call_at(quiet_until + 0.01, lambda: self._quiet_period_over(app))
        return True

    def _quiet_period_over(self, app: str) -> None:
        self._retry_armed.discard(app)
        self.assign_unassigned(app)

    def assign_unassigned(self, app: str) -> None:
        """Hand every unassigned job of the app to a worker, unless the app is in its quiet period."""
        if self._in_quiet_period(app):
            return
        for job in list(self.jobs.values()):
            if job.app == app and job.id not in self.runner:
                session = self._pick(job)
                if session is None:
                    return  # no worker: the jobs wait and resume when one registers
                self._hand_to(session, job)

    # ---- events ------------------------------------------------------------------------------
    async def app_gained(self, app: str, fresh: bool = False) -> None:
        """``fresh``: the app never had an owner, so no worker can be running its jobs yet."""
        for job in await self.store.list_jobs(app):
            if self._wanted(job):
                self.jobs[job.id] = job
        if not fresh:  # the previous owner's runners may still be within their lease: wait for their reports
            self._quiet_until[app] = self._clock.monotonic() + self.lease + self.margin
        self.assign_unassigned(app)

    def app_lost(self, app: str) -> None:
        """Drop the app's jobs (their reports were written first: see Server._app_lost)."""
        lost = [j.id for j in self.jobs.values() if j.app == app]
        self.stats.forget(lost)
        for job_id in lost:
            del self.jobs[job_id]
            self._handed_at.pop(job_id, None)
            session = self.runner.pop(job_id, None)
            if session is not None:
                session.take_back(job_id)
        self._quiet_until.pop(app, None)

    def worker_joined(self, session: WorkerSession, reported: list[int]) -> None:
        """A worker that says it still runs a job keeps it (no gap); it loses those now run elsewhere."""
        for job_id in reported:
            job = self.jobs.get(job_id)
            if job is not None and job.app != session.app:
                continue  # only jobs of its own app
            current = self.runner.get(job_id)
            if job is not None and (current is None or current.closed):
                self._hand_to(session, job)  # refreshes its lease and version
            elif current is not session:
                session.send("SL_REVOKE", {"job_id": job_id, "reason": "assigned elsewhere"})
        self.assign_unassigned(session.app)

    def worker_left(self, session: WorkerSession) -> None:
        """Reassign its jobs once its lease has surely expired, so no two workers overlap."""
        orphaned = [job_id for job_id, s in self.runner.items() if s is session]
        if not orphaned:
            return
        safe_at = session.last_received + self.lease + self.margin
        log.info("worker %s left with %d second-level jobs; reassigning in %.2fs",
                 session.worker_id, len(orphaned), max(0.0, safe_at - self._clock.monotonic()))
        self._call_at(safe_at, lambda: self._reassign(session, orphaned))

    def worker_draining(self, session: WorkerSession) -> None:
        """A stopping worker stopped its second-level jobs before saying so: reassign them now."""
        self._reassign(session, [job_id for job_id, s in self.runner.items() if s is session])

    def _reassign(self, gone: WorkerSession, job_ids: list[int]) -> None:
        for job_id in job_ids:
            if self.runner.get(job_id) is gone:
                del self.runner[job_id]
        apps = {self.jobs[j].app for j in job_ids if j in self.jobs}
        for app in apps:
            self.assign_unassigned(app)

    def job_changed(self, job: JobRow) -> None:
        if self._wanted(job) and self._owns(job.app):
            self.jobs[job.id] = job
            session = self.runner.get(job.id)
            if session is None or session.closed:
                if self._in_quiet_period(job.app):
                    return
                session = self._pick(job)  # one job changed: place just this one
            if session is not None:
                self._hand_to(session, job)  # new jobs, and new period/params/version, reach the runner
        elif job.id in self.jobs:
            del self.jobs[job.id]
            self._handed_at.pop(job.id, None)
            self._revoke(job.id, "job deleted, disabled or no longer second-level")

    def _wanted(self, job: JobRow) -> bool:
        return job.enabled and not job.is_delete and self._is_second_level(job)

    def on_report(self, session: WorkerSession, body: dict[str, Any]) -> None:
        """Reports of the jobs this session runs (a job since handed elsewhere: not any more)."""
        for report in body["reports"]:
            job_id = report.get("job_id")
            job = self.jobs.get(job_id)
            if job is not None and self.runner.get(job.id) is session:
                self.stats.on_report(job, session.worker_id, report)
