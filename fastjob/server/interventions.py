"""An operator's interventions on the fires of an owned app: kill, retry, and the overlap check
of a trigger. They keep the fire contract: each fire still ends in exactly one final record.

Kill: a running instance is stopped on its worker and recorded ``killed`` when its worker
reports back; one that has not started (in the wheel, queued behind a running one, waiting for
a worker) is recorded ``cancelled`` at once. A handler on a plain thread cannot be stopped, so
killing it is refused (an :class:`InterventionError` "conflict"), as is killing what is in
motion between servers or workers (retry in a moment).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..clock import Clock
from ..models import FINAL_STATUSES, InstanceRow, JobRow, Status
from ..store import NotOwnerError, Store, StoreError
from .dispatch import LEAD_SKEW_MARGIN, Dispatcher
from .fires import Finish
from .lines import FORCED, JobLines

CANCELLED_BY_OPERATOR = "cancelled by an operator before it started"
#: How a handler must run (HELLO ``handlers``) for a kill to stop it.
KILLABLE = frozenset({"async", "process"})


async def fire_attempts(store: Store, row: InstanceRow, limit: int = 1000) -> list[InstanceRow]:
    """Every attempt of ``row``'s fire (its job and planned time), at most ``limit``."""
    return await store.query_instances(row.app, job_id=row.job_id, since_ms=row.planned_ms,
                                       until_ms=row.planned_ms + 1, limit=limit)


class InterventionError(Exception):
    """An intervention that cannot be made now; ``code`` is "conflict" or "not_found"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Interventions:
    def __init__(
        self,
        *,
        store: Store,
        server_id: str,
        epoch_of: Callable[[str], int | None],
        dispatcher: Dispatcher,
        lines: JobLines,
        wheel_handles: dict[int, int],
        left_wheel: Callable[[int], None],
        cancel_timer: Callable[[int | None], None],
        enter_wheel: Callable[[InstanceRow, int, float | None], None],
        unanswered: Callable[[str, int, float], None],
        jobs: dict[int, JobRow],
        finish: Finish,
        clock: Clock,
    ) -> None:
        self.store = store
        self.server_id = server_id
        self.epoch_of = epoch_of
        self.dispatcher = dispatcher
        self.lines = lines
        self.wheel_handles = wheel_handles
        self.left_wheel = left_wheel
        self.cancel_timer = cancel_timer
        self.enter_wheel = enter_wheel
        self.unanswered = unanswered
        self.jobs = jobs
        self.finish = finish
        self.clock = clock

    # ---- kill -------------------------------------------------------------------------------
    def kill(self, row: InstanceRow, job: JobRow | None) -> Status:
        """Stop the instance: KILLED means "asked its worker" (recorded when it reports), CANCELLED
        "recorded at once". Raises InterventionError when it cannot be stopped now."""
        if row.status in FINAL_STATUSES:
            raise InterventionError("conflict", f"instance {row.id} already ended: {row.status.value}")
        flight = self.dispatcher.inflight.get(row.id)
        if flight is not None:
            if flight.session is None or flight.session.closed:
                raise InterventionError("conflict", f"instance {row.id}: its worker is reconnecting; try again"
                                                    " in a few seconds")
            kind = flight.session.handler_kinds.get(flight.job.handler)
            unstarted_lead = (flight.lead and not flight.started
                              and flight.instance.planned_ms / 1000.0 - self.clock.wall() > LEAD_SKEW_MARGIN)
            if not unstarted_lead and (kind not in KILLABLE or flight.session.version < 4):
                how = ("on a plain thread, which cannot be stopped" if kind == "thread" else
                       "on a worker that does not say how its handlers run (protocol version < 4)")
                raise InterventionError("conflict", f"instance {row.id} runs handler {flight.job.handler!r} {how};"
                                                    " isolate it in a process (@worker.handler(isolation='process'))"
                                                    " or make it async to kill it")
            self.dispatcher.kill(flight)
            return Status.KILLED
        handle = self.wheel_handles.pop(row.id, None)
        if handle is not None:
            self.cancel_timer(handle)
            self.left_wheel(row.job_id)
            self.finish(row, Status.CANCELLED, error=CANCELLED_BY_OPERATOR, job=job)
            return Status.CANCELLED
        for entry in self.dispatcher.pending.get(row.app, []):
            if entry.instance.id == row.id:
                self.dispatcher.pending[row.app].remove(entry)
                self.finish(entry.instance, Status.CANCELLED, error=CANCELLED_BY_OPERATOR, job=entry.job)
                return Status.CANCELLED
        turn = self.lines.remove(row.job_id, row.id)
        if turn is not None:
            self.finish(turn.row, Status.CANCELLED, error=CANCELLED_BY_OPERATOR, job=job)
            return Status.CANCELLED
        raise InterventionError("conflict", f"instance {row.id} ({row.status.value}) is being handed between"
                                            " servers or workers; try again in a few seconds")

    # ---- trigger and retry -----------------------------------------------------------------------
    def overlap_refusal(self, job: JobRow) -> str | None:
        """Why a trigger or retry without force is refused by the job's overlap policy, or None."""
        return self.lines.refusal(job)

    async def retry(self, row: InstanceRow, job: JobRow, force: bool, params: Any = None) -> InstanceRow:
        """A new attempt of a finished instance's fire (same planned time, the next attempt number)."""
        if row.status not in FINAL_STATUSES:
            raise InterventionError("conflict", f"instance {row.id} has not ended ({row.status.value})")
        epoch = self.epoch_of(row.app)
        if epoch is None:
            raise NotOwnerError(row.app, -1)
        attempts = await fire_attempts(self.store, row)
        unfinished = [a for a in attempts if a.status not in FINAL_STATUSES]
        if unfinished:
            raise InterventionError("conflict", f"attempt {unfinished[0].attempt} of this fire (instance"
                                                f" {unfinished[0].id}) has not ended")
        if not force:
            refusal = self.overlap_refusal(job)
            if refusal is not None:
                raise InterventionError("conflict", refusal)
        attempt = max(a.attempt for a in attempts) + 1 if attempts else row.attempt + 1
        created_at = self.clock.wall()
        try:
            new = await self.store.insert_instance(
                self.server_id, row.app, epoch, job.id, row.planned_ms, attempt, FORCED if force else "api",
                params if params is not None else row.params, created_at)
        except StoreError:
            self.unanswered(row.app, epoch, created_at)  # it may have been written: the scanner finds it
            raise
        if new is None:
            raise InterventionError("conflict", f"attempt {attempt} of this fire was written meanwhile")
        self.jobs[job.id] = job
        self.enter_wheel(new, epoch, self.clock.monotonic())
        return new
