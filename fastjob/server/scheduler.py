"""The life of a regular fire on its owner server: scan, WAL, wheel, overlap, dispatch, result.

A scan pass (:mod:`.scan`) claims, per owned app, every job due within the horizon; the store writes the
instance rows (the WAL) and advances the jobs in one fenced transaction. Only then do the
fires enter the timing wheel. When the wheel says a fire is due, its job's line (overlap
policy, :mod:`.lines`) says whether it runs now, waits its turn or is skipped; a fire that
runs is dispatched to a worker of the app. With a lead time, a fire comes out of the wheel that
long before it is due and, if its job's line is free, goes ahead to a worker (protocol 5) whose
own wheel starts it at its planned time (:meth:`Scheduler.lead`). Status changes are written in batches by
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
pending        ``dispatcher.pending[app]``               a worker with room: dispatched; after
               (:mod:`.dispatch`)                        --dispatch-wait: failed          [waiting]
recovering     ``recovery.apps[app].suspects``           a worker names it: in flight; all
               (:mod:`.recovery`)                        re-attached or the lease is out: due again
in flight      ``dispatcher.inflight`` (session set, or  RESULT: final; worker lost past its run
               None while orphaned: OrphanExpired        lease: interrupted, re-run
               armed, :mod:`.recovery`); a lead fire     (a lead fire its worker gives back or
               (``lead``) was sent ahead, its worker     drops: in the wheel again; its worker
               starts it at its planned time             closed the connection: ahead elsewhere)
                                                                               [dispatched, running]
following up   ``follow_ups`` (:mod:`.follow_ups`: a     written: in the wheel as attempt + 1
               retry or re-run being written)
=============  ========================================  ===========================================
"""
from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..clock import SYSTEM_CLOCK, Clock, Timer, TimerFactory, timer_time, wall_ms
from ..models import InstanceRow, InstanceUpdate, JobRow, Status
from ..store import NotOwnerError, Store, StoreError
from ..tasks import BackgroundTasks
from ..timer import WheelTimer
from .alarms import AlarmRules
from .dispatch import LEAD_MIN, LEAD_SKEW_MARGIN, Dispatcher
from .fires import FireDue, Inflight, OrphanExpired, PendingExpired, RunOverdue, TimerEntry
from .follow_ups import FollowUps, follow_up
from .interventions import Interventions
from .lines import FORCED, OPERATOR_TRIGGERS, JobLines, Turn, Verdict
from .metrics import Metrics
from .recovery import FailoverRecovery, recovery_window
from .scan import Scanner
from .writer import StatusWriter

if TYPE_CHECKING:
    from .cluster import Cluster, Origin
    from .session import WorkerSession

log = logging.getLogger("fastjob.scheduler")

DUE_SLICE = 256  # due items handled per loop iteration: the write flush runs between slices


def _due_order(item: TimerEntry) -> tuple[int, int]:
    """Fires by planned time and attempt; other deadlines first (they carry no order of their own)."""
    return (item.row.planned_ms, item.row.attempt) if isinstance(item, FireDue) else (0, 0)


class Scheduler:
    """Owns the wheel of this server and every fire of the apps this server owns.

    It scans, wheels and fires; :class:`~.dispatch.Dispatcher` sends fires and takes the
    workers' reports, :class:`~.recovery.FailoverRecovery` settles a gained app's fires and
    the runs of workers that left, :class:`~.follow_ups.FollowUps` writes retries, re-runs
    and fixed-delay links."""

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
        clock: Clock = SYSTEM_CLOCK,
        timer_factory: TimerFactory = WheelTimer,
        metrics: Metrics | None = None,
        alarm_rules: AlarmRules | None = None,
        lead_time: float = 0.0,
    ) -> None:
        """``lead_time``: seconds before its planned time a fire goes to a worker that takes lead fires
        (protocol version 5), whose own timer starts it on time; 0: every fire is sent when due."""
        self.store = store
        self.cluster = cluster
        self.lead_time = lead_time
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.alarm_rules = alarm_rules or AlarmRules([], cluster.server_id, str)
        self.timer_factory = timer_factory
        self.heartbeat_timeout = heartbeat_timeout
        self.run_lease = run_lease
        # extra wait past a worker's lease before its instance may run elsewhere (clock rates, RTT)
        self.lease_margin = 0.1 * heartbeat_timeout
        self.workers_of = workers_of
        self.writer = StatusWriter(store, flush_interval=status_flush_interval)
        self.timer: Timer | None = None
        self.jobs: dict[int, JobRow] = {}
        self.lines = JobLines()
        self.wheel_handles: dict[int, int] = {}  # instance id -> wheel handle, for waiting fires
        # fires in the wheel, by job (a plain dict: Counter's __delitem__ is Python code, and ran per fire)
        self.waiting_per_job: dict[int, int] = {}
        self.held: list[tuple[InstanceRow, int]] = []  # (row, epoch) due while our lease was stale
        # job id -> heap of (planned_ms, attempt, id, row, epoch): fires whose lead time came while their
        # job's line was busy; the next is sent ahead when the line frees (they also wait in the wheel)
        self.lead_deferred: dict[int, list[tuple[int, int, int, InstanceRow, int]]] = {}
        # job id -> planned ms of its latest fire put into the wheel to go ahead: a fire goes ahead at most
        # half the gap after the one before it, when that one has usually ended (its line is free)
        self._last_lead_planned: dict[int, int] = {}
        # apps being handed to another server: nothing more is sent; fires due meanwhile wait here
        self.draining: dict[str, list[tuple[InstanceRow, int]]] = {}
        self.tasks = BackgroundTasks(expected=(StoreError,))
        self.dispatcher = Dispatcher(
            store=store, writer=self.writer, alarms=self, finish=self.finish, workers_of=workers_of,
            jobs=self.jobs, tasks=self.tasks, dispatch_wait=dispatch_wait, heartbeat_timeout=heartbeat_timeout,
            clock=clock, metrics=self.metrics, alarm_rules=self.alarm_rules, back_to_wheel=self.back_to_wheel)
        self.recovery = FailoverRecovery(
            dispatcher=self.dispatcher, lines=self.lines, jobs=self.jobs, alarms=self, finish=self.finish,
            start_turns=self.start_turns, owns=cluster.owns, run_lease=run_lease, lease_margin=self.lease_margin,
            clock=clock)
        self.follow_ups = FollowUps(
            store=store, server_id=cluster.server_id, epoch_of=lambda app: cluster.owned.get(app),
            lines=self.lines, jobs=self.jobs, tasks=self.tasks, enter_wheel=self.enter_wheel,
            start_turns=self.start_turns, wake_scan=self.wake_scan, is_second_level=is_second_level, clock=clock)
        self.scanner = Scanner(
            store=store, cluster=cluster, jobs=self.jobs, load_jobs=self.load_jobs, enter_wheel=self.enter_wheel,
            known=lambda instance_id: instance_id in self.wheel_handles or instance_id in self.dispatcher.inflight,
            draining=self.draining, tasks=self.tasks, clock=clock, scan_horizon=scan_horizon,
            scan_interval=scan_interval, misfire_threshold=misfire_threshold)
        self.interventions = Interventions(
            store=store, server_id=cluster.server_id, epoch_of=lambda app: cluster.owned.get(app),
            dispatcher=self.dispatcher, lines=self.lines, wheel_handles=self.wheel_handles,
            left_wheel=self._left_wheel, cancel_timer=self.cancel, enter_wheel=self.enter_wheel,
            unanswered=self.scanner.unanswered, jobs=self.jobs, finish=self.finish, clock=clock)
        self._revalidating = False

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.timer = self.timer_factory(self._on_due)
        self.writer.start()
        self.scanner.start()

    async def stop(self) -> bool:
        """Stop firing and write what is pending.  True when our apps can be let go cleanly:
        every status is written and no fire of a previous owner is still unresolved (a
        successor that finds an app released or handed over holds nothing back)."""
        await self.scanner.stop()
        await self.tasks.close()
        if self.timer is not None:
            self.timer.close()
        flushed = await self.writer.stop()
        return flushed and not any(self.recovery.unresolved(app) for app in list(self.recovery.apps))

    def wake_scan(self) -> None:
        self.scanner.wake()

    # ---- ownership callbacks -------------------------------------------------------------
    async def app_gained(self, app: str, epoch: int, origin: Origin) -> None:
        """Recover the app's WAL: waiting fires go into the wheel; fires the previous owner may
        have sent hold their jobs until their workers re-attach or surely stopped."""
        # our own statuses first: an app we owned before (and dropped) must not be recovered from
        # rows that our pending writes have not reached (a finished run would look dispatched)
        await self.writer.flush()
        self.scanner.forget(app)  # every unfinished row is loaded below
        rows = await self.store.load_unfinished(app)
        await self.load_jobs(app)
        expected: set[str] = set()
        if origin.prev_owner is not None:
            expected = {w.worker_id for w in await self.store.list_workers(app, origin.prev_owner)}
        now = self.clock.wall()
        cutoff_ms, until = recovery_window(origin, now, heartbeat_timeout=self.heartbeat_timeout,
                                           run_lease=self.run_lease, lease_margin=self.lease_margin,
                                           lead_time=self.lead_time)
        with_jobs = []
        for row in rows:
            job = await self.job(row.job_id)
            if job is not None:
                with_jobs.append((row, job))
        for row in self.recovery.recover(app, epoch, expected, cutoff_ms, until, with_jobs):
            self.enter_wheel(row, epoch)
        await self.follow_ups.settle_periodic_jobs(app, epoch, rows)
        suspects = len(self.recovery.apps[app].suspects) if app in self.recovery.apps else 0
        log.info("app %s: gained at epoch %d from %s (%s), recovered %d unfinished instances; %d fires it may"
                 " have sent wait for %d of its workers or %.1fs", app, epoch, origin.prev_owner,
                 "clean" if origin.left_clean else "unclean", len(rows), suspects, len(expected),
                 max(0.0, until - now))
        # workers accepted while the WAL was loading named their instances before they were known
        for session in self.workers_of(app):
            if session.role == "worker":
                self.recovery.worker_joined(session, session.hello_running, session.hello_finished)
        self.recovery.maybe_end(app)
        self.wake_scan()

    async def app_lost(self, app: str) -> None:
        """Forget every fire of the app; its new owner has them in the database."""
        # waiting fires stay in the wheel and are dropped when due: fire() checks ownership
        self.draining.pop(app, None)
        self.scanner.forget(app)
        self.recovery.forget_app(app)
        self.dispatcher.forget_app(app)
        self.held = [(row, epoch) for row, epoch in self.held if row.app != app]
        app_jobs = {job.id for job in self.jobs.values() if job.app == app}
        self.lines.forget(app_jobs)
        for job_id in app_jobs:
            self.lead_deferred.pop(job_id, None)
            self._last_lead_planned.pop(job_id, None)
        for session in self.workers_of(app):
            session.redirect_away()

    async def drain_app(self, app: str, timeout: float = 5.0) -> bool:
        """Stop sending the app's fires and write everything about it, before handing it over.

        True when the app can go clean: nothing unwritten, nothing of a previous owner unresolved."""
        self.draining.setdefault(app, [])
        follow_ups = self.follow_ups.writing(app)
        if follow_ups:
            await asyncio.wait(follow_ups, timeout=timeout)
        flushed = await self.writer.flush()
        return flushed and all(task.done() for task in follow_ups) and not self.recovery.unresolved(app)

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
        previous = self.jobs.get(job.id)
        self.jobs[job.id] = job
        if previous is not None and previous.version != job.version:
            self.dispatcher.withdraw_leads(job.id)  # its lead fires carry the old definition
        self.wake_scan()

    # ---- the wheel -------------------------------------------------------------------------
    def enter_wheel(self, row: InstanceRow, epoch: int, at: float | None = None, lead: bool = True) -> None:
        """Put a fire into the wheel, tagged with the epoch it was recorded under (one entry per row):
        at its lead time (``lead`` and a lead time set), at its planned time, or at the timer time ``at``
        (a trigger, a retry: sent when due)."""
        assert self.timer is not None
        previous = self.wheel_handles.pop(row.id, None)
        if previous is not None:
            self.timer.cancel(previous)
        else:
            self.waiting_per_job[row.job_id] = self.waiting_per_job.get(row.job_id, 0) + 1
        lead = lead and at is None and self.lead_time > 0
        when = at if at is not None else timer_time(self.clock, row.planned_ms / 1000.0)
        if lead:
            ahead = self._ahead(row)  # (noted for the job's next fire even when this one is due now)
            now = self.clock.monotonic()
            if when - now <= LEAD_MIN:
                lead = False  # due now: it goes the usual way, without a hop through lead()
            else:
                when = max(now, when - ahead)
        self.wheel_handles[row.id] = self.timer.call_at(when, FireDue(row, epoch, lead))

    def _ahead(self, row: InstanceRow) -> float:
        """How long before its planned time the fire goes ahead: the lead time, or half the gap after the
        job's previous fire if that is shorter (a per-second job's fire goes 0.5 s ahead: at its lead time
        the fire before it, started 0.5 s earlier, has usually ended and freed the job's line)."""
        previous = self._last_lead_planned.get(row.job_id)
        self._last_lead_planned[row.job_id] = row.planned_ms if previous is None else max(previous, row.planned_ms)
        if previous is None or previous >= row.planned_ms:
            return self.lead_time
        return min(self.lead_time, (row.planned_ms - previous) / 2000.0)

    def back_to_wheel(self, row: InstanceRow) -> None:
        """A lead fire its worker dropped (withdrawn, refused ahead of time): due again at its planned time."""
        epoch = self.cluster.owned.get(row.app)
        if epoch is not None:
            self.enter_wheel(row, epoch, lead=False)

    def _left_wheel(self, job_id: int) -> None:
        left = self.waiting_per_job.get(job_id, 0) - 1
        if left > 0:
            self.waiting_per_job[job_id] = left
        else:
            self.waiting_per_job.pop(job_id, None)

    def _links_in_motion(self, job: JobRow) -> bool:
        """Has the job a fire waiting in the wheel, in its line (running, queued, waiting for a worker) or held?"""
        return (job.id in self.waiting_per_job or self.lines.busy(job.id)
                or any(row.job_id == job.id for row, _ in self.held))

    def arm(self, item: TimerEntry, delay: float) -> int:
        """A deadline ``delay`` seconds from now (the parts' Alarms)."""
        assert self.timer is not None
        return self.timer.call_later(max(0.0, delay), item)

    def cancel(self, handle: int | None) -> None:
        if handle is not None and self.timer is not None:
            self.timer.cancel(handle)

    def _on_due(self, items: list[TimerEntry]) -> None:
        """Handle due items, fires in planned order (a job's fires entered at one instant must not
        overtake each other); a big burst goes in slices so frames leave while the rest waits."""
        if len(items) > 1:
            items.sort(key=_due_order)
        self._due_slice(items, 0)

    def _due_slice(self, items: list[TimerEntry], start: int) -> None:
        end = start + DUE_SLICE
        if len(items) > end:
            asyncio.get_running_loop().call_soon(self._due_slice, items, end)
        for item in items[start:end]:
            try:
                self._due(item)
            except Exception:  # one bad item must not cost the rest of the batch
                log.exception("scheduler: %s failed", item)

    def _due(self, item: TimerEntry) -> None:
        if isinstance(item, FireDue):  # by far the most frequent
            if self.wheel_handles.pop(item.row.id, None) is None:
                return  # taken out of the wheel after it came due (an operator cancelled it in a burst)
            self._left_wheel(item.row.job_id)
            if item.lead:
                self.lead(item.row, item.epoch)
            else:
                self.fire(item.row, item.epoch)
        elif isinstance(item, RunOverdue):
            self.dispatcher.overdue(item.instance_id)
        elif isinstance(item, OrphanExpired):
            self.recovery.orphan_expired(item.instance_id)
        elif isinstance(item, PendingExpired):
            self.dispatcher.pending_expired(item.entry)
        else:
            self.recovery.end(item.app, item.epoch, "the previous owner's workers surely stopped")

    # ---- firing ------------------------------------------------------------------------------
    def fire(self, row: InstanceRow, epoch: int) -> None:
        """A fire is due: by its job's line, dispatch it, queue it or skip it (or hold it: stale lease)."""
        if not self.cluster.owns(row.app, epoch):
            return  # the app moved: its owner fires this row from the WAL
        if row.id in self.dispatcher.inflight:
            return  # already sent
        if row.app in self.draining:
            self.draining[row.app].append((row, epoch))  # for its next owner (or for us, if it stays)
            return
        if not self.cluster.lease_valid():
            self.held.append((row, epoch))
            self._revalidate_lease()
            return
        job = self.jobs.get(row.job_id)
        if job is None or job.is_delete or (not job.enabled and row.trigger not in OPERATOR_TRIGGERS):
            self.finish(row, Status.CANCELLED, error="job deleted or disabled before its fire")
            return
        verdict, reason = self.lines.admit(job, row, epoch)
        if verdict is Verdict.SKIP:
            self.finish(row, Status.SKIPPED, error=reason, job=job)
        elif verdict is Verdict.WAIT:
            self.writer.update(InstanceUpdate(row.id, Status.QUEUED))
        else:
            self.dispatcher.dispatch(row, job, set())

    def lead(self, row: InstanceRow, epoch: int) -> None:
        """A fire's lead time: send it ahead to a worker that starts it at its planned time, when its job's
        line is free (the fire then holds it) and no earlier fire of the job waits for its own time; else
        it waits in the wheel for its planned time (fire()), and goes ahead after all if the line frees
        before then (``lead_deferred``, in planned order: fires of a job never overtake each other)."""
        job = self.jobs.get(row.job_id)
        if job is None:
            self.enter_wheel(row, epoch, lead=False)
            return
        session = None
        if (job.enabled and not job.is_delete and self.cluster.owns(row.app, epoch)
                and row.app not in self.draining and row.id not in self.dispatcher.inflight
                and row.planned_ms / 1000.0 - self.clock.wall() > LEAD_MIN and self.cluster.lease_valid()
                and not self._earlier_fire_waits(job.id, row) and self.lines.may_go_ahead(job, row)):
            session = self.dispatcher.route(row.app, job, set(), lead=True)
        if session is None:
            heapq.heappush(self.lead_deferred.setdefault(job.id, []), (row.planned_ms, row.attempt, row.id, row, epoch))
            self.enter_wheel(row, epoch, lead=False)  # fired when due, by the rules of fire()
            return
        self.lines.admit(job, row, epoch)  # RUN: the line was free, or the job allows overlap
        self.dispatcher.send(session, row, job, set(), lead=True)

    def _earlier_fire_waits(self, job_id: int, row: InstanceRow) -> bool:
        """Is a fire of the job planned before ``row`` still in the wheel, its lead time passed? It goes first."""
        deferred = self.lead_deferred.get(job_id)
        while deferred and deferred[0][2] not in self.wheel_handles:
            heapq.heappop(deferred)  # it left the wheel: fired, led, cancelled
        return deferred is not None and bool(deferred) and deferred[0][:2] < (row.planned_ms, row.attempt)

    def _lead_next(self, job_id: int) -> None:
        """The job's line is free: its next fire whose lead time passed meanwhile goes ahead now, unless it
        is too near its time (then the wheel fires it, and the fires behind it wait for their turn)."""
        deferred = self.lead_deferred.get(job_id)
        while deferred:
            _, _, instance_id, row, epoch = deferred[0]
            handle = self.wheel_handles.get(instance_id)
            if handle is None:
                heapq.heappop(deferred)
                continue
            if row.planned_ms / 1000.0 - self.clock.wall() <= LEAD_MIN:
                break
            heapq.heappop(deferred)
            del self.wheel_handles[instance_id]
            self.cancel(handle)
            self._left_wheel(row.job_id)
            self.lead(row, epoch)
            break
        if not deferred:
            self.lead_deferred.pop(job_id, None)

    def start_turns(self, turn: Turn | None) -> None:
        """Start the next fire of a line that became free (it already holds its job)."""
        if turn is not None:
            # call_soon: a chain of fires that end at once (cancelled, skipped) never recurses
            asyncio.get_running_loop().call_soon(self.fire, turn.row, turn.epoch)

    # ---- workers and their reports (dispatch.py, recovery.py) ----------------------------------
    def worker_joined(self, session: WorkerSession, running: list[int], finished: list[int]) -> None:
        self.recovery.worker_joined(session, running, finished)

    def worker_left(self, session: WorkerSession) -> None:
        if session.closed_by_peer:
            # it closed the connection itself (it died, or reconnects): it starts none of that
            # connection's lead fires, so those not due yet go to another worker now
            for flight in self.dispatcher.unstarted_leads(session):
                self._lead_elsewhere(flight)
        self.recovery.worker_left(session, asyncio.get_running_loop().time())

    def _lead_elsewhere(self, flight: Inflight) -> None:
        row = flight.instance
        epoch = self.cluster.owned.get(row.app)
        if epoch is None or row.planned_ms / 1000.0 - self.clock.wall() <= LEAD_SKEW_MARGIN:
            return  # its START may be on its way: it waits for its worker like any run (recovery)
        self.dispatcher.forget(flight)
        self.lead(row, epoch)  # it still holds its job's line: it goes ahead again, or waits for its time

    def worker_draining(self, session: WorkerSession) -> None:
        """A stopping worker takes nothing new: the fires waiting for a worker go elsewhere."""
        self.dispatcher.drain_pending(session.app)

    def on_ack(self, session: WorkerSession, body: dict[str, Any]) -> None:
        self.dispatcher.on_ack(session, body)

    def on_start(self, session: WorkerSession, body: dict[str, Any]) -> None:
        self.dispatcher.on_start(session, body)

    def on_logs(self, session: WorkerSession, body: dict[str, Any]) -> None:
        self.dispatcher.on_logs(session, body)

    def on_result(self, session: WorkerSession, body: dict[str, Any]) -> None:
        self.dispatcher.on_result(session, body)

    def fire_rates(self) -> dict[str, float]:
        """Fires sent per second by app since the last call (for balancing apps over servers)."""
        return self.dispatcher.fire_rates()

    # ---- final states, retries, re-runs, fixed delay -----------------------------------------
    def finish(
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
        alarm_event: str | None = None,
    ) -> None:
        """Record a final status, then start what follows it: a retry, a re-run, or the next in line.
        ``alarm_event`` names the alarm a failure raises when it is not the status's own (no_worker)."""
        finished_at = finished_at or self.clock.wall()
        self.metrics.fires[(row.app, status.value)] += 1
        if status is not Status.SUCCEEDED and error:
            log.info("instance %d (job %d, app %s, attempt %d): %s: %s",
                     row.id, row.job_id, row.app, row.attempt, status.value, error,
                     extra={"app": row.app, "job": row.job_id, "instance": row.id})
        self.writer.update(InstanceUpdate(row.id, status, worker=worker, started_at=started_at,
                                          finished_at=finished_at, result=result, error=error))
        job = job or self.jobs.get(row.job_id)
        follow = follow_up(row, status, job)
        self._alarm(row, status, job, error, follow is None, alarm_event)
        if follow is not None and job is not None:
            # the retry or re-run keeps the fire's turn: nothing behind it starts meanwhile
            key = ("follow", row.id)
            self.follow_ups.spawn(row, job, follow, key if self.lines.replace(job.id, row.id, key) else None)
            return
        turn = self.lines.release(row.job_id, row.id)
        self.start_turns(turn)
        if turn is None and row.job_id in self.lead_deferred and not self.lines.busy(row.job_id):
            self._lead_next(row.job_id)
        if job is None:
            return
        if status not in (Status.SKIPPED, Status.CANCELLED):
            self.writer.job_finished(job.id, finished_at)
        current = self.jobs.get(job.id, job)
        # one chain per fixed-delay job: a finish continues it only when no other link is in motion
        # (a re-enable or an API run may have started one), so parallel links merge into one
        if (row.trigger not in OPERATOR_TRIGGERS and self.follow_ups.is_delay_chain(current)
                and not self._links_in_motion(current)):
            self.follow_ups.continue_chain(row, job, finished_at)

    def _alarm(self, row: InstanceRow, status: Status, job: JobRow | None, error: str | None, last: bool,
               event: str | None) -> None:
        """The alarm a final status raises (with the status, in one write): a failure after all retries,
        a skip; a success resets the job's dead-man clock."""
        if status is Status.SUCCEEDED:
            if job is not None:
                self.alarm_rules.last_success[job.id] = self.clock.wall()
            return
        if status in (Status.FAILED, Status.TIMED_OUT) and last:
            event = event or status.value
        elif status is Status.SKIPPED:
            event = "skipped"
        else:
            return
        self.writer.alarms(self.alarm_rules.instance_event(event, job, row, error, status.value))

    async def trigger(self, app: str, job: JobRow, params: Any, force: bool = False) -> InstanceRow:
        """An API call fires the job now (WAL first, then the wheel); ``force`` runs it whatever
        its overlap policy says."""
        epoch = self.cluster.owned.get(app)
        if epoch is None or app in self.draining:
            raise NotOwnerError(app, -1)
        planned = wall_ms(self.clock)
        for bump in range(50):  # two triggers in the same millisecond get distinct planned times
            created_at = self.clock.wall()
            try:
                row = await self.store.insert_instance(
                    self.cluster.server_id, app, epoch, job.id, planned + bump, 1, FORCED if force else "api", params,
                    created_at)
            except StoreError:
                self.scanner.unanswered(app, epoch, created_at)
                raise
            if row is not None:
                self.jobs[job.id] = job
                self.enter_wheel(row, epoch, self.clock.monotonic())
                return row
        raise StoreError(f"job {job.name}: could not record the trigger")

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
