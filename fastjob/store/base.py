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
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..models import (
    RUN_HISTORY,
    InstanceRow,
    InstanceUpdate,
    JobRow,
    JobRun,
    JobSpec,
    LogLine,
    PausedBy,
    ScheduleType,
    Status,
    TaskBatch,
)


class StoreError(Exception):
    """The database could not be reached or answered an error after the retry bound."""


class NotOwnerError(StoreError):
    """A fenced write was refused: the caller no longer owns the app at that epoch."""

    def __init__(self, app: str, epoch: int) -> None:
        super().__init__(f"not the owner of app {app!r} at epoch {epoch}")
        self.app = app
        self.epoch = epoch


@dataclass(slots=True)
class ServerRow:
    id: str
    address: str
    started_at: float
    heartbeat_at: float
    load_score: float = 0.0  # the weight of the apps it owns (see Cluster.load), for balancing
    drain: bool = False  # an operator asked it to hand its apps to others
    http_address: str = ""  # host:port of its admin API ("" if it serves none), for forwarding


@dataclass(slots=True)
class AppRow:
    """An AppName's ownership. ``prev_owner``/``left_clean``/``adopted`` say how the app came to
    its owner, so that the owner knows what the one before it may have left unwritten."""

    name: str
    owner: str | None
    epoch: int
    token_hash: str | None = None
    prev_owner: str | None = None  # who owned it before the current owner's claim
    #: the previous owner let go cleanly (released or handed over with everything written):
    #: no fire it recorded as waiting can have been dispatched
    left_clean: bool = False
    #: the owner has loaded it; False while an app handed or assigned to a server awaits it
    adopted: bool = False


@dataclass(slots=True)
class WorkerRow:
    """A worker session as registered by the owner that accepted it (see ``register_worker``)."""

    app: str
    worker_id: str
    server: str
    connected_at: float
    info: Any = None  # tags, capacity, host, pid, address: for display


@dataclass(slots=True)
class TokenRow:
    """An API (or worker) token as stored: its secret only as a salted hash (see server/auth.py)."""

    id: str  # the token's public part: ``fj_<id>_<secret>``; the key it is found by
    name: str  # who holds it, for the audit log
    role: str  # viewer, operator, admin or worker
    apps: list[str] | None  # the apps it may act on; None: every app
    salt: str
    secret_hash: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None


@dataclass(slots=True)
class AuditEntry:
    """One mutating call, over HTTP or the wire: who did what to which app, and how it ended."""

    ts: float
    actor: str  # the token's name, or "anonymous"
    action: str  # e.g. "job.create", "instance.kill", "token.revoke"
    app: str | None
    target: str  # the job name, instance id or token id acted on
    outcome: str  # "ok", or the error code
    detail: str | None = None
    via: str = "http"  # http or wire
    id: int = 0


@dataclass(slots=True)
class OwnershipChange:
    """An app changing hands, as the server that moved it recorded it."""

    app: str
    from_server: str | None
    to_server: str | None
    epoch: int
    reason: str  # claimed, takeover, handed over, released, lost, adopted
    ts: float
    id: int = 0


#: The append-only tables ``prune_older`` prunes, with their time column (the outbox: only
#: rows delivered or given up on).
PRUNABLE = {"job_logs": "ts", "audit_log": "ts", "app_history": "ts", "idempotency_keys": "created_at",
            "alarm_outbox": "delivered_at", "task_batches": "created_at"}


@dataclass(slots=True)
class AlarmRow:
    """One alarm for one webhook, in the outbox until delivered (server/alarms.py)."""

    event_id: str  # stable: a receiver drops repeats by it
    webhook: str  # the webhook's id
    app: str | None  # the app whose owner sends it; None: a cluster alarm, sent by any server
    payload: Any  # the event, as JSON
    created_at: float
    next_attempt_at: float = 0.0
    attempts: int = 0
    id: int = 0

#: How long a trigger's Idempotency-Key keeps its answer.
IDEMPOTENCY_TTL = 24 * 3600.0


# Given a job and the planned time (ms) of its previous fire, the next planned time in ms,
# or None when the job has no further fire (one-shot, run-once, api, fixed delay).
NextFire = Callable[[JobRow, int], int | None]


@dataclass(slots=True)
class FirePlan:
    """What one claim writes for one due job (see :meth:`Store.claim_due`).

    Built once per due job on the claim's hot path."""

    runs: list[int] = field(default_factory=list)  # planned ms of fires written waiting, trigger "schedule"
    catch_up: list[int] = field(default_factory=list)  # missed fires that still run (trigger "catch_up")
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (planned ms, reason): written skipped
    next_ms: int | None = None  # the job's next_trigger_ms after the claim

    def __len__(self) -> int:
        return len(self.runs) + len(self.catch_up) + len(self.skipped)


#: (job, horizon_ms, budget) -> the job's fires due up to the horizon, at most ``budget`` of them.
FirePlanner = Callable[[JobRow, int, int], FirePlan]


class Store(abc.ABC):
    """Abstract data store. Every method is a coroutine; none blocks the event loop.

    Transient database failures (connection lost, server restarting) are retried with
    backoff inside the method up to a bound, then surface as :class:`StoreError`.
    """

    #: Do concurrent write transactions overlap (a connection pool to a database server)? Not
    #: on SQLite: its one thread runs them in turn, and Python work on the event loop meanwhile
    #: slows that thread down (each row it steps through takes the GIL back), so large batches
    #: of writes are better handed to it one at a time.
    concurrent_writes = False
    #: Called after each operation with (its name, seconds, succeeded): the server's metrics.
    observer: Callable[[str, float, bool], None] | None = None

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
    async def register_server(self, server_id: str, address: str, now: float, http_address: str = "") -> None:
        """Insert or refresh this server's row (address, started_at, heartbeat_at = now)."""

    @abc.abstractmethod
    async def heartbeat_server(self, server_id: str, now: float, load: float = 0.0) -> bool:
        """Set heartbeat_at = now and the server's load. False if the row is gone (the caller re-registers)."""

    @abc.abstractmethod
    async def set_server_drain(self, server_id: str, drain: bool) -> bool:
        """Ask a server to hand its apps to others (or stop asking). False if there is no such server."""

    @abc.abstractmethod
    async def list_servers(self) -> list[ServerRow]:
        """Every registered server; the caller decides liveness from heartbeat_at."""

    @abc.abstractmethod
    async def remove_server(self, server_id: str) -> None:
        """Delete the server's row (clean shutdown)."""

    async def fence_server(self, server_id: str) -> int:
        """End the database sessions of a server judged dead; return how many were ended.

        A server frozen inside a transaction (SIGSTOP, a stalled VM) keeps its row locks for as
        long as its connection lives, and its successor's claim would wait on them. Stores
        whose locks cannot outlive a session's owner have nothing to end."""
        return 0

    # ---- app ownership (compare-and-set, no locks) --------------------------------------
    @abc.abstractmethod
    async def ensure_app(self, app: str) -> AppRow:
        """Return the app's row, creating it unowned at epoch 0 if missing (race-safe)."""

    @abc.abstractmethod
    async def get_app(self, app: str) -> AppRow | None:
        """The app's row, or None."""

    @abc.abstractmethod
    async def list_apps(self) -> list[AppRow]:
        """Every app row."""

    @abc.abstractmethod
    async def claim_app(self, app: str, server_id: str, seen_epoch: int, *, prev_owner: str | None = None,
                        left_clean: bool = False, adopted: bool = True) -> int | None:
        """CAS: ``SET owner = server_id, epoch = epoch + 1 WHERE app = app AND epoch = seen_epoch``,
        recording ``prev_owner``, ``left_clean`` and ``adopted`` (see :class:`AppRow`).

        Returns the new epoch if this call won, None if the epoch had moved (someone else
        claimed first). Of several concurrent callers with the same ``seen_epoch`` exactly
        one wins. The caller checks beforehand that the recorded owner is absent or dead, or
        is itself (a hand-over: it wrote everything first).
        """

    @abc.abstractmethod
    async def release_apps(self, server_id: str, apps: Sequence[str] | None = None) -> list[str]:
        """Set owner = NULL and epoch + 1 (left clean) on the apps owned by ``server_id`` (all,
        or those named); return the names of those released."""

    # ---- worker registry ------------------------------------------------------------------
    @abc.abstractmethod
    async def register_worker(self, app: str, worker_id: str, server_id: str, now: float, info: Any) -> None:
        """Record that ``server_id`` accepted this worker of ``app`` (replacing an older record)."""

    @abc.abstractmethod
    async def unregister_worker(self, app: str, worker_id: str, server_id: str) -> None:
        """Forget the worker, if ``server_id`` is still the server it is recorded with."""

    @abc.abstractmethod
    async def list_workers(self, app: str, server_id: str | None = None) -> list[WorkerRow]:
        """The workers recorded for ``app`` (only those with ``server_id``, if given)."""

    @abc.abstractmethod
    async def set_app_token(self, app: str, token_hash: str | None) -> None:
        """Store the hashed auth token of an app (None: no token required)."""

    # ---- jobs --------------------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_job(self, spec: JobSpec, next_trigger_ms: int | None, now: float) -> JobRow:
        """Create or update the job (app, name); revives a logically deleted one.

        ``next_trigger_ms`` replaces the stored next fire only when the schedule
        (type or expression or timezone) changed or the job is new, revived or re-enabled
        (``enabled`` going from false to true); an unchanged schedule keeps its place.
        ``version`` is bumped when anything changed. An API write: a new job is API-owned, and
        ``enabled`` false is an operator's pause (see store/job_writes.py).
        """

    @abc.abstractmethod
    async def declare_jobs(self, app: str, specs: Sequence[JobSpec], first_fire: Callable[[JobSpec], int | None],
                           now: float) -> list[JobRow]:
        """A worker's declarations, in one transaction: create or update each job as code-owned
        (the rules of store/job_writes.py; ``first_fire`` gives a new or re-scheduled job its next
        fire). Returns the rows written (new or changed); unchanged jobs are not rewritten."""

    @abc.abstractmethod
    async def pause_jobs(self, app: str, names: Sequence[str], paused_by: PausedBy, now: float) -> list[JobRow]:
        """Disable those of the named jobs that are enabled, recording why; their stored next fire
        is kept (a one-shot resumed later still fires once). Returns the jobs paused, as now stored."""

    @abc.abstractmethod
    async def resume_jobs(self, app: str, names: Sequence[str], paused_by: PausedBy, now: float) -> list[JobRow]:
        """Enable those of the named jobs that are paused for ``paused_by`` (and for nothing else);
        their stored next fire is kept. Returns the jobs resumed, as now stored."""

    @abc.abstractmethod
    async def get_job(self, job_id: int) -> JobRow | None:
        """The job by id (including logically deleted ones), or None."""

    @abc.abstractmethod
    async def get_job_by_name(self, app: str, name: str) -> JobRow | None:
        """The live (not deleted) job of that app and name, or None."""

    @abc.abstractmethod
    async def list_jobs(self, app: str) -> list[JobRow]:
        """Every live job of the app, by name."""

    @abc.abstractmethod
    async def delete_job(self, app: str, name: str, now: float) -> bool:
        """Logical delete (is_delete = 1, enabled = 0, next_trigger_ms = NULL). False if absent."""

    @abc.abstractmethod
    async def set_job_enabled(self, app: str, name: str, enabled: bool, next_trigger_ms: int | None,
                              now: float) -> bool:
        """An operator enables (with a fresh next fire and anchor_ms = now) or disables (paused_by operator) a job.
        False if absent."""

    @abc.abstractmethod
    async def set_next_trigger(
        self, server_id: str, app: str, epoch: int, job_id: int, next_trigger_ms: int | None
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
        planner: FirePlanner,
        now: float,
        limit: int = 5000,
        exclude_types: Sequence[ScheduleType] = (),
    ) -> list[InstanceRow]:
        """Claim every enabled job of ``app`` due before ``horizon_ms``, in ONE transaction.

        For each due job (``next_trigger_ms <= horizon_ms``, enabled, not deleted, schedule
        type not in ``exclude_types``), in (next_trigger_ms, id) order, ask ``planner`` for its
        fires up to the horizon (at most the budget left of ``limit`` in all) and write them:
        ``runs`` as ``waiting`` rows with ``trigger = "schedule"``, ``catch_up`` as ``waiting``
        rows with ``trigger = "catch_up"``, ``skipped`` as final ``skipped`` rows carrying
        their reason as ``error``; then move ``next_trigger_ms`` to the plan's ``next_ms``.
        Rows are written with ``attempt = 1`` (a retry writes attempt + 1 through
        ``insert_instance``), with a few multi-row statements, not a round trip per job. A
        fire already recorded (the UNIQUE key) is skipped, not an error.

        Fenced: if ``server_id`` does not own ``app`` at ``epoch`` nothing is written and
        :class:`NotOwnerError` is raised. Returns the new waiting rows (not the skipped ones).

        The rows are written and returned with ``params = None``: a scheduled fire runs with
        its job's params (the dispatcher falls back to them), so they are not copied per fire.
        The :class:`JobRow` passed to ``planner`` carries only ``id``, ``app``,
        ``schedule_type``, ``schedule_expr``, ``timezone``, ``misfire_policy``,
        ``catch_up_window``, ``run_once``, ``next_trigger_ms`` and ``version``; its other
        fields are placeholders (empty name and handler, None params, default settings),
        not the job's values.
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
        reruns: int = 0,
    ) -> InstanceRow | None:
        """Fenced: write one ``waiting`` instance (API trigger, retry, re-run).

        Returns None if (job_id, planned_ms, attempt) is already recorded, except when that row
        is this very write (same server, epoch, trigger and ``now``): a caller that retries with
        the same ``now`` after an unanswered try gets the row its try committed.
        """

    async def write_statuses(self, updates: Sequence[InstanceUpdate], lines: Sequence[LogLine],
                             finished: dict[int, float], alarms: Sequence[AlarmRow] = ()) -> None:
        """What the status writer gathered in one flush: instance updates, log lines, and each job's
        latest finish (``last_finished_time``, never moved back), and the alarms those statuses
        raised (into the outbox: the same transaction, so no alarm is lost or raised for a status
        that was not written). Backends do it in one transaction with a few multi-row statements,
        whatever the fire rate."""
        if updates:
            await self.update_instances(updates)
        if lines:
            await self.append_logs(lines)
        if finished:
            await self.mark_jobs_finished(finished)
        if alarms:
            await self.add_alarms(alarms)

    @abc.abstractmethod
    async def update_instances(self, updates: Iterable[InstanceUpdate]) -> int:
        """Apply a batch of status changes in one transaction; return rows changed.

        Monotonic (see :class:`InstanceUpdate`): a final status is never overwritten, so a
        late or duplicated report is harmless.
        """

    @abc.abstractmethod
    async def get_instance(self, instance_id: int) -> InstanceRow | None:
        """One instance, or None."""

    @abc.abstractmethod
    async def list_instances(
        self,
        app: str,
        job_id: int | None = None,
        statuses: Sequence[Status] | None = None,
        limit: int = 100,
    ) -> list[InstanceRow]:
        """Instances of an app (optionally one job, some statuses), newest first."""

    @abc.abstractmethod
    async def load_unfinished(self, app: str) -> list[InstanceRow]:
        """Every unfinished (waiting, queued, dispatched, running) instance of the app, oldest planned first.

        Used by a new owner (takeover, restart) to recover the WAL.
        """

    @abc.abstractmethod
    async def written_at(self, server_id: str, app: str, epoch: int, created_at: float) -> list[InstanceRow]:
        """The waiting instances a write of ours stamped ``created_at`` left in the WAL.

        For a caller that never heard the write's answer: its COMMIT may have landed while the
        reply was lost and every retry failed, and then nobody holds those fires."""

    # ---- second-level run history ----------------------------------------------------------
    @abc.abstractmethod
    async def add_job_runs(self, runs: Sequence[JobRun], prune: Collection[int] = ()) -> None:
        """Store runs of second-level jobs; of the jobs in ``prune``, keep only the last RUN_HISTORY."""

    @abc.abstractmethod
    async def list_job_runs(self, job_id: int, limit: int = RUN_HISTORY) -> list[JobRun]:
        """A job's stored runs, newest first."""

    # ---- job logs ----------------------------------------------------------------------
    @abc.abstractmethod
    async def append_logs(self, lines: Sequence[LogLine]) -> None:
        """Store log lines shipped by workers, in one batched statement."""

    @abc.abstractmethod
    async def get_logs(self, instance_id: int, limit: int = 1000, offset: int = 0) -> list[LogLine]:
        """An instance's log lines in the order written, from the ``offset``-th (a live tail reads
        only what is new)."""

    # ---- the admin API's reads of instances --------------------------------------------------
    @abc.abstractmethod
    async def query_instances(
        self,
        app: str,
        *,
        job_id: int | None = None,
        statuses: Sequence[Status] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        after: tuple[int, int] | None = None,
        limit: int = 100,
    ) -> list[InstanceRow]:
        """A page of an app's instances, latest planned first (planned_ms DESC, id DESC): those
        planned in [since_ms, until_ms), and, with ``after`` = (planned_ms, id) of the last row of
        the previous page, only those that come after it (a cursor that stays stable as rows arrive)."""

    @abc.abstractmethod
    async def query_jobs(self, app: str, *, after: str = "", limit: int = 100, name_contains: str = "",
                         tag: str = "", enabled: bool | None = None) -> list[JobRow]:
        """A page of the app's live jobs by name, after ``after``: those whose name contains
        ``name_contains``, that carry ``tag``, and are enabled or not as asked."""

    @abc.abstractmethod
    async def job_outcomes(self, app: str, job_ids: Collection[int], since_ms: int) -> dict[int, dict[str, int]]:
        """For each of these jobs, its instances planned since ``since_ms`` by status (a page of jobs
        shows each one's success rate and last outcome)."""

    @abc.abstractmethod
    async def count_unfinished(self, app: str) -> dict[str, int]:
        """How many of the app's instances are in each unfinished status (a gauge of /metrics)."""

    @abc.abstractmethod
    async def job_names(self, app: str, job_ids: Collection[int]) -> dict[int, str]:
        """The names of these jobs of the app (deleted ones too), by id: a page of instances names its
        jobs without reading every job of the app."""

    @abc.abstractmethod
    async def instance_counts(self, app: str, since_ms: int, until_ms: int,
                              bucket_ms: int) -> list[tuple[int, str, int]]:
        """(bucket start ms, status, count) of the app's instances planned in [since_ms, until_ms),
        bucketed by planned time from ``since_ms`` in steps of ``bucket_ms``."""

    @abc.abstractmethod
    async def lateness_sample(self, app: str, since_ms: int, until_ms: int, limit: int) -> list[float]:
        """Seconds from planned to started of at most ``limit`` of the latest started first attempts
        planned in [since_ms, until_ms)."""

    # ---- API tokens --------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_token(self, token: TokenRow) -> None:
        """Store a new token (its id is fresh)."""

    @abc.abstractmethod
    async def get_token(self, token_id: str) -> TokenRow | None:
        """The token with that id, revoked or not, or None."""

    @abc.abstractmethod
    async def list_tokens(self) -> list[TokenRow]:
        """Every token, revoked ones too, oldest first."""

    @abc.abstractmethod
    async def revoke_token(self, token_id: str, now: float) -> bool:
        """Mark the token revoked; False if there is no such token or it was revoked already."""

    # ---- audit log and ownership history -----------------------------------------------------
    @abc.abstractmethod
    async def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit entries in one statement."""

    @abc.abstractmethod
    async def list_audit(self, *, app: str | None = None, before_id: int | None = None,
                         limit: int = 100) -> list[AuditEntry]:
        """Audit entries (of one app, if given), newest first, older than ``before_id`` if given."""

    @abc.abstractmethod
    async def add_ownership_change(self, change: OwnershipChange) -> None:
        """Record an app changing hands."""

    @abc.abstractmethod
    async def list_ownership_changes(self, *, app: str | None = None, before_id: int | None = None,
                                     limit: int = 100) -> list[OwnershipChange]:
        """Ownership changes (of one app, if given), newest first, older than ``before_id`` if given."""

    # ---- the alarm outbox --------------------------------------------------------------------
    @abc.abstractmethod
    async def add_alarms(self, alarms: Sequence[AlarmRow]) -> None:
        """Put alarms in the outbox; one already there (same event and webhook) is left as it is."""

    @abc.abstractmethod
    async def claim_alarms(self, server_id: str, apps: Collection[str], now: float, lease: float,
                           limit: int, *, webhooks: Collection[str] | None = None) -> list[AlarmRow]:
        """Claim for ``lease`` seconds up to ``limit`` due, undelivered alarms of these apps and the
        cluster's (app None), for these webhooks (None: any): a compare-and-set per row, so of two
        servers one gets each."""

    @abc.abstractmethod
    async def finish_alarm(self, alarm_id: int, now: float, delivered: bool, next_attempt_at: float,
                           error: str | None, claimed_by: str) -> None:
        """Record a delivery (delivered_at = now), or a failed attempt (due again at ``next_attempt_at``;
        ``delivered`` with an error: given up) by the server that holds the claim (a lapsed claim
        another server took since is left alone)."""

    # ---- retention ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def prune_instances(self, app: str, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` of the app's finished instances planned before ``before_ms``
        (oldest first), with their log lines, in one short transaction; return how many."""

    @abc.abstractmethod
    async def prune_older(self, table: str, before: float, limit: int) -> int:
        """Of the ``limit`` oldest rows of an append-only table (one of PRUNABLE), delete those
        written before ``before`` (epoch seconds); return how many."""

    # ---- idempotent triggers -----------------------------------------------------------------
    @abc.abstractmethod
    async def reserve_idempotency_key(self, app: str, key: str, now: float) -> tuple[bool, int | None]:
        """Reserve ``key`` for a trigger of ``app``: (True, None) if this call took it; otherwise
        (False, the instance it triggered), the instance None while the first call still runs.
        Keys older than IDEMPOTENCY_TTL are free again."""

    @abc.abstractmethod
    async def settle_idempotency_key(self, app: str, key: str, instance_id: int | None) -> None:
        """The reserved trigger ended: remember its instance, or (None: it failed) free the key."""

    # ---- sub-tasks: ctx.map batches, broadcast sub-runs, workflow steps ---------------------------
    @abc.abstractmethod
    async def add_task_batches(self, batches: Sequence[TaskBatch]) -> dict[str, TaskBatch]:
        """Write new batches in one transaction. A batch whose key is stored already is not
        written: it comes back, as stored, in the answer (by key), because a parent that resubmits
        after a reconnect, or a re-run of its fire, must get the stored batch and its results."""

    @abc.abstractmethod
    async def save_task_batches(self, batches: Sequence[TaskBatch]) -> None:
        """Write what changes of stored batches (status, attempts, worker, results, errors, logs,
        finish time, the parent attempt), by key, in one transaction. The app's owner decides
        these (it alone tracks the batch); a key not stored is ignored."""

    @abc.abstractmethod
    async def list_task_batches(self, root: str, *, parent: str | None = None, call: int | None = None,
                                after_key: str = "", limit: int = 1000) -> list[TaskBatch]:
        """The batches under a fire (``root``), in the order written; of one ``parent`` and
        ``call`` if given; at most ``limit`` (bounded), after the batch keyed ``after_key``."""

    @abc.abstractmethod
    async def task_progress(self, roots: Collection[str]) -> dict[str, tuple[int, int, int]]:
        """Per fire with batches: (items, items ended, items failed), over its nested maps too."""
