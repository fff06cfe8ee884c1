"""Worker side of second-level jobs: run the jobs a server hands down, from the worker's own wheel.

Fixed rate fires at planned + period (a late fire does not shift the grid; fires missed by
more than a period are skipped and counted); fixed delay fires ``period`` after the previous
run finished. A fire never overlaps a still-running one unless the job allows it.

A newly handed-down job runs at once if it never ran since its schedule took effect (its
``anchor``), then on a grid that starts a phase of one period after the anchor: the phase,
derived from the job id (golden-ratio spacing), spreads many jobs of one period over it. Every
runner computes the same grid, so a new runner after a failover neither repeats a fire nor
shifts the grid (:func:`first_planned`). From a server that sends no anchor (protocol version
2) a job first fires at that phase of its first period.

Visibility: each report carries the counts since this worker took the job (``since``; the
server totals them over every runner) and sampled runs (every failed run and every run that
logged, at most SAMPLED_PER_REPORT, and the latest), each with its first ``ctx.log`` lines.

The lease: if the worker hears nothing from its server for ``lease`` seconds it drops every
handed-down job, because by then the server may have handed them to another worker.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .context import Handler, JobContext, RunLog
from .models import Status
from .timer import WheelTimer

log = logging.getLogger("fastjob.worker")

REPORT_INTERVAL = 2.0  # protocol.md: every few seconds, at most once a second
REPORTS_PER_FRAME = 200  # ~30 kB per SL_REPORT frame, far below max_frame; the loop yields between
MAX_LATENESS_SAMPLES = 100_000
#: Failed or logging runs sent per job per report (more are counted, not sent).
SAMPLED_PER_REPORT = 5


@dataclass(slots=True)
class _Job:
    spec: dict[str, Any]
    since: float = field(default_factory=time.time)  # when this worker took it: the counts start here
    grid_origin: float = 0.0  # fixed rate: fires at grid_origin + k * period (see grid_origin())
    next_planned: float = 0.0  # epoch seconds of the next fire
    handle: int | None = None
    running: int = 0
    runs: int = 0
    failures: int = 0
    skipped: int = 0
    last_error: str | None = None
    last_run_at: float | None = None
    lateness: list[float] = field(default_factory=list)  # seconds, since the last report
    sampled: list[dict[str, Any]] = field(default_factory=list)  # failed or logging runs, since the last report
    latest: dict[str, Any] | None = None  # the latest run's record, since the last report
    latest_unsent: bool = False  # the latest is a sampled-worthy run that found no room
    logs_dropped: int = 0  # since the last report

    @property
    def period(self) -> float:
        return float(self.spec["period"])


def _revoked() -> str:
    return "revoked"


def _phase(job_id: int) -> float:
    """A fraction of the period in [0, 1), evenly spread over consecutive job ids."""
    return (job_id * 0.6180339887498949) % 1.0


def grid_origin(spec: dict[str, Any], now: float) -> float:
    """Where a fixed-rate job's grid starts: a phase of one period after its anchor (after ``now``
    from a server without anchors). The phase, derived from the job id, spreads many jobs of one
    period over it instead of firing them all in the same instant, and every runner computes the
    same grid from the same anchor."""
    base = now if spec.get("anchor") is None else float(spec["anchor"])
    return base + _phase(spec["id"]) * float(spec["period"])


def next_on_grid(origin: float, period: float, after: float, *, strictly: bool) -> float:
    """The first point of the grid ``origin + k * period`` (k >= 0) at or (``strictly``) after ``after``."""
    if after < origin:
        return origin
    # epoch-second floats resolve to ~2e-7 s: within a thousandth of a period counts as on the grid
    steps = (after - origin) / period
    k = math.floor(steps + 1e-3) + 1 if strictly else math.ceil(steps - 1e-3)
    return origin + k * period


def first_planned(spec: dict[str, Any], last_run_at: float | None, now: float, origin: float) -> float:
    """When a job this worker starts to run fires first (protocol.md, SL_ASSIGN): at once if it
    never ran since its anchor (at the anchor, if that is ahead), else at its next grid point
    (fixed delay: ``period`` after its last run). ``origin``: :func:`grid_origin`."""
    period, anchor = float(spec["period"]), spec.get("anchor")
    if anchor is None:  # a server without anchors: a phase into the first period
        return origin
    ran = last_run_at is not None and last_run_at >= float(anchor)  # since its schedule took effect
    if not ran:
        return max(now, float(anchor))
    assert last_run_at is not None  # it ran
    if spec["schedule_type"] == "fixed_delay":
        return max(now, last_run_at + period)
    # its next grid point, and never one at or before its last run (another runner may have run it)
    return max(next_on_grid(origin, period, now, strictly=False),
               next_on_grid(origin, period, last_run_at, strictly=True))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[index]


class WorkerLink(Protocol):
    """What the runner uses of its worker, and nothing more."""

    @property
    def worker_id(self) -> str: ...
    @property
    def handlers(self) -> Mapping[str, Handler]: ...
    @property
    def connected(self) -> bool: ...
    def server_alive_at(self) -> float: ...
    def send_frame(self, kind: str, body: dict[str, Any]) -> bool: ...
    async def run_handler(self, fn: Handler, ctx: Any, timeout: float | None, cancel_reason: Callable[[], str],
                          check_result: bool = True) -> tuple[str, Any, str | None]: ...


class SecondLevelRunner:
    """The handed-down jobs of one worker."""

    def __init__(self, worker: WorkerLink) -> None:
        self.worker = worker
        self.jobs: dict[int, _Job] = {}
        self.lease = 0.0
        self._timer: WheelTimer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reporter: asyncio.Task[None] | None = None

    def job_ids(self) -> list[int]:
        return sorted(self.jobs)

    # ---- lease ------------------------------------------------------------------------------
    def _lease_ok(self) -> bool:
        return asyncio.get_running_loop().time() - self.worker.server_alive_at() < self.lease

    def _check_lease(self) -> bool:
        if self.jobs and not self._lease_ok():
            self.stop_all(f"no word from the server for {self.lease:.2f}s (lease expired)")
            return False
        return True

    def connected(self) -> None:
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.create_task(self._report_loop(), name="fastjob-sl-report")

    def disconnected(self) -> None:
        """Keep running within the lease: a quick reconnect to the same app owner causes no gap."""

    # ---- server orders ------------------------------------------------------------------------
    def assign(self, spec: dict[str, Any], lease: float) -> None:
        self.lease = lease
        job_id = spec["id"]
        if spec["handler"] not in self.worker.handlers:
            log.error("second-level job %s: unknown handler %r on worker %s", spec["name"], spec["handler"],
                      self.worker.worker_id)
            return
        if self._timer is None:
            self._timer = WheelTimer(self._on_due)
        current = self.jobs.get(job_id)
        if current is not None:
            if spec["version"] <= current.spec["version"]:
                return  # a re-assignment only refreshes the lease
            changed = current.spec["period"] != spec["period"] or current.spec["schedule_type"] != spec["schedule_type"]
            current.spec = spec
            if changed:
                if current.handle is not None:
                    self._timer.cancel(current.handle)
                    current.handle = None
                now = time.time()
                current.grid_origin = grid_origin(spec, now)
                # a fixed-delay run in progress arms the next fire when it ends; otherwise arm now
                if spec["schedule_type"] == "fixed_rate" or not current.running:
                    self._arm(current, first_planned(spec, current.last_run_at, now, current.grid_origin))
            return
        now = time.time()
        job = _Job(spec, grid_origin=grid_origin(spec, now))
        self.jobs[job_id] = job
        log.info("worker %s runs second-level job %s every %.3fs", self.worker.worker_id, spec["name"], job.period)
        self._arm(job, first_planned(spec, spec.get("last_run_at"), now, job.grid_origin))

    def revoke(self, job_id: int, reason: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            log.info("worker %s stops second-level job %s: %s", self.worker.worker_id, job.spec["name"], reason)
            if job.handle is not None and self._timer is not None:
                self._timer.cancel(job.handle)

    def stop_all(self, reason: str) -> None:
        for job_id in list(self.jobs):
            self.revoke(job_id, reason)

    async def wait_stopped(self, timeout: float) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    # ---- firing -------------------------------------------------------------------------------
    def _arm(self, job: _Job, planned: float) -> None:
        assert self._timer is not None
        job.next_planned = planned
        job.handle = self._timer.call_at(WheelTimer.time() + (planned - time.time()), job.spec["id"])

    def _on_due(self, job_ids: list[int]) -> None:
        if not self._check_lease():
            return
        now = time.time()
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is None:
                continue
            planned = job.next_planned
            job.handle = None
            if job.spec["schedule_type"] == "fixed_rate":
                nxt = next_on_grid(job.grid_origin, job.period, planned, strictly=True)
                if nxt <= now:  # far behind: skip whole missed periods rather than bursting
                    missed = int((now - nxt) // job.period) + 1
                    job.skipped += missed
                    nxt += missed * job.period
                self._arm(job, nxt)
            if job.running and not job.spec.get("allow_overlap"):
                job.skipped += 1
                continue
            self._start(job, planned)

    def _start(self, job: _Job, planned: float) -> None:
        job.running += 1
        task = asyncio.create_task(self._run(job, planned))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: _Job, planned: float) -> None:
        started = time.time()
        if len(job.lateness) < MAX_LATENESS_SAMPLES:
            job.lateness.append(max(0.0, started - planned))
        spec = job.spec
        run_log = RunLog(spec["name"])
        ctx = JobContext(0, spec["name"], spec["id"], spec.get("params"), 1, planned, run_log)
        status, _, error = await self.worker.run_handler(
            self.worker.handlers[spec["handler"]], ctx, spec.get("timeout"), _revoked, check_result=False)
        job.running -= 1
        job.runs += 1
        job.last_run_at = started
        if status != Status.SUCCEEDED.value:
            job.failures += 1
            job.last_error = error
        self._record(job, {"planned_at": planned, "started_at": started, "duration": time.time() - started,
                           "status": status, "error": error, "logs": run_log.lines}, run_log.dropped)
        if job.spec["schedule_type"] == "fixed_delay" and self.jobs.get(spec["id"]) is job and job.handle is None:
            self._arm(job, time.time() + job.period)

    # ---- reports ------------------------------------------------------------------------------
    @staticmethod
    def _record(job: _Job, run: dict[str, Any], lines_dropped: int) -> None:
        """Keep a finished run for the next report if it is worth it (it failed or logged)."""
        if job.latest is not None and job.latest_unsent:  # the previous latest is not sent after all
            job.logs_dropped += len(job.latest["logs"])
        job.latest, job.latest_unsent = run, False
        job.logs_dropped += lines_dropped
        if run["status"] != Status.SUCCEEDED.value or run["logs"]:
            if len(job.sampled) < SAMPLED_PER_REPORT:
                job.sampled.append(run)
            else:
                job.latest_unsent = True  # sent only if it is still the latest at the report

    @staticmethod
    def _report(job_id: int, job: _Job) -> dict[str, Any]:
        samples = sorted(job.lateness)
        # clear, don't replace: 10,000 fresh lists per report would reach the oldest GC
        # generation and trigger full collections (pauses of tens of ms) every few seconds
        job.lateness.clear()
        sampled = job.sampled[:]
        if job.latest is not None and (not sampled or sampled[-1] is not job.latest):
            sampled.append(job.latest)
        job.sampled.clear()
        job.latest, job.latest_unsent = None, False
        dropped, job.logs_dropped = job.logs_dropped, 0
        return {
            "job_id": job_id, "runs": job.runs, "failures": job.failures, "last_error": job.last_error,
            "last_run_at": job.last_run_at, "lateness_p50": _percentile(samples, 0.5),
            "lateness_p99": _percentile(samples, 0.99), "lateness_max": samples[-1] if samples else 0.0,
            "skipped": job.skipped, "since": job.since, "sampled": sampled, "logs_dropped": dropped,
        }

    async def _report_loop(self) -> None:
        """Report in frames of REPORTS_PER_FRAME jobs, yielding between them so fires stay on time."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self._check_lease()
            job_ids = list(self.jobs)
            for start in range(0, len(job_ids), REPORTS_PER_FRAME):
                if not self.worker.connected:
                    break
                chunk = [(j, self.jobs.get(j)) for j in job_ids[start:start + REPORTS_PER_FRAME]]
                reports = [self._report(j, job) for j, job in chunk if job is not None]
                if reports:
                    self.worker.send_frame("SL_REPORT", {"reports": reports})
                await asyncio.sleep(0)
