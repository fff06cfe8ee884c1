"""The life of a regular fire on its owner server: scan, WAL, wheel, dispatch, result.

A scan pass claims, per owned app, every job due within the horizon; the store writes the
instance rows (the WAL) and advances the jobs in one fenced transaction. Only then do the
fires enter the timing wheel. When the wheel says a fire is due it is dispatched to a worker
of the app; status changes are written in batches by :class:`StatusWriter`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .. import schedule
from ..store import (
    FINAL_STATUSES,
    InstanceRow,
    InstanceUpdate,
    JobRow,
    LogLine,
    NotOwnerError,
    ScheduleType,
    Status,
    Store,
    StoreError,
)
from ..tasks import BackgroundTasks
from ..protocol import ProtocolError
from ..timer import WheelTimer

if TYPE_CHECKING:
    from .cluster import Cluster
    from .session import WorkerSession

log = logging.getLogger("fastjob.scheduler")

DUE_SLICE = 256  # due items handled per loop iteration: the write flush runs between slices
# Allowed disagreement between servers' wall clocks when comparing one's heartbeat with fire times.
CLOCK_SKEW_MARGIN = 1.0
MAX_TEXT = 8192  # error texts and log lines are cut to this many characters before they are stored


class StatusWriter:
    """Collects status changes and log lines and writes them in batches, never losing one.

    A failed write keeps the batch and is retried on the next flush, so a database outage
    delays status updates but drops none.
    """

    def __init__(self, store: Store, flush_interval: float = 0.02, max_batch: int = 2000) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self._updates: list[InstanceUpdate] = []
        self._logs: list[LogLine] = []
        self._finished: dict[int, float] = {}  # job id -> latest finish, for last_finished_time
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task[None]] = None

    def update(self, change: InstanceUpdate) -> None:
        self._updates.append(change)
        self._wake.set()

    def logs(self, lines: list[LogLine]) -> None:
        self._logs.extend(lines)
        self._wake.set()

    def job_finished(self, job_id: int, finished_at: float) -> None:
        if finished_at > self._finished.get(job_id, 0.0):
            self._finished[job_id] = finished_at
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fastjob-status-writer")

    async def stop(self) -> bool:
        """Stop the background flushing; True if the final flush wrote everything."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        return await self.flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_interval)  # let a burst gather into one batch
            if not await self.flush():
                await asyncio.sleep(0.5)
                self._wake.set()

    async def flush(self) -> bool:
        """Write what is pending; False (and keep it) if the database refused."""
        updates, self._updates = self._updates, []
        lines, self._logs = self._logs, []
        finished, self._finished = self._finished, {}
        try:
            if updates:
                await self.store.update_instances(updates)
                updates = []
            if lines:
                await self.store.append_logs(lines)
                lines = []
            if finished:
                await self.store.mark_jobs_finished(finished)
            return True
        except StoreError as exc:
            log.warning("status write of %d updates, %d log lines failed, will retry: %s",
                        len(updates), len(lines), exc)
            self._updates[:0] = updates
            self._logs[:0] = lines
            for job_id, finished_at in finished.items():
                self.job_finished(job_id, finished_at)
            return False


@dataclass(slots=True)
class Inflight:
    """An instance sent to a worker and not yet finished."""

    instance: InstanceRow
    job: JobRow
    session: Optional["WorkerSession"]
    refused_by: set[str] = field(default_factory=set)
    overdue_handle: Optional[int] = None
    orphan_handle: Optional[int] = None  # armed while no session holds it (awaiting re-attach)


@dataclass(slots=True)
class Pending:
    """A due fire that found no worker able to take it yet."""

    instance: InstanceRow
    job: JobRow
    refused_by: set[str] = field(default_factory=set)
    reason: str = "no worker connected"


class Scheduler:
    """Owns the wheel of this server and every fire of the apps this server owns."""

    def __init__(
        self,
        store: Store,
        cluster: "Cluster",
        *,
        scan_horizon: float,
        scan_interval: float,
        dispatch_wait: float,
        misfire_threshold: float,
        reattach_grace: float,
        workers_of: Callable[[str], list["WorkerSession"]],
        is_second_level: Callable[[JobRow], bool],
        status_flush_interval: float = 0.02,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.scan_horizon = scan_horizon
        self.scan_interval = scan_interval
        self.dispatch_wait = dispatch_wait
        self.misfire_threshold = misfire_threshold
        self.reattach_grace = reattach_grace
        self.workers_of = workers_of
        self.is_second_level = is_second_level
        self.writer = StatusWriter(store, flush_interval=status_flush_interval)
        self.timer: Optional[WheelTimer] = None
        self.jobs: dict[int, JobRow] = {}
        self.inflight: dict[int, Inflight] = {}
        self.pending: dict[str, list[Pending]] = {}
        self.wheel_handles: dict[int, int] = {}  # instance id -> wheel handle, for waiting fires
        self.waiting_per_job: collections.Counter[int] = collections.Counter()  # fires in the wheel, by job
        self.held: list[tuple[InstanceRow, int]] = []  # (row, epoch) due while our lease was stale
        # Overdue waiting fires recovered from an older epoch: the dead owner may have dispatched
        # them (its status write lost), so they wait in the wheel for the re-attach grace, and a
        # worker that names one in its HELLO gets it back instead.  instance id -> (row, epoch)
        self.suspects: dict[int, tuple[InstanceRow, int]] = {}
        self.claimed_by: dict[int, "WorkerSession"] = {}  # suspect -> the worker that named it
        self._rr: dict[str, int] = {}
        self.running_per_job: collections.Counter[int] = collections.Counter()  # inflight count by job
        self.tasks = BackgroundTasks(expected=(StoreError,))
        self._scan_task: Optional[asyncio.Task[None]] = None
        self._scan_now = asyncio.Event()
        self._revalidating = False

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.timer = WheelTimer(self._on_due)
        self.writer.start()
        self._scan_task = asyncio.create_task(self._scan_loop(), name="fastjob-scan")

    async def stop(self) -> bool:
        """Stop firing and write what is pending.  True when our apps can be released: every
        status is written and no fire is held back from a dead owner (a successor that finds
        an app released holds nothing back)."""
        if self._scan_task is not None:
            self._scan_task.cancel()
            await asyncio.gather(self._scan_task, return_exceptions=True)
        await self.tasks.close()
        if self.timer is not None:
            self.timer.close()
        flushed = await self.writer.stop()
        return flushed and not self.suspects

    def wake_scan(self) -> None:
        self._scan_now.set()

    # ---- ownership callbacks -------------------------------------------------------------
    async def app_gained(self, app: str, epoch: int, previous_owner: Optional[str] = None) -> None:
        """Recover the app's WAL: waiting fires go into the wheel, running ones await re-attach."""
        rows = await self.store.load_unfinished(app)
        await self.load_jobs(app)
        dispatch_cutoff_ms = await self._last_possible_dispatch_ms(previous_owner)
        for row in rows:
            job = await self.job(row.job_id)
            if job is None:
                continue
            if row.status is Status.WAITING and row.epoch < epoch and row.planned_ms <= dispatch_cutoff_ms:
                self.suspects[row.id] = (row, epoch)
                self._enter_wheel(row, epoch, WheelTimer.time() + self.reattach_grace)
            elif row.status is Status.WAITING:
                self._enter_wheel(row, epoch)
            elif row.id not in self.inflight:
                flight = Inflight(row, job, None)
                self.inflight[row.id] = flight
                self.running_per_job[job.id] += 1
                flight.orphan_handle = self._arm(("orphan", row.id), self.reattach_grace)
        await self._restart_delay_chains(app, epoch, rows)
        log.info("app %s: gained at epoch %d, recovered %d unfinished instances", app, epoch, len(rows))
        # workers accepted while the WAL was loading named their instances before they were known
        for session in self.workers_of(app):
            if session.role == "worker":
                self.worker_joined(session, session.hello_running, session.hello_finished)
        self.wake_scan()

    async def _last_possible_dispatch_ms(self, previous_owner: Optional[str]) -> int:
        """Up to when the app's previous owner may have dispatched fires we cannot see.

        An owner dispatches only while its lease holds: at most ``reattach_grace`` (the
        heartbeat timeout, the same on every server of a cluster) after its last heartbeat,
        plus a margin for clock skew between servers."""
        now_ms = schedule.now_ms()
        if previous_owner is None:
            return -1  # released: only after a final flush, and with nothing held (Scheduler.stop)
        last_seen = next((s.heartbeat_at for s in await self.store.list_servers() if s.id == previous_owner), None)
        if last_seen is None:
            return now_ms
        return min(now_ms, math.ceil((last_seen + self.reattach_grace + CLOCK_SKEW_MARGIN) * 1000))

    async def _restart_delay_chains(self, app: str, epoch: int, unfinished: list[InstanceRow]) -> None:
        """A fixed-delay job with no next fire and nothing in flight lost its chain in a crash: restart it."""
        busy = {row.job_id for row in unfinished}
        for job in [j for j in self.jobs.values() if j.app == app]:
            if (job.next_trigger_ms is None and job.id not in busy and self._delay_chain(job)):
                log.info("job %s (%d): fixed-delay chain had no next fire; restarting it", job.name, job.id)
                await self.store.set_next_trigger(self.cluster.server_id, app, epoch, job.id, schedule.now_ms())

    async def app_lost(self, app: str) -> None:
        """Forget every fire of the app; its new owner has them in the database."""
        # waiting fires stay in the wheel and are dropped when due: fire() checks ownership
        self.pending.pop(app, None)
        for instance_id in [i for i, (row, _) in self.suspects.items() if row.app == app]:
            del self.suspects[instance_id]
            self.claimed_by.pop(instance_id, None)
        for flight in list(self.inflight.values()):
            if flight.instance.app == app:
                self._forget_flight(flight)
        for session in self.workers_of(app):
            session.redirect_away()

    # ---- jobs cache ------------------------------------------------------------------------
    async def job(self, job_id: int) -> Optional[JobRow]:
        cached = self.jobs.get(job_id)
        if cached is None:
            cached = await self.store.get_job(job_id)
            if cached is not None:
                self.jobs[job_id] = cached
        return cached

    async def load_jobs(self, app: str) -> None:
        for job in await self.store.list_jobs(app):
            self.jobs[job.id] = job

    def job_changed(self, job: JobRow) -> None:
        self.jobs[job.id] = job
        self.wake_scan()

    # ---- scan ------------------------------------------------------------------------------
    async def _scan_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._scan_now.wait(), self.scan_interval)
            except asyncio.TimeoutError:
                pass
            self._scan_now.clear()
            if not self.cluster.lease_valid():
                continue
            for app, epoch in list(self.cluster.owned.items()):
                try:
                    await self.scan_app(app, epoch)
                except NotOwnerError:
                    log.warning("app %s: scan fenced at epoch %d; re-syncing ownership", app, epoch)
                    self.tasks.spawn(self.cluster.sync(), "fastjob-resync")
                except StoreError as exc:
                    log.warning("app %s: scan failed, will retry: %s", app, exc)
                except Exception:
                    log.exception("app %s: scan crashed", app)

    async def scan_app(self, app: str, epoch: int) -> int:
        """Claim the app's fires due within the horizon and put them into the wheel."""
        now = time.time()
        horizon_ms = int((now + self.scan_horizon) * 1000)
        next_fire = schedule.make_next_fire(int(now * 1000), int(self.misfire_threshold * 1000))
        rows = await self.store.claim_due(self.cluster.server_id, app, epoch, horizon_ms, next_fire, now)
        if any(row.job_id not in self.jobs for row in rows):
            await self.load_jobs(app)  # one query for the app, not a round trip per job
        for row in rows:
            if await self.job(row.job_id) is not None:
                self._enter_wheel(row, epoch)
        if rows:
            log.debug("app %s: claimed %d fires", app, len(rows))
        return len(rows)

    # ---- the wheel -------------------------------------------------------------------------
    @staticmethod
    def _timer_time_of(epoch_ms: int) -> float:
        """A wall-clock instant on the timer's monotonic clock."""
        return WheelTimer.time() + (epoch_ms / 1000.0 - time.time())

    def _enter_wheel(self, row: InstanceRow, epoch: int, at: Optional[float] = None) -> None:
        """Put a fire into the wheel, tagged with the epoch it was recorded under (one entry per row)."""
        assert self.timer is not None
        previous = self.wheel_handles.pop(row.id, None)
        if previous is not None:
            self.timer.cancel(previous)
        else:
            self.waiting_per_job[row.job_id] += 1
        when = at if at is not None else self._timer_time_of(row.planned_ms)
        self.wheel_handles[row.id] = self.timer.call_at(when, ("fire", (row, epoch)))

    def _left_wheel(self, job_id: int) -> None:
        self.waiting_per_job[job_id] -= 1
        if self.waiting_per_job[job_id] <= 0:
            del self.waiting_per_job[job_id]

    def _links_in_motion(self, job: JobRow) -> bool:
        """Has the job a fire waiting in the wheel, queued for a worker, held, or running?"""
        return (self.waiting_per_job[job.id] > 0 or self.running_per_job[job.id] > 0
                or any(entry.job.id == job.id for entry in self.pending.get(job.app, ()))
                or any(row.job_id == job.id for row, _ in self.held))

    def _arm(self, item: tuple[str, Any], delay: float) -> int:
        assert self.timer is not None
        return self.timer.call_later(delay, item)

    def _on_due(self, items: list[tuple[str, Any]]) -> None:
        """Handle due items; a big burst goes in slices so frames leave while the rest waits."""
        if len(items) > DUE_SLICE:
            asyncio.get_running_loop().call_soon(self._on_due, items[DUE_SLICE:])
            items = items[:DUE_SLICE]
        for kind, payload in items:
            try:
                if kind == "fire":
                    row, epoch = payload
                    if self.wheel_handles.pop(row.id, None) is not None:
                        self._left_wheel(row.job_id)
                    self.suspects.pop(row.id, None)  # grace over: to its claimant (if any), else anew
                    self.fire(row, epoch)
                elif kind == "overdue":
                    self._overdue(payload)
                elif kind == "orphan":
                    self._orphan_expired(payload)
                elif kind == "pending":
                    self._pending_expired(payload)
            except Exception:  # one bad item must not cost the rest of the batch
                log.exception("scheduler: %s item failed", kind)

    # ---- dispatch --------------------------------------------------------------------------
    def fire(self, row: InstanceRow, epoch: int) -> None:
        """A fire is due: dispatch it now, or hold it (stale lease) or queue it (no worker)."""
        if not self.cluster.owns(row.app, epoch):
            return  # the app moved (maybe and came back): its current owner fires this row from the WAL
        if row.id in self.inflight:
            return  # already sent (a reclaimed suspect whose wheel entry was on its way out)
        claimant = self.claimed_by.pop(row.id, None)
        if claimant is not None and not claimant.closed and row.job_id in self.jobs:
            # The worker that has it keeps its one running copy (ACK) or replays its stored
            # RESULT: the instance runs once.  No lease check: it cannot run twice there.
            log.info("instance %d: reclaimed from worker %s after the failover", row.id, claimant.worker_id)
            self._send_dispatch(claimant, row, self.jobs[row.job_id], set())
            return
        if not self.cluster.lease_valid():
            self.held.append((row, epoch))
            self._revalidate_lease()
            return
        job = self.jobs.get(row.job_id)
        if job is None or job.is_delete or (not job.enabled and row.trigger != "api"):
            self._finish(row, Status.CANCELLED, error="job deleted or disabled before its fire")
            return
        late = time.time() - row.planned_ms / 1000.0
        if row.trigger == "schedule" and late > self.misfire_threshold and job.misfire_policy == "skip":
            self._finish(row, Status.MISFIRED, error=f"fire was {late:.1f}s late; misfire policy skip")
            return
        if row.trigger == "schedule" and not job.allow_overlap and self.running_per_job[job.id]:
            self._finish(row, Status.CANCELLED, error="skipped: an earlier instance still runs (allow_overlap is false)")
            return
        self._dispatch(row, job, set())

    def _dispatch(self, row: InstanceRow, job: JobRow, refused_by: set[str]) -> None:
        """Send the fire to a worker, or queue it until one can take it."""
        session = self._route(row.app, job, refused_by)
        if session is None:
            self._queue_pending(row, job, refused_by)
        else:
            self._send_dispatch(session, row, job, refused_by)

    def _send_dispatch(self, session: "WorkerSession", row: InstanceRow, job: JobRow, refused_by: set[str]) -> None:
        try:
            self._send_dispatch_frame(session, row, job)
        except ProtocolError as exc:  # e.g. params larger than a frame: fails this instance only
            self._finish(row, Status.FAILED, error=f"could not dispatch: {exc.message}", job=job)
            return
        flight = Inflight(row, job, session, refused_by=refused_by)
        self.inflight[row.id] = flight
        self.running_per_job[job.id] += 1
        session.running.add(row.id)
        if job.timeout:
            # the worker enforces the timeout; this is the safety net if its answer never comes
            flight.overdue_handle = self._arm(("overdue", row.id), job.timeout + self.reattach_grace)
        self.writer.update(InstanceUpdate(
            row.id, Status.DISPATCHED, worker=session.worker_id, dispatched_at=time.time()))

    @staticmethod
    def _send_dispatch_frame(session: "WorkerSession", row: InstanceRow, job: JobRow) -> None:
        session.send("DISPATCH", {
            "instance_id": row.id,
            "job_id": job.id,
            "job": job.name,
            "handler": job.handler,
            "params": row.params if row.params is not None else job.params,
            "attempt": row.attempt,
            "scheduled_at": row.planned_ms / 1000.0,
            "timeout": job.timeout,
        })

    def _route(self, app: str, job: JobRow, refused_by: set[str]) -> Optional["WorkerSession"]:
        candidates = [
            s for s in self.workers_of(app)
            if s.accepts_jobs and s.worker_id not in refused_by and s.has_room() and s.has_tags(job.tags)
        ]
        if not candidates:
            return None
        if job.routing == "random":
            return random.choice(candidates)
        if job.routing == "least_busy":
            return min(candidates, key=lambda s: s.load())
        index = self._rr.get(app, 0)
        self._rr[app] = index + 1
        return candidates[index % len(candidates)]

    def _queue_pending(self, row: InstanceRow, job: JobRow, refused_by: set[str], reason: str = "") -> None:
        entry = Pending(row, job, refused_by, reason or f"no worker of app {row.app!r} could take it")
        self.pending.setdefault(row.app, []).append(entry)
        self._arm(("pending", entry), self.dispatch_wait)

    def drain_pending(self, app: str) -> None:
        """A worker joined or freed a slot: dispatch the app's queued fires while workers have room."""
        queue = self.pending.pop(app, [])
        for index, entry in enumerate(queue):
            job = self.jobs.get(entry.job.id, entry.job)
            session = self._route(app, job, entry.refused_by)
            if session is None:
                self.pending.setdefault(app, []).extend(queue[index:])
                return
            self._send_dispatch(session, entry.instance, job, entry.refused_by)

    def _pending_expired(self, entry: Pending) -> None:
        queue = self.pending.get(entry.instance.app, [])
        if entry in queue:
            queue.remove(entry)
            self._finish(entry.instance, Status.FAILED,
                         error=f"{entry.reason} within {self.dispatch_wait:.0f}s")

    # ---- worker reports --------------------------------------------------------------------
    def _flight_of(self, session: "WorkerSession", instance_id: int) -> Optional[Inflight]:
        """The instance in flight on this very session; reports about any other are ignored."""
        flight = self.inflight.get(instance_id)
        if flight is None or flight.session is not session or flight.instance.app != session.app:
            return None
        return flight

    def on_ack(self, session: "WorkerSession", body: dict[str, Any]) -> None:
        flight = self._flight_of(session, body["instance_id"])
        if flight is None or body["accepted"]:
            return
        reason = body.get("reason") or "refused"
        log.info("instance %d: worker %s refused it (%s)", flight.instance.id, session.worker_id, reason)
        self._forget_flight(flight)
        flight.refused_by.add(session.worker_id)
        refused = set(flight.refused_by)
        routed = self._route(flight.instance.app, flight.job, refused)
        if routed is None:
            self._queue_pending(flight.instance, flight.job, refused, f"every worker refused it (last: {reason})")
        else:
            self._send_dispatch(routed, flight.instance, flight.job, refused)

    def on_start(self, session: "WorkerSession", body: dict[str, Any]) -> None:
        flight = self._flight_of(session, body["instance_id"])
        if flight is None:
            return
        self.writer.update(InstanceUpdate(
            flight.instance.id, Status.RUNNING, worker=session.worker_id, started_at=body["started_at"]))

    def on_logs(self, session: "WorkerSession", body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        if self._flight_of(session, instance_id) is None:
            return  # logs come before their RESULT; lines for instances not on this session are dropped
        self.writer.logs([LogLine(instance_id, float(ts), str(level)[:16], str(message)[:MAX_TEXT])
                          for ts, level, message in body["lines"]])

    def on_result(self, session: "WorkerSession", body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        try:
            status = Status(body["status"])
        except ValueError:
            status = Status.FAILED
        if status not in FINAL_STATUSES:
            status = Status.FAILED
        error = body.get("error")
        error = str(error)[:MAX_TEXT] if error is not None else None
        flight = self._flight_of(session, instance_id)
        if flight is None:
            if instance_id not in self.inflight:  # late, or after a takeover: record it if it is this app's
                self.tasks.spawn(self._record_untracked(session, instance_id, status, body, error),
                                 f"fastjob-late-result-{instance_id}")
            return
        self._forget_flight(flight)
        self._finish(flight.instance, status, result=body.get("result"), error=error,
                     worker=session.worker_id, started_at=body.get("started_at"),
                     finished_at=body["finished_at"], job=flight.job)
        self.drain_pending(flight.instance.app)

    async def _record_untracked(self, session: "WorkerSession", instance_id: int, status: Status,
                                body: dict[str, Any], error: Optional[str]) -> None:
        row = await self.store.get_instance(instance_id)
        if row is None or row.app != session.app:
            log.warning("worker %s of app %s reported instance %d of another app; ignored",
                        session.worker_id, session.app, instance_id)
            return
        self.writer.update(InstanceUpdate(
            instance_id, status, worker=session.worker_id, started_at=body.get("started_at"),
            finished_at=body["finished_at"], result=body.get("result"), error=error))

    def worker_joined(self, session: "WorkerSession", running: Sequence[int], finished: Sequence[int] = ()) -> None:
        """Re-attach the instances a (re)connecting worker says it still runs or just finished."""
        for instance_id in (*running, *finished):
            if instance_id in self.suspects:
                self._claim_suspect(session, instance_id)
        for instance_id in (*running, *finished):
            flight = self.inflight.get(instance_id)
            if flight is not None and flight.instance.app == session.app and flight.session is None:
                flight.session = session
                session.running.add(instance_id)
                if flight.orphan_handle is not None and self.timer is not None:
                    self.timer.cancel(flight.orphan_handle)  # a later disconnect gets a full grace again
                    flight.orphan_handle = None
                if instance_id not in running:  # finished while we were apart: ask for the result again
                    self._send_dispatch_frame(session, flight.instance, flight.job)
                log.info("instance %d: re-attached to worker %s", instance_id, session.worker_id)
        self.drain_pending(session.app)

    def _claim_suspect(self, session: "WorkerSession", instance_id: int) -> None:
        """A worker names a fire the dead owner may have sent it: it is that worker's.

        Sent back to it now if the fire is still waiting in the wheel, else by fire() when its
        entry (already on its way out of the wheel) arrives."""
        row, epoch = self.suspects[instance_id]
        if row.app != session.app:
            return
        self.claimed_by[instance_id] = session
        handle = self.wheel_handles.get(instance_id)
        if handle is not None and self.timer is not None and self.timer.cancel(handle):
            del self.wheel_handles[instance_id]
            self._left_wheel(row.job_id)
            del self.suspects[instance_id]
            self.fire(row, epoch)

    def worker_left(self, session: "WorkerSession") -> None:
        """Its running instances wait a grace period for the worker to come back, then fail."""
        for instance_id in [i for i, claimant in self.claimed_by.items() if claimant is session]:
            del self.claimed_by[instance_id]  # it names them again when it reconnects
        for instance_id in list(session.running):
            flight = self.inflight.get(instance_id)
            if flight is not None and flight.session is session:
                flight.session = None
                flight.orphan_handle = self._arm(("orphan", instance_id), self.reattach_grace)
        session.running.clear()

    def _orphan_expired(self, instance_id: int) -> None:
        flight = self.inflight.get(instance_id)
        if flight is None or flight.session is not None:
            return
        flight.orphan_handle = None
        self._forget_flight(flight)
        self._finish(flight.instance, Status.FAILED, job=flight.job,
                     error="worker lost: it did not report the instance within the grace period")

    def _overdue(self, instance_id: int) -> None:
        flight = self.inflight.get(instance_id)
        if flight is None:
            return
        flight.overdue_handle = None
        if flight.session is not None:
            flight.session.send("CANCEL", {"instance_id": instance_id, "reason": "timeout"})
        self._forget_flight(flight)
        self._finish(flight.instance, Status.TIMED_OUT, job=flight.job,
                     error=f"no result within the {flight.job.timeout}s timeout")

    def _forget_flight(self, flight: Inflight) -> None:
        if self.inflight.pop(flight.instance.id, None) is not None:
            self.running_per_job[flight.job.id] -= 1
            if self.running_per_job[flight.job.id] <= 0:
                del self.running_per_job[flight.job.id]
        if flight.session is not None:
            flight.session.running.discard(flight.instance.id)
        if flight.overdue_handle is not None and self.timer is not None:
            self.timer.cancel(flight.overdue_handle)
            flight.overdue_handle = None

    # ---- final states, retries, fixed delay ------------------------------------------------
    def _finish(
        self,
        row: InstanceRow,
        status: Status,
        *,
        result: Any = None,
        error: Optional[str] = None,
        worker: Optional[str] = None,
        started_at: Optional[float] = None,
        finished_at: Optional[float] = None,
        job: Optional[JobRow] = None,
    ) -> None:
        finished_at = finished_at or time.time()
        if status is not Status.SUCCEEDED and error:
            log.info("instance %d (job %d, app %s, attempt %d): %s: %s",
                     row.id, row.job_id, row.app, row.attempt, status.value, error)
        self.writer.update(InstanceUpdate(row.id, status, worker=worker, started_at=started_at,
                                          finished_at=finished_at, result=result, error=error))
        job = job or self.jobs.get(row.job_id)
        if job is None:
            return
        retry = status in (Status.FAILED, Status.TIMED_OUT) and row.attempt <= job.retry_times
        if not retry and status not in (Status.MISFIRED, Status.CANCELLED):
            self.writer.job_finished(job.id, finished_at)
        current = self.jobs.get(job.id, job)
        # one chain per fixed-delay job: a finish continues it only when no other link is in motion
        # (a re-enable or an API run may have started one), so parallel links merge into one
        chain = row.trigger != "api" and self._delay_chain(current) and not self._links_in_motion(current)
        if retry or chain:
            self.tasks.spawn(self._after_final(row, job, retry, finished_at), f"fastjob-after-{row.id}")

    def _delay_chain(self, job: JobRow) -> bool:
        """Is this a live fixed-delay job whose next fire is chained to the previous finish?"""
        return (job.schedule_type is ScheduleType.FIXED_DELAY and not job.run_once and job.enabled
                and not job.is_delete and not self.is_second_level(job))

    async def _after_final(self, row: InstanceRow, job: JobRow, retry: bool, finished_at: float) -> None:
        """Write the WAL row of what follows a final status: a retry, or a fixed delay's next fire."""
        epoch = self.cluster.owned.get(row.app)
        if epoch is None:
            return
        server_id = self.cluster.server_id
        if retry:
            again = await self.store.insert_instance(
                server_id, row.app, epoch, job.id, row.planned_ms, row.attempt + 1, "retry", row.params, time.time())
            if again is not None:
                delay = schedule.retry_delay(job, row.attempt)
                log.info("instance %d: retry as %d (attempt %d) in %.2fs", row.id, again.id, again.attempt, delay)
                self._enter_wheel(again, epoch, WheelTimer.time() + delay)
            return
        # the chain lives in one place, the job's next_trigger_ms: a re-enable or an edit that
        # also set it can never start a second chain, and the scan claims it like any fire
        period = schedule.parse_period(self.jobs.get(job.id, job).schedule_expr)
        next_ms = math.ceil((finished_at + period) * 1000)  # never before finish + delay
        await self.store.set_next_trigger(server_id, row.app, epoch, job.id, next_ms)
        self.wake_scan()

    async def trigger(self, app: str, job: JobRow, params: Any) -> InstanceRow:
        """An API call fires the job now (WAL first, then the wheel)."""
        epoch = self.cluster.owned.get(app)
        if epoch is None:
            raise NotOwnerError(app, -1)
        planned = schedule.now_ms()
        for bump in range(50):  # two triggers in the same millisecond get distinct planned times
            row = await self.store.insert_instance(
                self.cluster.server_id, app, epoch, job.id, planned + bump, 1, "api", params, time.time())
            if row is not None:
                self.jobs[job.id] = job
                self._enter_wheel(row, epoch, WheelTimer.time())
                return row
        raise StoreError(f"job {job.name}: could not record the trigger")

    # ---- lease ------------------------------------------------------------------------------
    def _revalidate_lease(self) -> None:
        if self._revalidating:
            return
        self._revalidating = True
        self.tasks.spawn(self._release_held(), "fastjob-lease")

    async def _release_held(self) -> None:
        """Re-read our epochs, drop fires of apps we lost, then fire the rest."""
        try:
            while True:
                try:
                    await self.cluster.renew()
                    break
                except StoreError as exc:
                    log.warning("lease renewal failed, fires stay held: %s", exc)
                    await asyncio.sleep(self.cluster.interval)
            held, self.held = self.held, []
            log.info("lease renewed; releasing %d held fires", len(held))
            for row, epoch in held:
                self.fire(row, epoch)
        finally:
            self._revalidating = False
