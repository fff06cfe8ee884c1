"""The life of a regular fire on its owner server: scan, WAL, wheel, overlap, dispatch, result.

A scan pass claims, per owned app, every job due within the horizon; the store writes the
instance rows (the WAL) and advances the jobs in one fenced transaction. Only then do the
fires enter the timing wheel. When the wheel says a fire is due, its job's line (overlap
policy, :mod:`.lines`) says whether it runs now, waits its turn or is skipped; a fire that
runs is dispatched to a worker of the app. Status changes are written in batches by
:class:`~.writer.StatusWriter`.

Every planned fire ends in exactly one final record (the fire contract, README). After a
failover the new owner recovers the WAL: waiting fires are fired; fires the previous owner
may have sent to a worker (its status write may not have landed) hold their job until the
workers it had re-attach and say what they run, or until any run of theirs has surely
stopped (the workers' run lease); dispatched or running fires wait for their worker the same
way and are re-run (``interrupted``) if it does not have them.

Where a fire is on this server, by state (one place at a time; the stored status in brackets):

=============  ========================================  ===========================================
state          held in                                   leaves for
=============  ========================================  ===========================================
in the wheel   ``wheel_handles`` (+ ``waiting_per_job``)  due: its line decides (FireDue)  [waiting]
held           ``held``                                  lease renewed: due again; app lost: dropped
draining       ``draining[app]``                         handed over: the new owner's; not: due again
queued         its job's line (:mod:`.lines`)            its turn: dispatched             [queued]
pending        ``pending[app]``                          a worker with room: dispatched; after
                                                         --dispatch-wait: failed          [waiting]
recovering     ``recovery[app].suspects``                a worker names it: in flight; all
                                                         re-attached or the lease is out: due again
in flight      ``inflight`` (session set, or None while  RESULT: final; worker lost past its run
               orphaned: OrphanExpired armed)            lease: interrupted, re-run
                                                                               [dispatched, running]
following up   ``_follow_ups[app]`` (a retry or re-run   written: in the wheel as attempt + 1
               being written)
=============  ========================================  ===========================================
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import schedule
from ..protocol import ProtocolError
from ..store import (
    MAX_RERUNS,
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
from ..tasks import BackgroundTasks, cancel_and_wait, wait_until_set
from ..timer import WheelTimer
from .lines import JobLines, Turn, Verdict
from .writer import StatusWriter

if TYPE_CHECKING:
    from .cluster import Cluster, Origin
    from .session import WorkerSession

log = logging.getLogger("fastjob.scheduler")

DUE_SLICE = 256  # due items handled per loop iteration: the write flush runs between slices
# Allowed disagreement between servers' wall clocks when comparing one's heartbeat with fire times.
CLOCK_SKEW_MARGIN = 1.0
MAX_TEXT = 8192  # error texts and log lines are cut to this many characters before they are stored
CLAIM_LIMIT = 5000  # fires one claim transaction writes at most
MAX_CLAIMS_PER_SCAN = 20  # claims one scan pass makes for one app before the next app's turn
#: The line key that holds a job while fires its previous owner may have sent are unresolved.
RECOVERING = "recovering"
#: Statuses a worker may report in RESULT; "cancelled" is what version-1 workers call an
#: interruption (the server never asks a worker to cancel except for a timeout).
WORKER_STATUSES = {Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.INTERRUPTED, Status.KILLED}


@dataclass(slots=True)
class Inflight:
    """An instance sent to a worker (or recovered as sent) and not yet finished."""

    instance: InstanceRow
    job: JobRow
    session: WorkerSession | None
    worker_id: str | None  # the worker it was sent to
    refused_by: set[str] = field(default_factory=set)
    overdue_handle: int | None = None
    orphan_handle: int | None = None  # armed while no session holds it (awaiting re-attach)


@dataclass(slots=True)
class Pending:
    """A due fire that found no worker able to take it yet."""

    instance: InstanceRow
    job: JobRow
    refused_by: set[str] = field(default_factory=set)
    reason: str = "no worker connected"


# ---- what the timer holds: one type per kind of deadline -------------------------------------
@dataclass(frozen=True, slots=True)
class FireDue:
    """A fire's planned time, tagged with the epoch it was recorded under."""

    row: InstanceRow
    epoch: int


@dataclass(frozen=True, slots=True)
class RunOverdue:
    """A running instance passed its timeout plus a heartbeat: the server's safety net."""

    instance_id: int


@dataclass(frozen=True, slots=True)
class OrphanExpired:
    """An instance whose worker left has waited out that worker's run lease."""

    instance_id: int


@dataclass(frozen=True, slots=True)
class PendingExpired:
    """A due fire found no worker within --dispatch-wait."""

    entry: Pending


@dataclass(frozen=True, slots=True)
class RecoveryOver:
    """A gained app's previous owner's workers have surely stopped."""

    app: str
    epoch: int


TimerEntry = FireDue | RunOverdue | OrphanExpired | PendingExpired | RecoveryOver


@dataclass(slots=True)
class Recovery:
    """A gained app whose previous owner may have sent fires we cannot see.

    ``suspects`` are waiting rows it may have dispatched (their status write lost): each holds
    its job (key RECOVERING) until a worker names it (it is that worker's), or every worker the
    previous owner had has re-attached, or ``deadline`` passes (no run of theirs can still go
    on); then the unnamed ones are fired."""

    epoch: int
    expected: set[str]  # workers registered with the previous owner
    deadline: float  # timer time
    reattached: set[str] = field(default_factory=set)
    suspects: dict[int, InstanceRow] = field(default_factory=dict)
    held_jobs: set[int] = field(default_factory=set)  # jobs held by RECOVERING
    handle: int | None = None


class Scheduler:
    """Owns the wheel of this server and every fire of the apps this server owns."""

    def __init__(
        self,
        store: Store,
        cluster: Cluster,
        *,
        scan_horizon: float,
        scan_interval: float,
        dispatch_wait: float,
        misfire_threshold: float,
        heartbeat_timeout: float,
        run_lease: float,
        workers_of: Callable[[str], list[WorkerSession]],
        is_second_level: Callable[[JobRow], bool],
        status_flush_interval: float = 0.02,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.scan_horizon = scan_horizon
        self.scan_interval = scan_interval
        self.dispatch_wait = dispatch_wait
        self.misfire_threshold = misfire_threshold
        self.heartbeat_timeout = heartbeat_timeout
        self.run_lease = run_lease
        # extra wait past a worker's lease before its instance may run elsewhere (clock rates, RTT)
        self.lease_margin = 0.1 * heartbeat_timeout
        self.workers_of = workers_of
        self.is_second_level = is_second_level
        self.writer = StatusWriter(store, flush_interval=status_flush_interval)
        self.timer: WheelTimer | None = None
        self.jobs: dict[int, JobRow] = {}
        self.lines = JobLines()
        self.inflight: dict[int, Inflight] = {}
        self.pending: dict[str, list[Pending]] = {}
        self.wheel_handles: dict[int, int] = {}  # instance id -> wheel handle, for waiting fires
        self.waiting_per_job: collections.Counter[int] = collections.Counter()  # fires in the wheel, by job
        self.held: list[tuple[InstanceRow, int]] = []  # (row, epoch) due while our lease was stale
        self.recovery: dict[str, Recovery] = {}
        # apps being handed to another server: nothing more is sent; fires due meanwhile wait here
        self.draining: dict[str, list[tuple[InstanceRow, int]]] = {}
        self._dispatched: collections.Counter[str] = collections.Counter()  # fires sent per app, for fire_rates()
        self._rates_since = time.monotonic()
        self._follow_ups: dict[str, set[asyncio.Task[None]]] = {}  # retries/re-runs being written, by app
        # WAL writes that failed without an answer, by app: (epoch, created_at); they may have
        # committed, and then only a query by their stamp finds their fires (_recover_unanswered)
        self._unanswered: dict[str, list[tuple[int, float]]] = {}
        self._rr: dict[str, int] = {}
        self.tasks = BackgroundTasks(expected=(StoreError,))
        self._scan_task: asyncio.Task[None] | None = None
        self._scan_now = asyncio.Event()
        self._revalidating = False

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.timer = WheelTimer(self._on_due)
        self.writer.start()
        self._scan_task = asyncio.create_task(self._scan_loop(), name="fastjob-scan")

    async def stop(self) -> bool:
        """Stop firing and write what is pending.  True when our apps can be let go cleanly:
        every status is written and no fire of a previous owner is still unresolved (a
        successor that finds an app released or handed over holds nothing back)."""
        await cancel_and_wait(self._scan_task, 10.0, "the scan loop")
        await self.tasks.close()
        if self.timer is not None:
            self.timer.close()
        flushed = await self.writer.stop()
        return flushed and not any(rec.suspects or rec.held_jobs for rec in self.recovery.values())

    def wake_scan(self) -> None:
        self._scan_now.set()

    # ---- ownership callbacks -------------------------------------------------------------
    async def app_gained(self, app: str, epoch: int, origin: Origin) -> None:
        """Recover the app's WAL: waiting fires go into the wheel; fires the previous owner may
        have sent hold their jobs until their workers re-attach or surely stopped."""
        # our own statuses first: an app we owned before (and dropped) must not be recovered from
        # rows that our pending writes have not reached (a finished run would look dispatched)
        await self.writer.flush()
        self._unanswered.pop(app, None)  # every unfinished row is loaded below
        rows = await self.store.load_unfinished(app)
        await self.load_jobs(app)
        expected: set[str] = set()
        if origin.prev_owner is not None:
            expected = {w.worker_id for w in await self.store.list_workers(app, origin.prev_owner)}
        now = time.time()
        if origin.left_clean or origin.prev_owner is None:
            # it wrote everything and closed its sessions now: its workers' leases run from here
            cutoff_ms, until = -1, now + self.run_lease + self.lease_margin
        else:
            # it sent fires only while its lease held: up to its last heartbeat plus the timeout
            last = origin.prev_last_heartbeat if origin.prev_last_heartbeat is not None else now
            lease_end = last + self.heartbeat_timeout + CLOCK_SKEW_MARGIN
            cutoff_ms = min(schedule.now_ms(), math.ceil(lease_end * 1000))
            until = max(now, lease_end + self.run_lease + self.lease_margin)
        rec = Recovery(epoch, expected, self._timer_time_of(int(until * 1000)))
        for row in rows:
            job = await self.job(row.job_id)
            if job is None:
                continue
            if row.status in (Status.WAITING, Status.QUEUED) and row.epoch < epoch and row.planned_ms <= cutoff_ms:
                rec.suspects[row.id] = row
                rec.held_jobs.add(job.id)
                self.lines.hold(job.id, RECOVERING)
            elif row.status in (Status.WAITING, Status.QUEUED):
                self._enter_wheel(row, epoch)
            elif row.id not in self.inflight:
                flight = Inflight(row, job, None, row.worker)
                self.inflight[row.id] = flight
                self.lines.hold(job.id, row.id)
                flight.orphan_handle = self._arm(OrphanExpired(row.id), rec.deadline - WheelTimer.time())
        self.recovery[app] = rec
        rec.handle = self._arm(RecoveryOver(app, epoch), rec.deadline - WheelTimer.time())
        await self._restart_delay_chains(app, epoch, rows)
        log.info("app %s: gained at epoch %d from %s (%s), recovered %d unfinished instances; %d fires it may"
                 " have sent wait for %d of its workers or %.1fs", app, epoch, origin.prev_owner,
                 "clean" if origin.left_clean else "unclean", len(rows), len(rec.suspects), len(expected),
                 max(0.0, until - now))
        # workers accepted while the WAL was loading named their instances before they were known
        for session in self.workers_of(app):
            if session.role == "worker":
                self.worker_joined(session, session.hello_running, session.hello_finished)
        self._maybe_end_recovery(app)
        self.wake_scan()

    async def _restart_delay_chains(self, app: str, epoch: int, unfinished: list[InstanceRow]) -> None:
        """A fixed-delay job with no next fire and nothing in flight lost its chain in a crash: restart it."""
        busy = {row.job_id for row in unfinished}
        for job in [j for j in self.jobs.values() if j.app == app]:
            if job.next_trigger_ms is None and job.id not in busy and self._delay_chain(job):
                log.info("job %s (%d): fixed-delay chain had no next fire; restarting it", job.name, job.id)
                await self.store.set_next_trigger(self.cluster.server_id, app, epoch, job.id, schedule.now_ms())

    async def app_lost(self, app: str) -> None:
        """Forget every fire of the app; its new owner has them in the database."""
        # waiting fires stay in the wheel and are dropped when due: fire() checks ownership
        self.pending.pop(app, None)
        self.draining.pop(app, None)
        self._unanswered.pop(app, None)
        rec = self.recovery.pop(app, None)
        if rec is not None and rec.handle is not None and self.timer is not None:
            self.timer.cancel(rec.handle)
        for flight in list(self.inflight.values()):
            if flight.instance.app == app:
                self._forget_flight(flight)
                if flight.orphan_handle is not None and self.timer is not None:
                    self.timer.cancel(flight.orphan_handle)
        self.held = [(row, epoch) for row, epoch in self.held if row.app != app]
        self.lines.forget({job.id for job in self.jobs.values() if job.app == app})
        for session in self.workers_of(app):
            session.redirect_away()

    async def drain_app(self, app: str, timeout: float = 5.0) -> bool:
        """Stop sending the app's fires and write everything about it, before handing it over.

        True when the app can go clean: nothing unwritten, nothing of a previous owner unresolved."""
        self.draining.setdefault(app, [])
        follow_ups = list(self._follow_ups.get(app, ()))
        if follow_ups:
            await asyncio.wait(follow_ups, timeout=timeout)
        flushed = await self.writer.flush()
        rec = self.recovery.get(app)
        unresolved = rec is not None and bool(rec.suspects or rec.held_jobs)
        return flushed and all(task.done() for task in follow_ups) and not unresolved

    def undrain(self, app: str) -> None:
        """A hand-over did not happen: keep serving the app; the fires due meanwhile go out now."""
        for row, epoch in self.draining.pop(app, []):
            self.fire(row, epoch)
        self.wake_scan()

    # ---- jobs cache ------------------------------------------------------------------------
    async def job(self, job_id: int) -> JobRow | None:
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
            await wait_until_set(self._scan_now, self.scan_interval)
            self._scan_now.clear()
            if not self.cluster.lease_valid():
                continue
            for app, epoch in list(self.cluster.owned.items()):
                if app in self.draining:
                    continue
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
        """Claim the app's fires due within the horizon and put them into the wheel.

        A claim writes at most CLAIM_LIMIT fires (a bounded transaction); while one comes back
        full, the next is claimed at once: 10,000 per-second jobs need 10,000 fires a second."""
        await self._recover_unanswered(app, epoch)
        claimed = 0
        for _ in range(MAX_CLAIMS_PER_SCAN):
            now = time.time()
            horizon_ms = int((now + self.scan_horizon) * 1000)
            planner = schedule.make_planner(int(now * 1000), int(self.misfire_threshold * 1000))
            try:
                rows = await self.store.claim_due(self.cluster.server_id, app, epoch, horizon_ms, planner, now,
                                                  limit=CLAIM_LIMIT)
            except StoreError:
                self._unanswered.setdefault(app, []).append((epoch, now))
                raise
            await self._wheel_claimed(app, epoch, rows)
            claimed += len(rows)
            if len(rows) < CLAIM_LIMIT:
                break
        if claimed:
            log.debug("app %s: claimed %d fires", app, claimed)
        return claimed

    async def _wheel_claimed(self, app: str, epoch: int, rows: list[InstanceRow]) -> None:
        jobs = self.jobs
        if any(row.job_id not in jobs for row in rows):
            await self.load_jobs(app)  # one query for the app, not a round trip per job
        for row in rows:
            if row.job_id in jobs:
                self._enter_wheel(row, epoch)

    async def _recover_unanswered(self, app: str, epoch: int) -> None:
        """Wheel the fires of our WAL writes that failed without an answer but committed (the
        reply lost, every retry failed): no one else holds them. A write of an older epoch is
        the business of whoever gained the app since (it loads every unfinished row)."""
        unanswered = self._unanswered.get(app)
        while unanswered:
            written_epoch, created_at = unanswered[0]
            if written_epoch == epoch:
                rows = await self.store.written_at(self.cluster.server_id, app, epoch, created_at)
                known = [r for r in rows if r.id in self.wheel_handles or r.id in self.inflight]
                if rows:
                    log.warning("app %s: %d fires of a write whose answer was lost found in the WAL",
                                app, len(rows) - len(known))
                await self._wheel_claimed(app, epoch, [r for r in rows if r not in known])
            unanswered.pop(0)

    # ---- the wheel -------------------------------------------------------------------------
    @staticmethod
    def _timer_time_of(epoch_ms: int) -> float:
        """A wall-clock instant on the timer's monotonic clock."""
        return WheelTimer.time() + (epoch_ms / 1000.0 - time.time())

    def _enter_wheel(self, row: InstanceRow, epoch: int, at: float | None = None) -> None:
        """Put a fire into the wheel, tagged with the epoch it was recorded under (one entry per row)."""
        assert self.timer is not None
        previous = self.wheel_handles.pop(row.id, None)
        if previous is not None:
            self.timer.cancel(previous)
        else:
            self.waiting_per_job[row.job_id] += 1
        when = at if at is not None else self._timer_time_of(row.planned_ms)
        self.wheel_handles[row.id] = self.timer.call_at(when, FireDue(row, epoch))

    def _left_wheel(self, job_id: int) -> None:
        self.waiting_per_job[job_id] -= 1
        if self.waiting_per_job[job_id] <= 0:
            del self.waiting_per_job[job_id]

    def _links_in_motion(self, job: JobRow) -> bool:
        """Has the job a fire waiting in the wheel, in its line (running, queued, waiting for a worker) or held?"""
        return (self.waiting_per_job[job.id] > 0 or self.lines.busy(job.id)
                or any(row.job_id == job.id for row, _ in self.held))

    def _arm(self, item: TimerEntry, delay: float) -> int:
        assert self.timer is not None
        return self.timer.call_later(max(0.0, delay), item)

    def _on_due(self, items: list[TimerEntry]) -> None:
        """Handle due items; a big burst goes in slices so frames leave while the rest waits."""
        if len(items) > DUE_SLICE:
            asyncio.get_running_loop().call_soon(self._on_due, items[DUE_SLICE:])
            items = items[:DUE_SLICE]
        for item in items:
            try:
                self._due(item)
            except Exception:  # one bad item must not cost the rest of the batch
                log.exception("scheduler: %s failed", item)

    def _due(self, item: TimerEntry) -> None:
        if isinstance(item, FireDue):  # by far the most frequent
            if self.wheel_handles.pop(item.row.id, None) is not None:
                self._left_wheel(item.row.job_id)
            self.fire(item.row, item.epoch)
        elif isinstance(item, RunOverdue):
            self._overdue(item.instance_id)
        elif isinstance(item, OrphanExpired):
            self._orphan_expired(item.instance_id)
        elif isinstance(item, PendingExpired):
            self._pending_expired(item.entry)
        else:
            self._end_recovery(item.app, item.epoch, "the previous owner's workers surely stopped")

    # ---- dispatch --------------------------------------------------------------------------
    def fire(self, row: InstanceRow, epoch: int) -> None:
        """A fire is due: by its job's line, dispatch it, queue it or skip it (or hold it: stale lease)."""
        if not self.cluster.owns(row.app, epoch):
            return  # the app moved: its owner fires this row from the WAL
        if row.id in self.inflight:
            return  # already sent
        if row.app in self.draining:
            self.draining[row.app].append((row, epoch))  # for its next owner (or for us, if it stays)
            return
        if not self.cluster.lease_valid():
            self.held.append((row, epoch))
            self._revalidate_lease()
            return
        job = self.jobs.get(row.job_id)
        if job is None or job.is_delete or (not job.enabled and row.trigger != "api"):
            self._finish(row, Status.CANCELLED, error="job deleted or disabled before its fire")
            return
        verdict, reason = self.lines.admit(job, row, epoch)
        if verdict is Verdict.SKIP:
            self._finish(row, Status.SKIPPED, error=reason, job=job)
        elif verdict is Verdict.WAIT:
            self.writer.update(InstanceUpdate(row.id, Status.QUEUED))
        else:
            self._dispatch(row, job, set())

    def _start_turns(self, turn: Turn | None) -> None:
        """Start the next fire of a line that became free (it already holds its job)."""
        if turn is not None:
            # call_soon: a chain of fires that end at once (cancelled, skipped) never recurses
            asyncio.get_running_loop().call_soon(self.fire, turn.row, turn.epoch)

    def _dispatch(self, row: InstanceRow, job: JobRow, refused_by: set[str]) -> None:
        """Send the fire to a worker, or queue it until one can take it."""
        session = self._route(row.app, job, refused_by)
        if session is None:
            self._queue_pending(row, job, refused_by)
        else:
            self._send_dispatch(session, row, job, refused_by)

    def _send_dispatch(self, session: WorkerSession, row: InstanceRow, job: JobRow, refused_by: set[str]) -> None:
        try:
            self._send_dispatch_frame(session, row, job)
        except ProtocolError as exc:  # e.g. params larger than a frame: fails this instance only
            self._finish(row, Status.FAILED, error=f"could not dispatch: {exc.message}", job=job)
            return
        flight = Inflight(row, job, session, session.worker_id, refused_by=refused_by)
        self.inflight[row.id] = flight
        self._dispatched[row.app] += 1
        session.runs(row.id)
        if job.timeout:
            # the worker enforces the timeout; this is the safety net if its answer never comes
            flight.overdue_handle = self._arm(RunOverdue(row.id), job.timeout + self.heartbeat_timeout)
        self.writer.update(InstanceUpdate(
            row.id, Status.DISPATCHED, worker=session.worker_id, dispatched_at=time.time()))

    @staticmethod
    def _send_dispatch_frame(session: WorkerSession, row: InstanceRow, job: JobRow) -> None:
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

    def _route(self, app: str, job: JobRow, refused_by: set[str]) -> WorkerSession | None:
        tags = job.tags
        candidates = [
            s for s in self.workers_of(app)
            if s.accepts_jobs and (not refused_by or s.worker_id not in refused_by) and s.has_room()
            and (not tags or s.has_tags(tags))
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
        self._arm(PendingExpired(entry), self.dispatch_wait)

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
            self._finish(entry.instance, Status.FAILED, job=entry.job,
                         error=f"{entry.reason} within {self.dispatch_wait:.0f}s")

    # ---- worker reports --------------------------------------------------------------------
    def _flight_of(self, session: WorkerSession, instance_id: int) -> Inflight | None:
        """The instance in flight on this very session; reports about any other are ignored."""
        flight = self.inflight.get(instance_id)
        if flight is None or flight.session is not session or flight.instance.app != session.app:
            return None
        return flight

    def on_ack(self, session: WorkerSession, body: dict[str, Any]) -> None:
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

    def on_start(self, session: WorkerSession, body: dict[str, Any]) -> None:
        flight = self._flight_of(session, body["instance_id"])
        if flight is None:
            return
        self.writer.update(InstanceUpdate(
            flight.instance.id, Status.RUNNING, worker=session.worker_id, started_at=body["started_at"]))

    def on_logs(self, session: WorkerSession, body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        if self._flight_of(session, instance_id) is None:
            return  # logs come before their RESULT; lines for instances not on this session are dropped
        self.writer.logs([LogLine(instance_id, float(ts), str(level)[:16], str(message)[:MAX_TEXT])
                          for ts, level, message in body["lines"]])

    @staticmethod
    def _reported_status(body: dict[str, Any]) -> Status:
        try:
            status = Status(body["status"])
        except ValueError:
            return Status.FAILED
        if status is Status.CANCELLED:
            return Status.INTERRUPTED
        return status if status in WORKER_STATUSES else Status.FAILED

    def on_result(self, session: WorkerSession, body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        status = self._reported_status(body)
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

    async def _record_untracked(self, session: WorkerSession, instance_id: int, status: Status,
                                body: dict[str, Any], error: str | None) -> None:
        row = await self.store.get_instance(instance_id)
        if row is None or row.app != session.app:
            log.warning("worker %s of app %s reported instance %d of another app; ignored",
                        session.worker_id, session.app, instance_id)
            return
        self.writer.update(InstanceUpdate(
            instance_id, status, worker=session.worker_id, started_at=body.get("started_at"),
            finished_at=body["finished_at"], result=body.get("result"), error=error))

    # ---- workers coming and going ------------------------------------------------------------
    def worker_joined(self, session: WorkerSession, running: Sequence[int], finished: Sequence[int] = ()) -> None:
        """Re-attach the instances a (re)connecting worker says it still runs or just finished;
        re-run those it was sent and does not have."""
        app = session.app
        named = {*running, *finished}
        rec = self.recovery.get(app)
        for instance_id in named:
            if rec is not None and instance_id in rec.suspects:
                self._claim_suspect(session, rec, instance_id)
            flight = self.inflight.get(instance_id)
            if flight is not None and flight.instance.app == app and flight.session is None:
                self._reattach(session, flight, finished_here=instance_id not in running)
        for flight in [f for f in self.inflight.values()
                       if f.session is None and f.instance.app == app and f.worker_id == session.worker_id
                       and f.instance.id not in named]:
            self._orphan_resolved(flight, f"worker {session.worker_id} came back without it")
        if rec is not None:
            rec.reattached.add(session.worker_id)
            self._maybe_end_recovery(app)
        self.drain_pending(app)

    def _reattach(self, session: WorkerSession, flight: Inflight, finished_here: bool) -> None:
        flight.session = session
        flight.worker_id = session.worker_id
        session.runs(flight.instance.id)
        if flight.orphan_handle is not None and self.timer is not None:
            self.timer.cancel(flight.orphan_handle)  # a later disconnect gets a full grace again
            flight.orphan_handle = None
        if finished_here:  # finished while we were apart: ask for the result again
            self._send_dispatch_frame(session, flight.instance, flight.job)
        log.info("instance %d: re-attached to worker %s", flight.instance.id, session.worker_id)

    def _claim_suspect(self, session: WorkerSession, rec: Recovery, instance_id: int) -> None:
        """A worker names a fire the previous owner may have sent it: it is that worker's. It
        keeps its one running copy (ACK) or replays its stored RESULT: the instance runs once."""
        row = rec.suspects[instance_id]
        job = self.jobs.get(row.job_id)
        if row.app != session.app or job is None:
            return
        del rec.suspects[instance_id]
        self.lines.hold(job.id, row.id)
        log.info("instance %d: reclaimed from worker %s after the failover", row.id, session.worker_id)
        self._send_dispatch(session, row, job, set())

    def _maybe_end_recovery(self, app: str) -> None:
        rec = self.recovery.get(app)
        if rec is not None and rec.expected <= rec.reattached:
            self._end_recovery(app, rec.epoch, "every worker of the previous owner re-attached")

    def _end_recovery(self, app: str, epoch: int, why: str) -> None:
        """The suspects nobody named are surely not running: they take their turns now, in planned order."""
        rec = self.recovery.get(app)
        if rec is None or rec.epoch != epoch or not self.cluster.owns(app, epoch):
            return
        del self.recovery[app]
        if rec.handle is not None and self.timer is not None:
            self.timer.cancel(rec.handle)
        if rec.suspects:
            log.info("app %s: %s; firing %d held-back fires", app, why, len(rec.suspects))
        for row in sorted(rec.suspects.values(), key=lambda r: (r.planned_ms, r.attempt)):
            self.lines.push(row, epoch)
        for job_id in rec.held_jobs:
            self._start_turns(self.lines.release(job_id, RECOVERING))

    def worker_left(self, session: WorkerSession) -> None:
        """Its running instances wait for the worker to come back until its run lease has surely
        run out (no run of its can go on after that), then run again elsewhere."""
        loop = asyncio.get_running_loop()
        safe_in = session.last_received + self.run_lease + self.lease_margin - loop.time()
        for instance_id in session.forget_runs():
            flight = self.inflight.get(instance_id)
            if flight is not None and flight.session is session:
                flight.session = None
                flight.orphan_handle = self._arm(OrphanExpired(instance_id), safe_in)

    def _orphan_expired(self, instance_id: int) -> None:
        flight = self.inflight.get(instance_id)
        if flight is None or flight.session is not None:
            return
        flight.orphan_handle = None
        self._orphan_resolved(flight, f"worker {flight.worker_id} lost: it did not come back within its run lease")

    def _orphan_resolved(self, flight: Inflight, why: str) -> None:
        """Nobody runs this instance any more: it ends interrupted, and runs again."""
        if flight.orphan_handle is not None and self.timer is not None:
            self.timer.cancel(flight.orphan_handle)
            flight.orphan_handle = None
        self._forget_flight(flight)
        self._finish(flight.instance, Status.INTERRUPTED, job=flight.job, error=why)

    def worker_draining(self, session: WorkerSession) -> None:
        """A stopping worker takes nothing new: the fires waiting for a worker go elsewhere."""
        self.drain_pending(session.app)

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
        self.inflight.pop(flight.instance.id, None)
        if flight.session is not None:
            flight.session.ended(flight.instance.id)
        if flight.overdue_handle is not None and self.timer is not None:
            self.timer.cancel(flight.overdue_handle)
            flight.overdue_handle = None

    # ---- final states, retries, re-runs, fixed delay -----------------------------------------
    def _finish(
        self,
        row: InstanceRow,
        status: Status,
        *,
        result: Any = None,
        error: str | None = None,
        worker: str | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
        job: JobRow | None = None,
    ) -> None:
        """Record a final status, then start what follows it: a retry, a re-run, or the next in line."""
        finished_at = finished_at or time.time()
        if status is not Status.SUCCEEDED and error:
            log.info("instance %d (job %d, app %s, attempt %d): %s: %s",
                     row.id, row.job_id, row.app, row.attempt, status.value, error)
        self.writer.update(InstanceUpdate(row.id, status, worker=worker, started_at=started_at,
                                          finished_at=finished_at, result=result, error=error))
        job = job or self.jobs.get(row.job_id)
        follow = self._follow_up(row, status, job)
        if follow is not None and job is not None:
            # the retry or re-run keeps the fire's turn: nothing behind it starts meanwhile
            key = ("follow", row.id)
            self._spawn_follow_up(row, job, follow, key if self.lines.replace(job.id, row.id, key) else None)
            return
        self._start_turns(self.lines.release(row.job_id, row.id))
        if job is None:
            return
        if status not in (Status.SKIPPED, Status.CANCELLED):
            self.writer.job_finished(job.id, finished_at)
        current = self.jobs.get(job.id, job)
        # one chain per fixed-delay job: a finish continues it only when no other link is in motion
        # (a re-enable or an API run may have started one), so parallel links merge into one
        if row.trigger != "api" and self._delay_chain(current) and not self._links_in_motion(current):
            self.tasks.spawn(self._continue_chain(row, job, finished_at), f"fastjob-chain-{row.id}")

    @staticmethod
    def _follow_up(row: InstanceRow, status: Status, job: JobRow | None) -> str | None:
        """"retry" (a failure with retries left), "rerun" (an interruption), or None."""
        if job is None:
            return None
        if status in (Status.FAILED, Status.TIMED_OUT) and row.attempt - row.reruns <= job.retry_times:
            return "retry"
        if status is Status.INTERRUPTED and row.reruns < MAX_RERUNS:
            return "rerun"
        return None

    def _spawn_follow_up(self, row: InstanceRow, job: JobRow, follow: str, key: Any) -> None:
        task = self.tasks.spawn(self._write_follow_up(row, job, follow, key), f"fastjob-{follow}-{row.id}")
        tasks = self._follow_ups.setdefault(row.app, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _delay_chain(self, job: JobRow) -> bool:
        """Is this a live fixed-delay job whose next fire is chained to the previous finish?"""
        return (job.schedule_type is ScheduleType.FIXED_DELAY and not job.run_once and job.enabled
                and not job.is_delete and not self.is_second_level(job))

    async def _write_follow_up(self, row: InstanceRow, job: JobRow, follow: str, key: Any) -> None:
        """Write the WAL row of a retry or re-run (kept trying while we own the app), then wheel it."""
        rerun = follow == "rerun"
        again: InstanceRow | None = None
        delay = 0.05
        created_at = time.time()  # one stamp for every try: a try that committed unheard is recognised
        try:
            while True:
                epoch = self.cluster.owned.get(row.app)
                if epoch is None:
                    return  # the app moved: its new owner finds this row final and nothing after it
                try:
                    again = await self.store.insert_instance(
                        self.cluster.server_id, row.app, epoch, job.id, row.planned_ms, row.attempt + 1, follow,
                        row.params, created_at, reruns=row.reruns + int(rerun))
                    break
                except NotOwnerError:
                    return
                except StoreError as exc:
                    log.warning("instance %d: %s not written yet, will retry: %s", row.id, follow, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            if again is None and key is not None:
                self._start_turns(self.lines.release(job.id, key))
        if again is None:
            return
        if key is not None:
            self.lines.replace(job.id, key, again.id)
        wait = 0.0 if rerun else schedule.retry_delay(job, row.attempt - row.reruns)
        log.info("instance %d: %s as %d (attempt %d) in %.2fs", row.id, follow, again.id, again.attempt, wait)
        self._enter_wheel(again, epoch, WheelTimer.time() + wait)

    async def _continue_chain(self, row: InstanceRow, job: JobRow, finished_at: float) -> None:
        """A fixed delay's next fire is due ``period`` after this finish: the job's next_trigger_ms."""
        epoch = self.cluster.owned.get(row.app)
        if epoch is None:
            return
        # the chain lives in one place, the job's next_trigger_ms: a re-enable or an edit that
        # also set it can never start a second chain, and the scan claims it like any fire
        period = schedule.parse_period(self.jobs.get(job.id, job).schedule_expr)
        next_ms = math.ceil((finished_at + period) * 1000)  # never before finish + delay
        await self.store.set_next_trigger(self.cluster.server_id, row.app, epoch, job.id, next_ms)
        self.wake_scan()

    async def trigger(self, app: str, job: JobRow, params: Any) -> InstanceRow:
        """An API call fires the job now (WAL first, then the wheel)."""
        epoch = self.cluster.owned.get(app)
        if epoch is None or app in self.draining:
            raise NotOwnerError(app, -1)
        planned = schedule.now_ms()
        for bump in range(50):  # two triggers in the same millisecond get distinct planned times
            created_at = time.time()
            try:
                row = await self.store.insert_instance(
                    self.cluster.server_id, app, epoch, job.id, planned + bump, 1, "api", params, created_at)
            except StoreError:
                self._unanswered.setdefault(app, []).append((epoch, created_at))
                raise
            if row is not None:
                self.jobs[job.id] = job
                self._enter_wheel(row, epoch, WheelTimer.time())
                return row
        raise StoreError(f"job {job.name}: could not record the trigger")

    def fire_rates(self) -> dict[str, float]:
        """Fires sent per second by app since the last call (for balancing apps over servers)."""
        now = time.monotonic()
        elapsed = max(1e-3, now - self._rates_since)
        rates = {app: count / elapsed for app, count in self._dispatched.items()}
        self._dispatched.clear()
        self._rates_since = now
        return rates

    # ---- lease ------------------------------------------------------------------------------
    def _revalidate_lease(self) -> None:
        if self._revalidating:
            return
        self._revalidating = True
        self.tasks.spawn(self._release_held(), "fastjob-lease")

    async def _release_held(self) -> None:
        """Re-read our epochs, drop fires of apps we lost, then fire the rest.

        A renewal that took longer than the lease it earns (the database came back in the middle
        of it) leaves the lease stale: renew again, rather than hold the fires again and wait for
        a revalidation that nobody starts."""
        try:
            while True:
                try:
                    await self.cluster.renew()
                except StoreError as exc:
                    log.warning("lease renewal failed, fires stay held: %s", exc)
                    await asyncio.sleep(self.cluster.interval)
                    continue
                if self.cluster.lease_valid():
                    break
        finally:
            self._revalidating = False
        held, self.held = self.held, []
        log.info("lease renewed; releasing %d held fires", len(held))
        for row, epoch in held:
            self.fire(row, epoch)
