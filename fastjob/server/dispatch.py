"""Due fires to workers and back: routing, the wait for a worker with room, and the workers' reports.

A fire that runs is sent (DISPATCH) to one worker of its app chosen by the job's routing and
tags; with no worker able to take it, it waits in the app's pending queue for ``dispatch_wait``
and then fails. Sent, it is :class:`~.fires.Inflight` on its worker's session until its RESULT
(or its timeout, the server's safety net) ends it through ``finish``. Reports about an instance
that is not in flight on the reporting session are ignored, or recorded if they are late.
"""
from __future__ import annotations

import collections
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..clock import Clock
from ..commands import BUILTIN_PREFIX
from ..models import InstanceRow, InstanceUpdate, JobRow, LogLine, Routing, Status
from ..protocol import KILL_REASON, WITHDRAW_REASON, ProtocolError
from ..store import Store
from ..tasks import BackgroundTasks
from .alarms import AlarmRules
from .fires import MAX_TEXT, Alarms, Finish, Inflight, Pending, PendingExpired, RunOverdue
from .metrics import Metrics
from .writer import StatusWriter

if TYPE_CHECKING:
    from .session import WorkerSession

log = logging.getLogger("fastjob.scheduler")

#: A lead fire goes out only this long (seconds) or more before its planned time; nearer, it is sent when due.
LEAD_MIN = 0.005
#: Allowed disagreement (seconds) between a worker's corrected clock and ours: a lead fire is taken back
#: from its worker without asking (it left; an operator's kill) only while its planned time is at least
#: this far off, so that no START of it can be on its way.
LEAD_SKEW_MARGIN = 0.1

#: Statuses a worker may report in RESULT; "cancelled" is what version-1 workers call an
#: interruption (the server never asks a worker to cancel except for a timeout).
WORKER_STATUSES = {Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.INTERRUPTED, Status.KILLED}


class Dispatcher:
    """Sends fires to the app's workers and tracks each until its worker reports how it ended."""

    def __init__(
        self,
        *,
        store: Store,
        writer: StatusWriter,
        alarms: Alarms,
        finish: Finish,
        workers_of: Callable[[str], list[WorkerSession]],
        jobs: dict[int, JobRow],
        tasks: BackgroundTasks,
        dispatch_wait: float,
        heartbeat_timeout: float,
        clock: Clock,
        metrics: Metrics | None = None,
        alarm_rules: AlarmRules | None = None,
        back_to_wheel: Callable[[InstanceRow], None] = lambda row: None,
    ) -> None:
        """``back_to_wheel`` puts a lead fire that its worker dropped (withdrawn, refused) back into
        the wheel at its planned time (Scheduler.back_to_wheel)."""
        self.store = store
        self.writer = writer
        self.alarms = alarms
        self.finish = finish
        self.workers_of = workers_of
        self.jobs = jobs  # the scheduler's job cache: the newest version of a job a pending fire waits for
        self.tasks = tasks
        self.dispatch_wait = dispatch_wait
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.alarm_rules = alarm_rules
        self.back_to_wheel = back_to_wheel
        self.inflight: dict[int, Inflight] = {}
        self._leading: dict[int, set[int]] = {}  # job id -> its lead fires not started (withdrawn on a change)
        self.pending: dict[str, list[Pending]] = {}
        self._rr: dict[str, int] = {}
        self._dispatched: collections.Counter[str] = collections.Counter()  # fires sent per app, for fire_rates()
        self._rates_since = clock.monotonic()

    # ---- sending ---------------------------------------------------------------------------
    def dispatch(self, row: InstanceRow, job: JobRow, refused_by: set[str]) -> None:
        """Send the fire to a worker, or queue it until one can take it."""
        session = self.route(row.app, job, refused_by)
        if session is None:
            self.queue_pending(row, job, refused_by)
        else:
            self.send(session, row, job, refused_by)

    def send(self, session: WorkerSession, row: InstanceRow, job: JobRow, refused_by: set[str],
             lead: bool = False) -> None:
        """DISPATCH the fire to ``session``: now, or as a lead fire its worker starts at its planned time."""
        try:
            send_dispatch_frame(session, row, job, lead)
        except ProtocolError as exc:  # e.g. params larger than a frame: fails this instance only
            self.finish(row, Status.FAILED, error=f"could not dispatch: {exc.message}", job=job)
            return
        now = self.clock.wall()
        flight = Inflight(row, job, session, session.worker_id, refused_by=refused_by, sent_at=now, lead=lead)
        self.inflight[row.id] = flight
        self._dispatched[row.app] += 1
        session.runs(row.id, lead)
        if lead:
            self._leading.setdefault(job.id, set()).add(row.id)
        if job.timeout:
            # the worker enforces the timeout; this is the safety net if its answer never comes
            wait = job.timeout + self.heartbeat_timeout
            if lead:
                wait += max(0.0, row.planned_ms / 1000.0 - now)
            flight.overdue_handle = self.alarms.arm(RunOverdue(row.id), wait)
        self.writer.update(InstanceUpdate(
            row.id, Status.DISPATCHED, worker=session.worker_id, dispatched_at=self.clock.wall()))

    def route(self, app: str, job: JobRow, refused_by: set[str], lead: bool = False) -> WorkerSession | None:
        """A worker of the app with room and the job's tags, by the job's routing; None if there is none.
        ``lead``: only workers that take lead fires (version 5)."""
        tags = job.tags
        candidates = [
            s for s in self.workers_of(app)
            if s.accepts_jobs and (not refused_by or s.worker_id not in refused_by) and s.has_room()
            and (not tags or s.has_tags(tags)) and (not lead or s.takes_lead_fires)
            and (job.mode == "single" or s.version >= 6)  # a broadcast's coordinator fans out (version 6)
        ]
        return choose(candidates, job.routing, self._rr, app, lambda s: s.load())

    # ---- waiting for a worker ------------------------------------------------------------------
    def queue_pending(self, row: InstanceRow, job: JobRow, refused_by: set[str], reason: str = "") -> None:
        entry = Pending(row, job, refused_by, reason or f"no worker of app {row.app!r} could take it")
        self.pending.setdefault(row.app, []).append(entry)
        self.alarms.arm(PendingExpired(entry), self.dispatch_wait)

    def drain_pending(self, app: str) -> None:
        """A worker joined or freed a slot: dispatch the app's queued fires while workers have room."""
        queue = self.pending.pop(app, [])
        for index, entry in enumerate(queue):
            job = self.jobs.get(entry.job.id, entry.job)
            session = self.route(app, job, entry.refused_by)
            if session is None:
                self.pending.setdefault(app, []).extend(queue[index:])
                return
            self.send(session, entry.instance, job, entry.refused_by)

    def pending_expired(self, entry: Pending) -> None:
        queue = self.pending.get(entry.instance.app, [])
        if entry in queue:
            queue.remove(entry)
            self.finish(entry.instance, Status.FAILED, job=entry.job,
                        error=f"{entry.reason} within {self.dispatch_wait:.0f}s", alarm_event="no_worker")

    # ---- worker reports --------------------------------------------------------------------
    def flight_of(self, session: WorkerSession, instance_id: int) -> Inflight | None:
        """The instance in flight on this very session; reports about any other are ignored."""
        flight = self.inflight.get(instance_id)
        if flight is None or flight.session is not session or flight.instance.app != session.app:
            return None
        return flight

    def on_ack(self, session: WorkerSession, body: dict[str, Any]) -> None:
        flight = self.flight_of(session, body["instance_id"])
        if flight is None or body["accepted"]:
            return
        if flight.kill_requested:  # killed before its worker took it: it never starts anywhere
            self.forget(flight)
            self.finish(flight.instance, Status.CANCELLED, job=flight.job,
                        error="cancelled by an operator before it started")
            return
        if flight.withdrawing:  # a lead fire of a changed job, dropped unstarted: due again, as the job now says
            self.forget(flight)
            self.back_to_wheel(flight.instance)
            return
        if body.get("reason") == WITHDRAW_REASON:
            # the answer to a withdrawal sent before this flight was known here (a worker that named it
            # while the app's WAL was loading): the confirmation after it made the worker hold it again
            return
        reason = body.get("reason") or "refused"
        log.info("instance %d: worker %s refused it (%s)", flight.instance.id, session.worker_id, reason)
        self.forget(flight)
        flight.refused_by.add(session.worker_id)
        refused = set(flight.refused_by)
        if flight.lead and flight.instance.planned_ms / 1000.0 - self.clock.wall() > LEAD_MIN:
            # refused ahead of its time: another worker takes it ahead too, or it waits for its time
            routed = self.route(flight.instance.app, flight.job, refused, lead=True)
            if routed is None:
                self.back_to_wheel(flight.instance)
            else:
                self.send(routed, flight.instance, flight.job, refused, lead=True)
            return
        routed = self.route(flight.instance.app, flight.job, refused)
        if routed is None:
            self.queue_pending(flight.instance, flight.job, refused, f"every worker refused it (last: {reason})")
        else:
            self.send(routed, flight.instance, flight.job, refused)

    def on_start(self, session: WorkerSession, body: dict[str, Any]) -> None:
        flight = self.flight_of(session, body["instance_id"])
        if flight is None:
            return
        if flight.lead:
            self._lead_started(flight)
        self._started(flight, body["started_at"])
        self.writer.update(InstanceUpdate(
            flight.instance.id, Status.RUNNING, worker=session.worker_id, started_at=body["started_at"]))

    def _lead_started(self, flight: Inflight) -> None:
        """A lead fire started: it takes its worker's slot, and no withdrawal can stop it any more."""
        flight.withdrawing = False
        if flight.session is not None:
            flight.session.started(flight.instance.id)
        self._unindex_lead(flight)

    def _unindex_lead(self, flight: Inflight) -> None:
        leading = self._leading.get(flight.job.id)
        if leading is not None:
            leading.discard(flight.instance.id)
            if not leading:
                del self._leading[flight.job.id]

    def unstarted_leads(self, session: WorkerSession) -> list[Inflight]:
        """The lead fires sent to ``session`` that it has not reported started."""
        return [f for f in self.inflight.values() if f.session is session and f.lead and not f.started]

    def withdraw_leads(self, job_id: int) -> None:
        """The job changed: ask its workers to drop its lead fires that have not started; each comes back
        (ACK refused) to the wheel, to be fired as the job now says. One that started runs on."""
        for instance_id in self._leading.get(job_id, ()):
            flight = self.inflight.get(instance_id)
            if flight is not None and flight.session is not None and not flight.started and not flight.withdrawing:
                flight.withdrawing = True
                flight.session.send("CANCEL", {"instance_id": instance_id, "reason": WITHDRAW_REASON})

    def _started(self, flight: Inflight, started_at: float) -> None:
        """Lateness and dispatch-to-start, once per run (from START, or from a RESULT that came alone)."""
        if flight.started:
            return
        flight.started = True
        app = flight.instance.app
        if flight.sent_at is not None:
            self.metrics.dispatch_to_start.observe(app, max(0.0, started_at - flight.sent_at))
        if flight.instance.attempt != 1:
            return  # a retry keeps its fire's planned time: its backoff is not lateness
        lateness = max(0.0, started_at - flight.instance.planned_ms / 1000.0)
        self.metrics.lateness.observe(app, lateness)
        late_after = (flight.job.alarm or {}).get("late_after")
        if late_after is not None and lateness > late_after and self.alarm_rules is not None:
            self.writer.alarms(self.alarm_rules.instance_event(
                "late", flight.job, flight.instance, f"started {lateness:.3f}s after its planned time", "running"))

    def on_logs(self, session: WorkerSession, body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        if self.flight_of(session, instance_id) is None:
            return  # logs come before their RESULT; lines for instances not on this session are dropped
        self.writer.logs([LogLine(instance_id, float(ts), str(level)[:16], str(message)[:MAX_TEXT])
                          for ts, level, message in body["lines"]])

    def on_result(self, session: WorkerSession, body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        status = reported_status(body)
        error = body.get("error")
        error = str(error)[:MAX_TEXT] if error is not None else None
        flight = self.flight_of(session, instance_id)
        if flight is None:
            if instance_id not in self.inflight:  # late, or after a takeover: record it if it is this app's
                self.tasks.spawn(self._record_untracked(session, instance_id, status, body, error),
                                 f"fastjob-late-result-{instance_id}")
            return
        self.forget(flight)
        started_at = body.get("started_at")
        if started_at is not None:
            self._started(flight, started_at)
            self.metrics.run_duration.observe(flight.instance.app, max(0.0, body["finished_at"] - started_at))
        if flight.kill_requested and status is not Status.SUCCEEDED:
            status, error = Status.KILLED, "killed by an operator" + (f" ({error})" if error else "")
        # a worker reports killed only for an operator's CANCEL (an earlier owner's, after a failover,
        # counts as much as ours): the kill stands
        self.finish(flight.instance, status, result=body.get("result"), error=error,
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

    # ---- ending ----------------------------------------------------------------------------------
    def overdue(self, instance_id: int) -> None:
        """No answer within the job's timeout plus a heartbeat: the run is timed out (and cancelled)."""
        flight = self.inflight.get(instance_id)
        if flight is None:
            return
        flight.overdue_handle = None
        if flight.session is not None:
            flight.session.send("CANCEL", {"instance_id": instance_id, "reason": "timeout"})
        self.forget(flight)
        self.finish(flight.instance, Status.TIMED_OUT, job=flight.job,
                    error=f"no result within the {flight.job.timeout}s timeout")

    def kill(self, flight: Inflight) -> None:
        """An operator stops a run: the worker cancels its handler, and its RESULT is recorded killed."""
        assert flight.session is not None
        flight.kill_requested = True
        flight.session.send("CANCEL", {"instance_id": flight.instance.id, "reason": KILL_REASON})

    def forget(self, flight: Inflight) -> None:
        """The instance is no longer in flight (it ended, or it is to be sent elsewhere)."""
        self.inflight.pop(flight.instance.id, None)
        if flight.lead:
            self._unindex_lead(flight)
        if flight.session is not None:
            flight.session.ended(flight.instance.id)
        self.alarms.cancel(flight.overdue_handle)
        flight.overdue_handle = None

    def forget_app(self, app: str) -> None:
        """The app moved: its waiting and in-flight fires are its new owner's business."""
        self.pending.pop(app, None)
        for flight in list(self.inflight.values()):
            if flight.instance.app == app:
                self.forget(flight)
                self.alarms.cancel(flight.orphan_handle)

    def fire_rates(self) -> dict[str, float]:
        """Fires sent per second by app since the last call (for balancing apps over servers)."""
        now = self.clock.monotonic()
        elapsed = max(1e-3, now - self._rates_since)
        rates = {app: count / elapsed for app, count in self._dispatched.items()}
        self._dispatched.clear()
        self._rates_since = now
        return rates


def choose(candidates: list[WorkerSession], routing: str, turns: dict[str, int], app: str,
           load: Callable[[WorkerSession], float]) -> WorkerSession | None:
    """One of ``candidates`` by a job's routing: random, the least ``load``, or round robin (each
    app's turn kept in ``turns``); None if there are none. Fires and sub-task batches route alike."""
    if not candidates:
        return None
    if routing == Routing.RANDOM:
        return random.choice(candidates)
    if routing == Routing.LEAST_BUSY:
        return min(candidates, key=load)
    index = turns.get(app, 0)
    turns[app] = index + 1
    return candidates[index % len(candidates)]


def send_dispatch_frame(session: WorkerSession, row: InstanceRow, job: JobRow, lead: bool = False) -> None:
    """DISPATCH: what a worker needs to run one attempt of a fire (sent again to re-ask a result, or to
    confirm a lead fire); ``lead``: its worker starts it at its planned time (version 5).

    A built-in handler ("fastjob:command") gets the job's own params, and a trigger's apart as
    ``trigger_params``: what a trigger passes must never become the program it runs (commands.py)."""
    builtin = job.handler.startswith(BUILTIN_PREFIX)
    body = {
        "instance_id": row.id,
        "job_id": job.id,
        "job": job.name,
        "handler": job.handler,
        "params": job.params if builtin or row.params is None else row.params,
        "attempt": row.attempt,
        "scheduled_at": row.planned_ms / 1000.0,
        "timeout": job.timeout,
    }
    if builtin and row.params is not None:
        body["trigger_params"] = row.params
    if job.mode != "single":  # a broadcast: this run coordinates one sub-run per worker (fanout.py)
        body["mode"] = job.mode
        body["min_success"] = job.min_success
        body["tags"] = job.tags
    if lead:
        body["start_at"] = row.planned_ms / 1000.0
    session.send("DISPATCH", body)


#: What each status a RESULT may carry is recorded as: a version-1 worker's "cancelled" is an
#: interruption; anything else counts as failed. A dict, read per RESULT (Status(value) is slow).
_REPORTED = {**{status.value: status for status in WORKER_STATUSES}, Status.CANCELLED.value: Status.INTERRUPTED}


def reported_status(body: dict[str, Any]) -> Status:
    """The final status a RESULT reports; anything a worker may not report counts as failed."""
    return _REPORTED.get(body["status"], Status.FAILED)
