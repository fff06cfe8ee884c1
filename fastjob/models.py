"""FastJob's data model, defined once: jobs, instances, statuses and the kinds and policies of a schedule.

Everything else derives from here or is checked against it by a test: the wire's ``job_def``
struct (:func:`job_wire_fields`), the admin API's field checks (:data:`JOB_FIELD_TYPES`), the
defaults of ``Worker.schedule``, and the stores' columns and row codecs (tests/test_models.py).
Statuses carry their rules (:data:`STATUS_RULES`), which the README's fire contract table repeats.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class ScheduleType(str, enum.Enum):
    CRON = "cron"
    FIXED_RATE = "fixed_rate"
    FIXED_DELAY = "fixed_delay"
    ONCE = "once"
    API = "api"


#: ScheduleType by value: a dict lookup where ScheduleType(value) would cost a call per job.
SCHEDULE_TYPES: dict[str, ScheduleType] = {kind.value: kind for kind in ScheduleType}


class Status(str, enum.Enum):
    """What became of one attempt of a fire; see :data:`STATUS_RULES` for what each means."""

    WAITING = "waiting"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    INTERRUPTED = "interrupted"
    KILLED = "killed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class StatusRule:
    """The fire contract's row for one status (the README's table is checked against these)."""

    final: bool
    #: what follows a final status: "no", "if retries are left" (a new attempt after the
    #: backoff) or "re-run" (a new attempt at once, not counted against the retries)
    followed_by: str
    handler_failure: bool  # counts as a failure of the handler (alarms, success rate)
    #: does the job's next fire wait (overlap queue) while an instance is in this status?
    blocks_queue: str
    meaning: str


STATUS_RULES: dict[Status, StatusRule] = {
    Status.WAITING: StatusRule(False, "-", False, "once due (first in line), or a retry in its backoff",
                               "written to the WAL; in the owner's wheel until its planned time, then waiting for"
                               " a worker with room"),
    Status.QUEUED: StatusRule(False, "-", False, "no (it waits behind)",
                              "due while an earlier instance of its job runs (overlap queue or buffer_one);"
                              " takes no worker capacity"),
    Status.DISPATCHED: StatusRule(False, "-", False, "yes",
                                  "sent to a worker (a lead fire: sent ahead, held by its worker until its planned"
                                  " time)"),
    Status.RUNNING: StatusRule(False, "-", False, "yes", "the handler started"),
    Status.SUCCEEDED: StatusRule(True, "no", False, "no", "the handler returned"),
    Status.FAILED: StatusRule(True, "if retries are left", True, "no",
                              "the handler raised, or no worker could take the fire within --dispatch-wait"),
    Status.TIMED_OUT: StatusRule(True, "if retries are left", True, "no", "the handler ran past its timeout"),
    Status.INTERRUPTED: StatusRule(True, "re-run", False, "no",
                                   "the run was cut short by its worker, not by the handler: the worker stopped,"
                                   " died or lost its server for longer than its run lease; re-run up to 3 times"
                                   " (MAX_RERUNS) without using up a retry"),
    Status.KILLED: StatusRule(True, "no", False, "no",
                              "stopped while running by an operator (the admin API's kill)"),
    Status.SKIPPED: StatusRule(True, "no", False, "no",
                               "not run because its policy said so: overlap (skip, buffer_one, a full queue) or"
                               " misfire (skip, fire_once coalescing, older than the catch-up window)"),
    Status.CANCELLED: StatusRule(True, "no", False, "no",
                                 "not run because its job was deleted or disabled before it came due, or an"
                                 " operator killed it before it started"),
}

FINAL_STATUSES = frozenset(status for status, rule in STATUS_RULES.items() if rule.final)
UNFINISHED_STATUSES = frozenset(status for status, rule in STATUS_RULES.items() if not rule.final)
#: Re-runs of one fire after interruptions (worker stopped, died or lost), beyond which the
#: fire ends ``interrupted``: a handler that kills its worker every time must not loop forever.
MAX_RERUNS = 3


class Overlap(str, enum.Enum):
    """What a fire does when it comes due while an earlier instance of its job runs (Temporal's vocabulary)."""

    QUEUE = "queue"  # wait, start when the earlier one ends, in planned order (bounded by max_queued)
    BUFFER_ONE = "buffer_one"  # at most one fire waits; the others are skipped
    SKIP = "skip"  # skipped
    ALLOW = "allow"  # runs at once, concurrently


class Routing(str, enum.Enum):
    """Which of the app's workers with room gets a fire."""

    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LEAST_BUSY = "least_busy"  # the one running the fewest instances for its capacity


class Misfire(str, enum.Enum):
    """What happens to fires that were never written to the WAL in time (downtime longer than the horizon)."""

    FIRE_ONCE = "fire_once"  # everything missed runs as one fire; the rest are recorded skipped
    FIRE_ALL = "fire_all"  # every missed fire runs, in order, back to catch_up_window
    SKIP = "skip"  # every missed fire is recorded skipped


class Origin(str, enum.Enum):
    """Who defines a job: a worker's code (declared at each registration, reconciled) or the API."""

    CODE = "code"  # declared by workers (JOB_DECLARE): code owns its definition
    API = "api"  # created through the API (JOB_UPSERT): never touched by reconciliation


class PausedBy(str, enum.Enum):
    """Why a job is disabled. Code owns a code-declared job's definition, operators own its paused
    state: a re-declaration resumes only what code or reconciliation paused, never an operator's pause."""

    OPERATOR = "operator"  # the API (JOB_ENABLE false, or JOB_UPSERT with enabled false)
    CODE = "code"  # declared with enabled=False
    UNDECLARED = "undeclared"  # no live worker of the app declared it for the reconciliation grace


#: Instance events a job's alarm may be raised for (``JobSpec.alarm["on"]``); the server adds
#: cluster events (an app with no live owner, a takeover) of its own.
ALARM_EVENTS = ("failed", "timed_out", "skipped", "no_worker", "late", "dead_man")
#: A job's alarm settings, each key with what it holds (all optional):
ALARM_SETTINGS = {
    "on": "the events that alarm (default: failed, timed_out, no_worker)",
    "silence": "seconds after an alarm in which the same event of the job does not alarm again",
    "threshold": "[N, M]: alarm only at the Nth such event within M seconds",
    "late_after": "seconds of lateness (planned to started) that raise a late alarm (implies 'late')",
    "dead_man": "seconds without a success that raise a dead_man alarm (implies 'dead_man'; not thresholded)",
}
DEFAULT_ALARM_EVENTS = ("failed", "timed_out", "no_worker")


def check_alarm(settings: Any) -> None:
    """Refuse alarm settings that are not ALARM_SETTINGS (ValueError naming what is wrong)."""
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise ValueError("alarm must be a map of settings")
    unknown = sorted(set(settings) - set(ALARM_SETTINGS))
    if unknown:
        raise ValueError(f"unknown alarm setting {unknown[0]!r}; known: {', '.join(ALARM_SETTINGS)}")
    events = settings.get("on", DEFAULT_ALARM_EVENTS)
    if (not isinstance(events, (list, tuple)) or not all(isinstance(e, str) for e in events)
            or not set(events) <= set(ALARM_EVENTS)):
        raise ValueError(f"alarm 'on' must list events of: {', '.join(ALARM_EVENTS)}")
    for key in ("silence", "late_after", "dead_man"):
        value = settings.get(key)
        if value is not None and (type(value) not in (int, float) or not 0 < value < 1e9):
            raise ValueError(f"alarm {key!r} must be a positive number of seconds")
    threshold = settings.get("threshold")
    if threshold is not None and not (isinstance(threshold, (list, tuple)) and len(threshold) == 2
                                      and type(threshold[0]) is int and 0 < threshold[0] < 1e6
                                      and type(threshold[1]) in (int, float) and 0 < threshold[1] < 1e9):
        raise ValueError("alarm 'threshold' must be [N events (a whole number), within M seconds]")


#: How an instance came about (``InstanceRow.trigger``).
TRIGGERS = ("schedule", "catch_up", "api", "forced", "retry", "rerun")


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
    timeout: float | None = None
    retry_times: int = 0
    retry_backoff: float = 1.0
    misfire_policy: str = Misfire.FIRE_ONCE.value
    tags: list[str] = field(default_factory=list)
    routing: str = Routing.ROUND_ROBIN.value
    run_once: bool = False
    enabled: bool = True
    overlap: str = Overlap.QUEUE.value
    catch_up_window: float = 3600.0  # misfire fire_all: how far back missed fires still run (seconds)
    max_queued: int = 100  # overlap queue: fires that may wait behind a running one; more are skipped
    alarm: dict[str, Any] | None = None  # alarm settings (ALARM_SETTINGS); None: the server's defaults
    mode: str = "single"  # MODES: "broadcast" runs each fire on every connected worker (with the tags)
    min_success: float = 1.0  # broadcast: the fraction of sub-runs that must succeed for the fire to
                              # succeed


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
    timeout: float | None
    retry_times: int
    retry_backoff: float
    misfire_policy: str
    tags: list[str]
    routing: str
    run_once: bool
    enabled: bool
    overlap: str
    catch_up_window: float
    max_queued: int
    next_trigger_ms: int | None
    created_time: float
    updated_time: float
    last_finished_time: float | None
    is_delete: bool
    version: int  # bumped by every upsert/enable/delete, so changes can be noticed
    stats: Any = None  # second-level outcome report (dict) or None
    origin: str = Origin.API.value  # who defines it (Origin)
    paused_by: str | None = None  # why it is disabled (PausedBy); None while enabled
    #: epoch ms its current schedule took effect (declared new, schedule changed, resumed):
    #: a second-level job's grid is anchored there, so a new runner neither repeats nor shifts it
    anchor_ms: int | None = None
    alarm: dict[str, Any] | None = None  # alarm settings, as declared (JobSpec.alarm)
    mode: str = "single"  # as declared (JobSpec.mode)
    min_success: float = 1.0


@dataclass(slots=True)
class InstanceRow:
    id: int
    job_id: int
    app: str
    planned_ms: int
    attempt: int
    status: Status
    trigger: str  # one of TRIGGERS
    params: Any
    server: str | None
    epoch: int
    worker: str | None = None
    created_at: float = 0.0
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: str | None = None
    reruns: int = 0  # earlier attempts of this fire that were interrupted (they use up no retry)


@dataclass(slots=True)
class InstanceUpdate:
    """One status change. ``None`` fields are left as they are.

    Updates are monotonic: an instance already in a final status is never changed again,
    and a later status never goes back to an earlier one (running never returns to dispatched).
    """

    id: int
    status: Status
    worker: str | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: str | None = None


@dataclass(slots=True)
class LogLine:
    instance_id: int
    ts: float
    level: str
    message: str


@dataclass(slots=True)
class JobRun:
    """One run of a second-level job, as kept in its run history (such runs have no instance
    row). Workers send their failed runs, the runs that logged, and their latest run; the
    server keeps a job's last :data:`RUN_HISTORY` of them (see server/second_level.py)."""

    job_id: int
    app: str
    worker: str
    planned_at: float  # epoch seconds
    started_at: float
    duration: float  # seconds
    status: str  # a final Status value
    error: str | None = None
    logs: list[list[Any]] = field(default_factory=list)  # [ts, level, message] lines of this run
    id: int = 0


#: Runs kept per second-level job (older ones are pruned).
RUN_HISTORY = 100


class TaskStatus(str, enum.Enum):
    """What became of one batch of sub-tasks (a slice of one ``ctx.map`` call, a broadcast
    sub-run or a workflow step): see :class:`TaskBatch`."""

    WAITING = "waiting"  # written; waits for a worker with room (or for its lost worker's run lease)
    RUNNING = "running"  # sent to a worker
    SUCCEEDED = "succeeded"  # every item returned
    FAILED = "failed"  # at least one item failed after its retries (``errors`` says which)


FINAL_TASK_STATUSES = frozenset({TaskStatus.SUCCEEDED.value, TaskStatus.FAILED.value})
#: How a job's fire runs: on one worker, or on every connected worker of the app (with its tags).
MODES = ("single", "broadcast")


@dataclass(slots=True)
class TaskBatch:
    """A contiguous slice of the items of one ``ctx.map`` call (or one broadcast sub-run, or one
    workflow step), written to the store before it runs and kept with its results.

    ``parent`` is the task key of the run that called ``ctx.map``: ``"<job id>:<planned ms>"`` for
    a job's fire, so that every attempt of a fire shares its finished sub-tasks, or
    ``"<batch key>.<index>"`` for a sub-task that maps again. ``key`` is
    ``"<parent>|<call number>|<first index>"``: unique per item range, the same for a re-run.
    ``root`` is the fire's key (the top of a nested map), for progress and listing.
    """

    key: str
    app: str
    root: str
    parent: str
    call: int
    start: int
    handler: str
    items: list[Any]
    status: str = TaskStatus.WAITING.value
    parent_attempt: int = 1  # the parent's attempt that wrote it (a later attempt re-runs failed items)
    attempt: int = 0  # how many times it was sent to a worker
    worker: str | None = None
    results: list[Any] | None = None  # one per item, in order (None for a failed item)
    errors: list[list[Any]] | None = None  # [index within the batch, error text] of each failed item
    #: how it runs: "retries", "timeout", "shard" [index, total], "pin" (a worker id), "upstream", "job"
    extra: dict[str, Any] | None = None
    logs: list[list[Any]] | None = None  # [ts, level, message] lines its items logged (bounded)
    created_at: float = 0.0
    finished_at: float | None = None

    @property
    def size(self) -> int:
        return len(self.items)


def task_key(parent: str, call: int, start: int) -> str:
    """A batch's key: the parent's task key, the parent's call number and the first item's index."""
    return f"{parent}|{call}|{start}"


def fire_key(job_id: int, planned_ms: int) -> str:
    """The task key of a job's fire: every attempt of the fire maps under it."""
    return f"{job_id}:{planned_ms}"


def root_of(parent: str) -> str:
    """The fire at the top of a (nested) map: the part of a task key before its first batch."""
    return parent.split("|", 1)[0]


#: The fields a job declaration must carry; every other field of :class:`JobSpec` has a default.
JOB_REQUIRED = ("name", "handler", "schedule_type")

# How each JobSpec annotation travels on the wire (protocol.md's type strings) and which Python
# types a decoded value of it may have (bool is never an int here, and an int is a float).
_FIELD_KINDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "str": ("str", (str,)),
    "int": ("int", (int,)),
    "float": ("float", (int, float)),
    "bool": ("bool", (bool,)),
    "Any": ("any", (object,)),
    "float | None": ("float|nil", (int, float, type(None))),
    "list[str]": ("array[str]", (list, tuple)),
    "dict[str, Any] | None": ("map|nil", (dict, type(None))),
    "ScheduleType": ("str", (str,)),
}
#: What a user declares of a job, as opposed to the app it belongs to (given by the connection).
_DECLARED = [f for f in dataclasses.fields(JobSpec) if f.name != "app"]


def job_wire_fields() -> dict[str, str]:
    """The wire's ``job_def`` struct: each declared field of JobSpec, optional unless required."""
    return {f.name: _FIELD_KINDS[str(f.type)][0] + ("" if f.name in JOB_REQUIRED else "?") for f in _DECLARED}


#: The Python types a decoded value of each declared job field may have (the API checks them).
JOB_FIELD_TYPES: dict[str, tuple[type, ...]] = {f.name: _FIELD_KINDS[str(f.type)][1] for f in _DECLARED}
#: A JobSpec's defaults, for the signatures that repeat them (``Worker.schedule``).
JOB_DEFAULTS = JobSpec(app="", name="", handler="", schedule_type=ScheduleType.API)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # per model class, for to_wire (dataclasses.fields is slow)


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def to_wire(record: Any) -> dict[str, Any]:
    """A model dataclass as a msgpack-friendly map (enums as their values)."""
    out = {}
    for name in _field_names(type(record)):
        value = getattr(record, name)
        out[name] = value.value if isinstance(value, enum.Enum) else value
    return out


def spec_to_wire(spec: JobSpec) -> dict[str, Any]:
    """A job declaration as the wire's ``job_def`` map; ``allow_overlap`` is for version-1 servers,
    which know only that boolean."""
    out = to_wire(spec)
    del out["app"]
    out["allow_overlap"] = spec.overlap == Overlap.ALLOW.value
    return out
