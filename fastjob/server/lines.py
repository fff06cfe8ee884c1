"""Overlap: which fire of a job may run now, which waits its turn, which is skipped.

Each job has a *line*. The fires that hold the job are its **holders**: sent to a worker,
waiting for a worker with room, possibly still running on a worker we lost sight of (a
failover, a lost worker), or a retry in its backoff. Fires that come due while the job is
held wait behind the holders in planned order, or are skipped, as the job's overlap policy
says (Temporal's vocabulary: queue = BufferAll bounded, buffer_one, skip, allow).

A fire that nobody runs and nobody may still run never holds the job, so it can never block
the fires behind it. Pure bookkeeping: no I/O, no clock, so the rules are tested in process.
"""
from __future__ import annotations

import enum
import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..models import InstanceRow, JobRow, Overlap

# the policies as plain strings, looked up once (an Enum member's .value is a Python-level property)
_ALLOW, _SKIP, _BUFFER_ONE, _QUEUE = (Overlap.ALLOW.value, Overlap.SKIP.value, Overlap.BUFFER_ONE.value,
                                      Overlap.QUEUE.value)

#: Fires of these triggers are never skipped by an overlap policy: an operator asked for them
#: (api) or they continue a fire that already had its turn (retry, rerun). They still wait.
NEVER_SKIPPED = frozenset({"api", "forced", "retry", "rerun"})
#: An operator's trigger or retry with ``force``: it runs at once, whatever the overlap policy.
FORCED = "forced"
#: Fires an operator asked for: they run even while their job is paused, and do not move a
#: fixed-delay job's chain.
OPERATOR_TRIGGERS = frozenset({"api", FORCED})


class Verdict(enum.Enum):
    RUN = "run"  # the fire holds the job now: dispatch it
    WAIT = "wait"  # queued behind the holders
    SKIP = "skip"  # recorded skipped (the reason comes with it)


@dataclass(order=True, slots=True)
class Turn:
    """A fire waiting in a job's line, ordered by planned time, then attempt."""

    planned_ms: int
    attempt: int
    instance_id: int
    row: InstanceRow = field(compare=False)
    epoch: int = field(compare=False)


class _Line:
    """One job's holders and waiting fires (made for every fire of a free job: kept light)."""

    __slots__ = ("holders", "waiting", "scheduled_waiting")

    def __init__(self) -> None:
        self.holders: set[Hashable] = set()
        self.waiting: list[Turn] = []  # a heap
        self.scheduled_waiting = 0  # of those, fires that a policy may skip (trigger schedule/catch_up)


class JobLines:
    """Every job's line on this server."""

    def __init__(self) -> None:
        self._lines: dict[int, _Line] = {}

    def admit(self, job: JobRow, row: InstanceRow, epoch: int) -> tuple[Verdict, str]:
        """Decide a due fire: run it now (it then holds the job), queue it, or skip it (with why)."""
        line = self._lines.get(job.id)
        if line is not None and row.id in line.holders:
            return Verdict.RUN, ""
        if line is None:
            line = self._lines[job.id] = _Line()
        if job.overlap == _ALLOW or row.trigger == FORCED or not (line.holders or line.waiting):
            line.holders.add(row.id)
            return Verdict.RUN, ""
        skippable = row.trigger not in NEVER_SKIPPED
        if skippable:
            if job.overlap == _SKIP:
                return Verdict.SKIP, "overlap skip: an earlier instance of the job still runs"
            if job.overlap == _BUFFER_ONE and line.scheduled_waiting >= 1:
                return Verdict.SKIP, "overlap buffer_one: a fire already waits behind the running one"
            if job.overlap == _QUEUE and line.scheduled_waiting >= job.max_queued:
                return Verdict.SKIP, f"overlap queue: {job.max_queued} fires already wait (max_queued)"
            line.scheduled_waiting += 1
        heapq.heappush(line.waiting, Turn(row.planned_ms, row.attempt, row.id, row, epoch))
        return Verdict.WAIT, ""

    def may_go_ahead(self, job: JobRow, row: InstanceRow) -> bool:
        """May the fire be sent ahead of its time (lead dispatch)? When admitting it now runs it: the
        line is free (or held by this very fire), the job allows overlap, or an operator forced the
        fire. Sent, it holds the line from now: a fire due before it meanwhile waits behind it."""
        line = self._lines.get(job.id)
        return (line is None or row.id in line.holders or job.overlap == _ALLOW or row.trigger == FORCED)

    def refusal(self, job: JobRow) -> str | None:
        """Why the job's overlap policy would skip a fire due now, or None: an operator's trigger
        or retry (without force) is refused for that reason rather than queued against it."""
        line = self._lines.get(job.id)
        if line is None or job.overlap == _ALLOW or not (line.holders or line.waiting):
            return None
        if job.overlap == _SKIP:
            return "overlap skip: an earlier instance of the job still runs (force runs it anyway)"
        if job.overlap == _BUFFER_ONE and line.waiting:
            return "overlap buffer_one: a fire already waits behind the running one (force runs it anyway)"
        if job.overlap == _QUEUE and len(line.waiting) >= job.max_queued:
            return f"overlap queue: {job.max_queued} fires already wait (max_queued; force runs it anyway)"
        return None

    def remove(self, job_id: int, instance_id: int) -> Turn | None:
        """Take a waiting fire out of its line (an operator cancelled it); None if it does not wait there."""
        line = self._lines.get(job_id)
        if line is None:
            return None
        for index, turn in enumerate(line.waiting):
            if turn.instance_id == instance_id:
                line.waiting.pop(index)
                heapq.heapify(line.waiting)
                if turn.row.trigger not in NEVER_SKIPPED:
                    line.scheduled_waiting -= 1
                if not line.holders and not line.waiting:
                    del self._lines[job_id]
                return turn
        return None

    def push(self, row: InstanceRow, epoch: int) -> None:
        """Queue a recovered fire in planned order without a verdict: it was admitted once already
        (by the previous owner); the caller releases the hold it waited behind."""
        line = self._lines.setdefault(row.job_id, _Line())
        if row.trigger not in NEVER_SKIPPED:
            line.scheduled_waiting += 1
        heapq.heappush(line.waiting, Turn(row.planned_ms, row.attempt, row.id, row, epoch))

    def hold(self, job_id: int, key: Hashable) -> None:
        """``key`` holds the job without being admitted: a recovered fire that may still run."""
        self._lines.setdefault(job_id, _Line()).holders.add(key)

    def holds(self, job_id: int, key: Hashable) -> bool:
        line = self._lines.get(job_id)
        return line is not None and key in line.holders

    def replace(self, job_id: int, old: Hashable, new: Hashable) -> bool:
        """Pass ``old``'s hold on to ``new`` (a retry or re-run continuing a fire). False if ``old`` held nothing."""
        line = self._lines.get(job_id)
        if line is None or old not in line.holders:
            return False
        line.holders.discard(old)
        line.holders.add(new)
        return True

    def release(self, job_id: int, key: Hashable) -> Turn | None:
        """``key`` no longer holds the job; the next fire in line, if the job is now free (it then holds it)."""
        line = self._lines.get(job_id)
        if line is None or key not in line.holders:
            return None
        line.holders.discard(key)
        return self._next(job_id, line)

    def _next(self, job_id: int, line: _Line) -> Turn | None:
        if line.holders:
            return None
        if not line.waiting:
            del self._lines[job_id]
            return None
        turn = heapq.heappop(line.waiting)
        if turn.row.trigger not in NEVER_SKIPPED:
            line.scheduled_waiting -= 1
        line.holders.add(turn.instance_id)
        return turn

    def busy(self, job_id: int) -> bool:
        """Has the job a holder or a fire waiting?"""
        return job_id in self._lines

    def waiting(self, job_id: int) -> list[Turn]:
        line = self._lines.get(job_id)
        return sorted(line.waiting) if line is not None else []

    def forget(self, job_ids: set[int]) -> list[Turn]:
        """Drop the lines of these jobs (their app moved away); return the fires that waited."""
        dropped: list[Turn] = []
        for job_id in job_ids & self._lines.keys():
            dropped.extend(self._lines.pop(job_id).waiting)
        return dropped
