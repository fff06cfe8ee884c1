"""What the scheduler knows of a fire between its WAL row and its final status, and the deadlines it arms.

The scheduler's parts share these records: :class:`Inflight` (sent to a worker), :class:`Pending`
(due, waiting for a worker with room), :class:`Recovery` (a gained app's fires that its previous
owner may have sent), and one timer entry type per kind of deadline, which the wheel hands back.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..models import InstanceRow, JobRow, Status
from .lines import Turn

if TYPE_CHECKING:
    from .session import WorkerSession

#: The line key that holds a job while fires its previous owner may have sent are unresolved.
RECOVERING = "recovering"
MAX_TEXT = 8192  # error texts and log lines are cut to this many characters before they are stored


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
    kill_requested: bool = False  # an operator killed it: its run ends as killed, not interrupted
    sent_at: float | None = None  # wall clock of the DISPATCH (None: recovered after a failover)
    started: bool = False  # its start was counted (metrics)
    lead: bool = False  # sent before its planned time (DISPATCH start_at): its worker starts it then
    withdrawing: bool = False  # a lead fire we asked its worker to drop (its job changed): back to the wheel


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
    lead: bool = False  # its lead time, not its planned time: send it ahead if it may go (Scheduler.lead)


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


class Alarms(Protocol):
    """The deadlines of the scheduler's timer (armed with a delay in seconds; a handle cancels one)."""

    def arm(self, item: TimerEntry, delay: float) -> int: ...

    def cancel(self, handle: int | None) -> None: ...


class Finish(Protocol):
    """Record a fire's final status and start what follows it (Scheduler.finish)."""

    def __call__(self, row: InstanceRow, status: Status, *, result: Any = None, error: str | None = None,
                 worker: str | None = None, started_at: float | None = None, finished_at: float | None = None,
                 job: JobRow | None = None, alarm_event: str | None = None) -> None: ...


#: Hand a line's next fire (if any) its turn: Scheduler.start_turns.
StartTurns = Callable[[Turn | None], None]
#: Put a fire into the wheel under an epoch, at a timer time or at its planned time: Scheduler.enter_wheel.
EnterWheel = Callable[[InstanceRow, int, float | None], None]
