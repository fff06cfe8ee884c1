"""After a failover: the fires a gained app's previous owner may have sent, and runs whose worker left.

A new owner cannot see what its predecessor sent after its last status write landed. So a
waiting fire the previous owner may have dispatched (planned before its lease ran out) is a
*suspect*: it holds its job until a worker names it (it is that worker's: re-attached, never run
twice), or every worker the previous owner had has re-attached, or their run lease has surely
run out; then the unnamed suspects take their turns. A dispatched or running instance waits the
same way for its worker, as an *orphan*: re-attached if its worker comes back with it, else
ended ``interrupted`` (and re-run) once that worker's lease is out.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..clock import Clock, timer_time
from ..models import InstanceRow, JobRow, Status
from ..protocol import WITHDRAW_REASON
from .dispatch import Dispatcher, send_dispatch_frame
from .fires import RECOVERING, Alarms, Finish, Inflight, OrphanExpired, Recovery, RecoveryOver, StartTurns
from .lines import JobLines

if TYPE_CHECKING:
    from .cluster import Origin
    from .session import WorkerSession

log = logging.getLogger("fastjob.scheduler")

# Allowed disagreement between servers' wall clocks when comparing one's heartbeat with fire times.
CLOCK_SKEW_MARGIN = 1.0


def recovery_window(origin: Origin, now: float, *, heartbeat_timeout: float, run_lease: float,
                    lease_margin: float, lead_time: float = 0.0) -> tuple[int, float]:
    """(cutoff_ms, until): fires planned up to ``cutoff_ms`` may have been sent by the previous owner
    (``lead_time`` ahead of their time, at most), and every run it started has surely stopped by
    ``until`` (wall clock)."""
    if origin.left_clean or origin.prev_owner is None:
        # it wrote everything and closed its sessions now: its workers' leases run from here
        return -1, now + run_lease + lease_margin
    # it sent fires only while its lease held: up to its last heartbeat plus the timeout
    last = origin.prev_last_heartbeat if origin.prev_last_heartbeat is not None else now
    lease_end = last + heartbeat_timeout + CLOCK_SKEW_MARGIN
    cutoff_ms = min(int(now * 1000), math.ceil(lease_end * 1000)) + math.ceil(lead_time * 1000)
    return cutoff_ms, max(now, lease_end + run_lease + lease_margin)


class FailoverRecovery:
    """Suspects and orphans of the apps this server owns, until their workers settle them."""

    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        lines: JobLines,
        jobs: dict[int, JobRow],
        alarms: Alarms,
        finish: Finish,
        start_turns: StartTurns,
        owns: Callable[[str, int], bool],
        run_lease: float,
        lease_margin: float,
        clock: Clock,
    ) -> None:
        self.dispatcher = dispatcher
        self.lines = lines
        self.jobs = jobs
        self.alarms = alarms
        self.finish = finish
        self.start_turns = start_turns
        self.owns = owns
        self.run_lease = run_lease
        self.lease_margin = lease_margin
        self.clock = clock
        self.apps: dict[str, Recovery] = {}  # gained apps not settled yet

    # ---- a gained app ----------------------------------------------------------------------------
    def recover(self, app: str, epoch: int, expected: set[str], cutoff_ms: int, until: float,
                rows: list[tuple[InstanceRow, JobRow]]) -> list[InstanceRow]:
        """Sort a gained app's unfinished rows: suspects hold their jobs, sent ones wait for their
        workers as orphans; the waiting rows returned go into the wheel. ``until``: wall clock.

        Nothing here awaits: workers that re-attach meanwhile find the recovery whole."""
        clock = self.clock
        rec = Recovery(epoch, expected, timer_time(clock, until))
        to_wheel: list[InstanceRow] = []
        for row, job in rows:
            if row.status in (Status.WAITING, Status.QUEUED) and row.epoch < epoch and row.planned_ms <= cutoff_ms:
                rec.suspects[row.id] = row
                rec.held_jobs.add(job.id)
                self.lines.hold(job.id, RECOVERING)
            elif row.status in (Status.WAITING, Status.QUEUED):
                to_wheel.append(row)
            elif row.id not in self.dispatcher.inflight:
                flight = Inflight(row, job, None, row.worker)
                self.dispatcher.inflight[row.id] = flight
                self.lines.hold(job.id, row.id)
                flight.orphan_handle = self.alarms.arm(OrphanExpired(row.id), rec.deadline - clock.monotonic())
        self.apps[app] = rec
        rec.handle = self.alarms.arm(RecoveryOver(app, epoch), rec.deadline - clock.monotonic())
        return to_wheel

    def unresolved(self, app: str) -> bool:
        """Has the app fires of a previous owner that are not settled (a clean hand-over must wait)?"""
        rec = self.apps.get(app)
        return rec is not None and bool(rec.suspects or rec.held_jobs)

    def forget_app(self, app: str) -> None:
        rec = self.apps.pop(app, None)
        if rec is not None:
            self.alarms.cancel(rec.handle)

    # ---- workers coming back -----------------------------------------------------------------------
    def worker_joined(self, session: WorkerSession, running: Sequence[int], finished: Sequence[int] = ()) -> None:
        """Re-attach the instances a (re)connecting worker says it still runs, just finished, or holds
        as lead fires; re-run those it was sent and does not have. Every lead fire it names is
        answered: confirmed (DISPATCH) if it is still that worker's, else withdrawn."""
        app = session.app
        leading = set(session.hello_leading)
        named = {*running, *finished, *leading}
        rec = self.apps.get(app)
        inflight = self.dispatcher.inflight
        for instance_id in named:
            if rec is not None and instance_id in rec.suspects:
                self._claim_suspect(session, rec, instance_id)
            flight = inflight.get(instance_id)
            if flight is not None and flight.instance.app == app and flight.session is None:
                self._reattach(session, flight, finished_here=instance_id not in running,
                               lead=instance_id in leading)
            elif instance_id in leading and (flight is None or flight.session is not session):
                # sent elsewhere, ended, or not this app's: it must not start here
                session.send("CANCEL", {"instance_id": instance_id, "reason": WITHDRAW_REASON})
        for flight in [f for f in inflight.values()
                       if f.session is None and f.instance.app == app and f.worker_id == session.worker_id
                       and f.instance.id not in named]:
            self._orphan_resolved(flight, f"worker {session.worker_id} came back without it")
        if rec is not None:
            rec.reattached.add(session.worker_id)
            self.maybe_end(app)
        self.dispatcher.drain_pending(app)

    def _reattach(self, session: WorkerSession, flight: Inflight, finished_here: bool, lead: bool = False) -> None:
        flight.session = session
        flight.worker_id = session.worker_id
        flight.lead = flight.lead or lead
        session.runs(flight.instance.id, lead)
        self.alarms.cancel(flight.orphan_handle)  # a later disconnect gets a full grace again
        flight.orphan_handle = None
        if lead:  # it holds the fire unstarted: confirm it (it starts at its planned time)
            send_dispatch_frame(session, flight.instance, flight.job, lead=True)
        elif finished_here:  # finished while we were apart: ask for the result again
            send_dispatch_frame(session, flight.instance, flight.job)
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
        # a lead fire it holds is confirmed, still to start at its planned time (a worker never starts
        # one before the start_at it was first sent with)
        lead = instance_id in session.hello_leading and session.takes_lead_fires
        self.dispatcher.send(session, row, job, set(), lead=lead)

    def maybe_end(self, app: str) -> None:
        rec = self.apps.get(app)
        if rec is not None and rec.expected <= rec.reattached:
            self.end(app, rec.epoch, "every worker of the previous owner re-attached")

    def end(self, app: str, epoch: int, why: str) -> None:
        """The suspects nobody named are surely not running: they take their turns now, in planned order."""
        rec = self.apps.get(app)
        if rec is None or rec.epoch != epoch or not self.owns(app, epoch):
            return
        del self.apps[app]
        self.alarms.cancel(rec.handle)
        if rec.suspects:
            log.info("app %s: %s; firing %d held-back fires", app, why, len(rec.suspects))
        for row in sorted(rec.suspects.values(), key=lambda r: (r.planned_ms, r.attempt)):
            self.lines.push(row, epoch)
        for job_id in rec.held_jobs:
            self.start_turns(self.lines.release(job_id, RECOVERING))

    # ---- workers leaving ----------------------------------------------------------------------------
    def worker_left(self, session: WorkerSession, now: float) -> None:
        """Its running instances wait for the worker to come back until its run lease has surely
        run out (no run of its can go on after that), then run again elsewhere. ``now``: loop time."""
        safe_in = session.last_received + self.run_lease + self.lease_margin - now
        for instance_id in session.forget_runs():
            flight = self.dispatcher.inflight.get(instance_id)
            if flight is not None and flight.session is session:
                flight.session = None
                flight.orphan_handle = self.alarms.arm(OrphanExpired(instance_id), safe_in)

    def orphan_expired(self, instance_id: int) -> None:
        flight = self.dispatcher.inflight.get(instance_id)
        if flight is None or flight.session is not None:
            return
        flight.orphan_handle = None
        self._orphan_resolved(flight, f"worker {flight.worker_id} lost: it did not come back within its run lease")

    def _orphan_resolved(self, flight: Inflight, why: str) -> None:
        """Nobody runs this instance any more: it ends interrupted, and runs again (killed, if an
        operator killed it meanwhile: a kill is never undone by a re-run)."""
        self.alarms.cancel(flight.orphan_handle)
        flight.orphan_handle = None
        self.dispatcher.forget(flight)
        if flight.kill_requested:
            self.finish(flight.instance, Status.KILLED, job=flight.job, error=f"killed by an operator; {why}")
        else:
            self.finish(flight.instance, Status.INTERRUPTED, job=flight.job, error=why)
