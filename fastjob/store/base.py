"""The storage contract every backend honours.

All durable state lives behind this interface: servers (membership and heartbeats), apps
(AppName -> owner server and epoch), jobs, instances (the write-ahead log of fires) and job
logs. Backends: ``sqlite`` (embedded, the default) and ``mysql`` (aiomysql, for clusters).

Times are float seconds since the epoch (wall clock) unless a name ends in ``_ms``. Planned
fire times are integer milliseconds so that they can take part in the UNIQUE key
(job_id, planned_ms, attempt) exactly.

Ownership is lock-free: an app row carries (owner, epoch). Claiming is a compare-and-set on
the epoch, and every scheduling write (``claim_due``, ``insert_instance``, ``set_next_trigger``)
is fenced: it writes nothing unless the caller still owns the app at the epoch it names, and
raises :class:`NotOwnerError` instead.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence


class StoreError(Exception):
    """The database could not be reached or answered an error after the retry bound."""


class NotOwnerError(StoreError):
    """A fenced write was refused: the caller no longer owns the app at that epoch."""

    def __init__(self, app: str, epoch: int) -> None:
        super().__init__(f"not the owner of app {app!r} at epoch {epoch}")
        self.app = app
        self.epoch = epoch


class ScheduleType(str, enum.Enum):
    CRON = "cron"
    FIXED_RATE = "fixed_rate"
    FIXED_DELAY = "fixed_delay"
    ONCE = "once"
    API = "api"


class Status(str, enum.Enum):
    WAITING = "waiting"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    MISFIRED = "misfired"


FINAL_STATUSES = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED, Status.MISFIRED}
)
UNFINISHED_STATUSES = frozenset({Status.WAITING, Status.DISPATCHED, Status.RUNNING})


@dataclass(slots=True)
class ServerRow:
    id: str
    address: str
    started_at: float
    heartbeat_at: float


@dataclass(slots=True)
class AppRow:
    name: str
    owner: Optional[str]
    epoch: int
    token_hash: Optional[str] = None


@dataclass(slots=True)
class JobSpec:
    """What a user declares. ``upsert_job`` turns it into a :class:`JobRow`.

    ``schedule_expr`` holds the cron string, the period in seconds (rate/delay, as text),
    or the ISO/epoch time of a one-shot; it is empty for ``api`` jobs.
    """

    app: str
    name: str
    handler: str
    schedule_type: ScheduleType
    schedule_expr: str = ""
    timezone: str = "UTC"
    params: Any = None
    timeout: Optional[float] = None
    retry_times: int = 0
    retry_backoff: float = 1.0
    misfire_policy: str = "fire_once"  # or "skip"
    tags: list[str] = field(default_factory=list)
    routing: str = "round_robin"  # or "random", "least_busy"
    run_once: bool = False
    enabled: bool = True
    allow_overlap: bool = False


@dataclass(slots=True)
class JobRow:
    id: int
    app: str
    name: str
    handler: str
    schedule_type: ScheduleType
    schedule_expr: str
    timezone: str
    params: Any
    timeout: Optional[float]
    retry_times: int
    retry_backoff: float
    misfire_policy: str
    tags: list[str]
    routing: str
    run_once: bool
    enabled: bool
    allow_overlap: bool
    next_trigger_ms: Optional[int]
    created_time: float
    updated_time: float
    last_finished_time: Optional[float]
    is_delete: bool
    version: int  # bumped by every upsert/enable/delete, so changes can be noticed
    stats: Any = None  # second-level outcome report (dict) or None


@dataclass(slots=True)
class InstanceRow:
    id: int
    job_id: int
    app: str
    planned_ms: int
    attempt: int
    status: Status
    trigger: str  # "schedule", "api", "retry"
    params: Any
    server: Optional[str]
    epoch: int
    worker: Optional[str] = None
    created_at: float = 0.0
    dispatched_at: Optional[float] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    result: Any = None
    error: Optional[str] = None


@dataclass(slots=True)
class InstanceUpdate:
    """One status change. ``None`` fields are left as they are.

    Updates are monotonic: an instance already in a final status is never changed again,
    and a later status never goes back to an earlier one (running never returns to dispatched).
    """

    id: int
    status: Status
    worker: Optional[str] = None
    dispatched_at: Optional[float] = None
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    result: Any = None
    error: Optional[str] = None


@dataclass(slots=True)
class LogLine:
    instance_id: int
    ts: float
    level: str
    message: str


# Given a job and the planned time (ms) of its previous fire, the next planned time in ms,
# or None when the job has no further fire (one-shot, run-once, api, fixed delay).
NextFire = Callable[[JobRow, int], Optional[int]]


class Store(abc.ABC):
    """Abstract data store. Every method is a coroutine; none blocks the event loop.

    Transient database failures (connection lost, server restarting) are retried with
    backoff inside the method up to a bound, then surface as :class:`StoreError`.
    """

    # ---- lifecycle -------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and run pending schema migrations.

        Migrations are idempotent and safe when several servers start at once.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection. Safe to call twice."""

    # ---- cluster membership ------------------------------------------------------------
    @abc.abstractmethod
    async def register_server(self, server_id: str, address: str, now: float) -> None:
        """Insert or refresh this server's row (address, started_at, heartbeat_at = now)."""

    @abc.abstractmethod
    async def heartbeat_server(self, server_id: str, now: float) -> bool:
        """Set heartbeat_at = now. False if the row is gone (the caller re-registers)."""

    @abc.abstractmethod
    async def list_servers(self) -> list[ServerRow]:
        """Every registered server; the caller decides liveness from heartbeat_at."""

    @abc.abstractmethod
    async def remove_server(self, server_id: str) -> None:
        """Delete the server's row (clean shutdown)."""

    # ---- app ownership (compare-and-set, no locks) --------------------------------------
    @abc.abstractmethod
    async def ensure_app(self, app: str) -> AppRow:
        """Return the app's row, creating it unowned at epoch 0 if missing (race-safe)."""

    @abc.abstractmethod
    async def get_app(self, app: str) -> Optional[AppRow]:
        """The app's row, or None."""

    @abc.abstractmethod
    async def list_apps(self) -> list[AppRow]:
        """Every app row."""

    @abc.abstractmethod
    async def claim_app(self, app: str, server_id: str, seen_epoch: int) -> Optional[int]:
        """CAS: ``SET owner = server_id, epoch = epoch + 1 WHERE app = app AND epoch = seen_epoch``.

        Returns the new epoch if this call won, None if the epoch had moved (someone else
        claimed first). Of several concurrent callers with the same ``seen_epoch`` exactly
        one wins. The caller checks beforehand that the recorded owner is absent or dead.
        """

    @abc.abstractmethod
    async def release_apps(self, server_id: str) -> list[str]:
        """Set owner = NULL and epoch + 1 on every app owned by ``server_id``; return their names."""

    @abc.abstractmethod
    async def set_app_token(self, app: str, token_hash: Optional[str]) -> None:
        """Store the hashed auth token of an app (None: no token required)."""

    # ---- jobs --------------------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_job(self, spec: JobSpec, next_trigger_ms: Optional[int], now: float) -> JobRow:
        """Create or update the job (app, name); revives a logically deleted one.

        ``next_trigger_ms`` replaces the stored next fire only when the schedule
        (type or expression or timezone) changed or the job is new, revived or re-enabled
        (``enabled`` going from false to true); an unchanged schedule keeps its place.
        ``version`` is bumped when anything changed.
        """

    @abc.abstractmethod
    async def get_job(self, job_id: int) -> Optional[JobRow]:
        """The job by id (including logically deleted ones), or None."""

    @abc.abstractmethod
    async def get_job_by_name(self, app: str, name: str) -> Optional[JobRow]:
        """The live (not deleted) job of that app and name, or None."""

    @abc.abstractmethod
    async def list_jobs(self, app: str) -> list[JobRow]:
        """Every live job of the app, by name."""

    @abc.abstractmethod
    async def delete_job(self, app: str, name: str, now: float) -> bool:
        """Logical delete (is_delete = 1, enabled = 0, next_trigger_ms = NULL). False if absent."""

    @abc.abstractmethod
    async def set_job_enabled(self, app: str, name: str, enabled: bool, next_trigger_ms: Optional[int], now: float) -> bool:
        """Enable (with a fresh next fire) or disable a job. False if absent."""

    @abc.abstractmethod
    async def set_next_trigger(
        self, server_id: str, app: str, epoch: int, job_id: int, next_trigger_ms: Optional[int]
    ) -> None:
        """Fenced: set the job's next fire (fixed delay after a finish; disabling run-once)."""

    @abc.abstractmethod
    async def mark_job_finished(self, job_id: int, finished_at: float) -> None:
        """Record last_finished_time."""

    async def mark_jobs_finished(self, finished: dict[int, float]) -> None:
        """Record last_finished_time of many jobs (job id -> time). Backends may batch this."""
        for job_id, finished_at in finished.items():
            await self.mark_job_finished(job_id, finished_at)

    @abc.abstractmethod
    async def set_job_stats(self, job_id: int, stats: Any, now: float) -> None:
        """Store the aggregated outcome report of a second-level job."""

    async def set_jobs_stats(self, stats: dict[int, Any], now: float) -> None:
        """Store the reports of many second-level jobs (job id -> report). Backends may batch this."""
        for job_id, report in stats.items():
            await self.set_job_stats(job_id, report, now)

    # ---- the WAL -----------------------------------------------------------------------
    @abc.abstractmethod
    async def claim_due(
        self,
        server_id: str,
        app: str,
        epoch: int,
        horizon_ms: int,
        next_fire: NextFire,
        now: float,
        limit: int = 5000,
        exclude_types: Sequence[ScheduleType] = (),
    ) -> list[InstanceRow]:
        """Claim every enabled job of ``app`` due before ``horizon_ms``, in ONE transaction.

        For each due job (``next_trigger_ms <= horizon_ms``, enabled, not deleted, schedule
        type not in ``exclude_types``), write one ``waiting`` instance row per fire whose
        planned time is ``<= horizon_ms`` (fire times from ``next_fire``, starting at
        ``next_trigger_ms``; at most ``limit`` rows in all) and move ``next_trigger_ms`` to
        the first fire after the horizon (or NULL; or, when ``limit`` cut a job short, its
        first unwritten fire). Rows are written with ``attempt = 1`` (a retry writes attempt
        + 1 through ``insert_instance``) and ``trigger = "schedule"``, with one multi-row
        statement per table, not a round trip per job. A fire already recorded (the UNIQUE
        key) is skipped, not an error.

        Fenced: if ``server_id`` does not own ``app`` at ``epoch`` nothing is written and
        :class:`NotOwnerError` is raised. Returns the new instance rows.

        The rows are written and returned with ``params = None``: a scheduled fire runs with
        its job's params (the dispatcher falls back to them), so they are not copied per fire.
        The :class:`JobRow` passed to ``next_fire`` carries only ``id``, ``app``,
        ``schedule_type``, ``schedule_expr``, ``timezone``, ``run_once``, ``next_trigger_ms``
        and ``version``; its other fields are placeholders (empty name and handler, None
        params, default settings), not the job's values.
        """

    @abc.abstractmethod
    async def insert_instance(
        self,
        server_id: str,
        app: str,
        epoch: int,
        job_id: int,
        planned_ms: int,
        attempt: int,
        trigger: str,
        params: Any,
        now: float,
    ) -> Optional[InstanceRow]:
        """Fenced: write one ``waiting`` instance (API trigger, retry, fixed-delay next fire).

        Returns None if (job_id, planned_ms, attempt) is already recorded.
        """

    @abc.abstractmethod
    async def update_instances(self, updates: Iterable[InstanceUpdate]) -> int:
        """Apply a batch of status changes in one transaction; return rows changed.

        Monotonic (see :class:`InstanceUpdate`): a final status is never overwritten, so a
        late or duplicated report is harmless.
        """

    @abc.abstractmethod
    async def get_instance(self, instance_id: int) -> Optional[InstanceRow]:
        """One instance, or None."""

    @abc.abstractmethod
    async def list_instances(
        self,
        app: str,
        job_id: Optional[int] = None,
        statuses: Optional[Sequence[Status]] = None,
        limit: int = 100,
    ) -> list[InstanceRow]:
        """Instances of an app (optionally one job, some statuses), newest first."""

    @abc.abstractmethod
    async def load_unfinished(self, app: str) -> list[InstanceRow]:
        """Every waiting/dispatched/running instance of the app, oldest planned first.

        Used by a new owner (takeover, restart) to recover the WAL.
        """

    # ---- job logs ----------------------------------------------------------------------
    @abc.abstractmethod
    async def append_logs(self, lines: Sequence[LogLine]) -> None:
        """Store log lines shipped by workers, in one batched statement."""

    @abc.abstractmethod
    async def get_logs(self, instance_id: int, limit: int = 1000) -> list[LogLine]:
        """An instance's log lines in the order written."""
