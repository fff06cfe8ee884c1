"""One TCP connection from a worker (or an API client) to this server.

Before the handshake only HELLO is accepted; a connection that sends none within the
handshake timeout is closed. After WELCOME the session is bound to one app: it receives
DISPATCH frames (workers only), reports on them, and may make API calls for its app.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from ..models import JobSpec
from ..protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    SINCE_VERSION,
    Connection,
    ErrorCode,
    Message,
    negotiate_version,
)
from ..schedule import ScheduleError
from ..store import NotOwnerError, StoreError
from ..tasks import BackgroundTasks
from .api import API_TYPES, ApiBackend, ApiError, declared_specs, handle_api
from .audit import AuditLog
from .auth import OPEN_ACCESS, Permission, Principal, TokenAuthority, definition_refusal
from .cluster import Cluster
from .config import ServerConfig

log = logging.getLogger("fastjob.session")

REPORT_TYPES = frozenset({"ACK", "HELD", "START", "LOG", "RESULT", "SL_REPORT", "TASKS", "TASKS_DONE", "PARK",
                          "TASKS_ABANDON"})
#: What each mutating wire call needs of the session's token (the rest only read).
WIRE_PERMISSIONS = {
    "JOB_UPSERT": Permission.MANAGE,
    "JOB_DELETE": Permission.MANAGE,
    "JOB_ENABLE": Permission.OPERATE,
    "TRIGGER": Permission.TRIGGER,
    "JOB_DECLARE": Permission.DECLARE,
}
#: Their names in the audit log (the HTTP routes' names for the same acts).
WIRE_ACTIONS = {"JOB_UPSERT": "job.put", "JOB_DELETE": "job.delete", "JOB_ENABLE": "job.enable",
                "TRIGGER": "job.trigger", "JOB_DECLARE": "job.declare"}
# API requests one connection may have in progress; more are answered `busy` at once, so one
# client flooding requests cannot pile up unbounded work (the worker pipelines 256 at a time).
MAX_API_INFLIGHT = 1024


class SessionHost(ApiBackend, Protocol):
    """What a session needs of its server, and nothing more."""

    @property
    def config(self) -> ServerConfig: ...
    @property
    def cluster(self) -> Cluster: ...
    @property
    def tasks(self) -> BackgroundTasks: ...
    @property
    def connections(self) -> set[WorkerSession]: ...
    @property
    def auth(self) -> TokenAuthority: ...
    @property
    def audit(self) -> AuditLog: ...
    async def register_worker(self, app: str, hello: dict[str, Any]) -> None: ...
    async def declare_jobs(self, app: str, specs: list[JobSpec]) -> int: ...
    def session_joined(self, session: WorkerSession, running: list[int], finished: list[int],
                       second_level: list[int]) -> None: ...
    def session_left(self, session: WorkerSession) -> None: ...
    def session_draining(self, session: WorkerSession) -> None: ...
    def on_report(self, session: WorkerSession, kind: str, body: dict[str, Any]) -> None: ...
    async def broadcast(self, session: WorkerSession, body: dict[str, Any]) -> dict[str, Any]: ...


class WorkerSession(Connection):
    """Server side of one connection."""

    def __init__(self, server: SessionHost) -> None:
        super().__init__(max_frame=server.config.max_frame)
        self.server = server
        self.app: str = ""
        self.worker_id: str = ""
        self.role = "worker"
        self.version = PROTOCOL_VERSION  # negotiated at WELCOME
        self.draining = False  # the worker is stopping (DRAIN): it takes nothing new
        self.tags: frozenset[str] = frozenset()
        self.capacity = 0
        #: how each of its handlers runs (HELLO, version 4): "async", "process" or "thread"
        self.handler_kinds: dict[str, str] = {}
        self.connected_at = 0.0  # wall clock, at WELCOME
        self.principal: Principal = OPEN_ACCESS
        self._running: set[int] = set()  # instance ids dispatched to it and not finished
        self._leading: set[int] = set()  # lead fires sent to it and not started (no slot taken yet)
        self._api_inflight = 0  # API requests being answered
        self.hello_running: list[int] = []  # what its HELLO named, for an owner still loading the app
        self.hello_finished: list[int] = []
        self.hello_leading: list[int] = []  # lead fires it holds unstarted, each awaiting our word (version 5)
        self.hello_tasks: frozenset[str] = frozenset()  # sub-task batches its HELLO says it runs (version 6)
        self.tasks: set[str] = set()  # sub-task batches sent to it and not answered (each takes a slot)
        self._parked_runs: set[str] = set()  # its parents (fires) waiting for their sub-tasks: no slot taken
        self._parked_tasks: set[str] = set()  # its sub-tasks waiting for their own (nested) sub-tasks
        self._second_level: set[int] = set()  # second-level job ids handed down to it
        self._declaring: set[str] = set()  # names its JOB_DECLARE batches carried so far
        #: a worker sends a few batches at once; a store that runs writes in turn takes them in turn
        self._declare_turn = asyncio.Lock()
        #: the complete set of jobs its code declares (its final batch arrived); None until then
        self.declared: frozenset[str] | None = None
        self.established = False
        self._hello_task: asyncio.Task[None] | None = None

    # ---- capabilities used by routing ---------------------------------------------------
    @property
    def accepts_jobs(self) -> bool:
        return self.established and self.role == "worker" and not self.closed and not self.draining

    @property
    def takes_lead_fires(self) -> bool:
        """Version 5: it holds a fire sent early and starts it at its planned time (lead dispatch)."""
        return self.version >= 5

    def has_room(self) -> bool:
        return self.capacity <= 0 or len(self._running) - len(self._parked_runs) < self.capacity

    def task_room(self) -> bool:
        """Room for one more sub-task batch: batches have slots of their own, as many as instances."""
        return self.capacity <= 0 or len(self.tasks) - len(self._parked_tasks) < self.capacity

    def task_load(self) -> float:
        """Its batches for its capacity (least_busy routing of sub-tasks)."""
        busy = len(self.tasks) - len(self._parked_tasks)
        return busy / self.capacity if self.capacity > 0 else float(busy)

    def park(self, parent: str) -> None:
        """A parent on it waits for its sub-tasks: its slot is free meanwhile (PARK)."""
        (self._parked_tasks if "|" in parent else self._parked_runs).add(parent)

    def unpark(self, parent: str) -> None:
        self._parked_tasks.discard(parent)
        self._parked_runs.discard(parent)

    def has_tags(self, tags: list[str]) -> bool:
        return not tags or self.tags.issuperset(tags)

    def load(self) -> float:
        return len(self._running) / self.capacity if self.capacity > 0 else float(len(self._running))

    # ---- what it runs (the scheduler and the second-level tracker keep these) -----------------
    def runs(self, instance_id: int, lead: bool = False) -> None:
        """An instance was dispatched to it: it counts against its capacity until it ends; a lead
        fire only from its start."""
        (self._leading if lead else self._running).add(instance_id)

    def started(self, instance_id: int) -> None:
        """A lead fire started: from now on it takes a slot."""
        if instance_id in self._leading:
            self._leading.discard(instance_id)
            self._running.add(instance_id)

    def ended(self, instance_id: int) -> None:
        self._running.discard(instance_id)
        self._leading.discard(instance_id)

    @property
    def run_count(self) -> int:
        return len(self._running)

    def forget_runs(self) -> list[int]:
        """Every instance it was running, now no longer counted (it left)."""
        ids = [*self._running, *self._leading]
        self._running.clear()
        self._leading.clear()
        return ids

    def hand_down(self, job_id: int) -> None:
        """A second-level job now runs on it."""
        self._second_level.add(job_id)

    def take_back(self, job_id: int) -> None:
        self._second_level.discard(job_id)

    @property
    def second_level_count(self) -> int:
        return len(self._second_level)

    def second_level_jobs(self) -> list[int]:
        return sorted(self._second_level)

    def supersede(self) -> None:
        """A newer session of the same worker replaced this one: forget it now, close it."""
        if self.established:
            self.established = False
            self.server.session_left(self)
        self.close()

    def redirect_away(self) -> None:
        """The app moved to another server: close, and the worker's HELLO will be redirected."""
        self.fail(ErrorCode.NOT_OWNER, f"this server no longer owns app {self.app!r}; reconnect")

    # ---- connection hooks ----------------------------------------------------------------
    def on_connect(self) -> None:
        self.server.connections.add(self)
        self.watch_idle(self.server.config.handshake_timeout, ErrorCode.HANDSHAKE_TIMEOUT)  # until WELCOME

    def on_close(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.established:
            self.established = False
            self.server.session_left(self)

    def on_message(self, msg: Message) -> None:
        if not self.established:
            if msg.type != "HELLO" or msg.rid == 0 or self._hello_task is not None:
                self.fail(ErrorCode.BAD_MESSAGE, f"expected HELLO as a request to open the session, got {msg.type}"
                          + (" with rid 0" if msg.type == "HELLO" and msg.rid == 0 else ""))
                return
            self._hello_task = asyncio.create_task(self._hello(msg), name="fastjob-hello")
            return
        kind = msg.type
        if SINCE_VERSION.get(kind, 1) > self.version:
            self.fail(ErrorCode.UNKNOWN_TYPE, f"{kind} is not defined in protocol version {self.version}")
        elif kind == "PING":
            # a worker's run lease is renewed only by a server that may still send its app's fires
            # now: the worker measures its clock's offset from ours by it (lead fires start on our clock)
            self.send("PONG", {"ts": msg.body.get("ts", 0.0), "lease": self.server.cluster.lease_valid(),
                               "now": time.time()})
        elif kind == "PONG":
            pass
        elif kind == "DRAIN":
            if self.role == "worker" and not self.draining:
                log.info("worker %s of app %s is stopping: %s", self.worker_id, self.app,
                         msg.body.get("reason") or "drain")
                self.draining = True
                self.server.session_draining(self)
        elif kind == "ERROR":  # a worker's complaint not tied to a request: log it, keep the session
            log.warning("worker %s of app %s reports error %s: %s", self.worker_id, self.app,
                        msg.body.get("code"), msg.body.get("message"))
        elif kind in REPORT_TYPES:
            self._report(msg)
        elif kind == "BROADCAST":
            self.server.tasks.spawn(self._broadcast(msg), "fastjob-broadcast")
        elif kind in API_TYPES or kind == "JOB_DECLARE":
            if self._api_inflight >= MAX_API_INFLIGHT:
                self.respond_error(msg, ErrorCode.BUSY,
                                   f"{MAX_API_INFLIGHT} requests already in progress on this connection; retry later")
                return
            self._api_inflight += 1
            self.server.tasks.spawn(self._api(msg), f"fastjob-api-{kind}")
        else:  # a second HELLO, or a server-to-client type: not allowed in this state
            self.fail(ErrorCode.BAD_MESSAGE, f"{kind} is not allowed on an established session")

    # ---- handshake -----------------------------------------------------------------------
    async def _hello(self, msg: Message) -> None:
        body = msg.body
        try:
            version = negotiate_version(body["version"])
            if version is None:
                self._reject(msg, ErrorCode.UNSUPPORTED_VERSION,
                             f"this server speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")
                return
            app = body["app"]
            if not app or len(app) > 128:
                self._reject(msg, ErrorCode.INVALID, "app must be a non-empty name of at most 128 characters")
                return
            if not body["worker_id"] or len(body["worker_id"]) > 128:
                self._reject(msg, ErrorCode.INVALID, "worker_id must be a non-empty string of at most 128 characters")
                return
            role = body.get("role")
            role = "worker" if role is None else role  # nil means absent (protocol.md section 4)
            if role not in ("worker", "client"):
                self._reject(msg, ErrorCode.INVALID, f"role must be 'worker' or 'client', got {body.get('role')!r}")
                return
            await self.server.store.ensure_app(app)
            principal = await self._authenticate(app, role, body.get("token"))
            if principal is None:
                self._reject(msg, ErrorCode.BAD_TOKEN, f"wrong or missing token for app {app!r}")
                return
            route = await self.server.cluster.route(app)
            if route.own and role == "worker":
                # before WELCOME, so before any DISPATCH: a successor after a crash knows every
                # worker that may hold fires it cannot see, and waits for exactly those
                await self.server.register_worker(app, body)
        except StoreError as exc:
            log.warning("HELLO from %s: database unavailable: %s", self.peername, exc)
            self._reject(msg, ErrorCode.UNAVAILABLE, "the server's database is unavailable; retry later")
            return
        if self.closed:
            return
        if not route.own:
            log.info("worker %s of app %s redirected to %s%s", body["worker_id"], app, route.address,
                     "" if route.retry_in is None else f" (late; lease out in {route.retry_in:.2f}s)")
            reply: dict[str, Any] = {"address": route.address}
            if route.retry_in is not None:
                reply["retry_in"] = route.retry_in
            self.respond(msg, reply, type="REDIRECT")
            self._close_soon()
            return
        self.app = app
        self.worker_id = body["worker_id"]
        self.role = role
        self.principal = principal
        self.version = version
        self.tags = frozenset(body.get("tags") or ())
        self.capacity = int(body.get("capacity") or 0)
        kinds = body.get("handlers") or {}
        self.handler_kinds = {str(name)[:255]: str(kind)[:16] for name, kind in list(kinds.items())[:10_000]}
        self.connected_at = time.time()
        self.established = True
        cfg = self.server.config
        self.watch_idle(cfg.heartbeat_timeout)  # a worker that sends nothing for this long is dead or frozen
        self.respond(msg, {
            "version": self.version,
            "server_id": self.server.cluster.server_id,
            "heartbeat_interval": cfg.heartbeat_interval,
            "heartbeat_timeout": cfg.heartbeat_timeout,
            "max_frame": cfg.max_frame,
            "run_lease": cfg.effective_run_lease,
        }, type="WELCOME")
        log.info("%s %s of app %s connected from %s", self.role, self.worker_id, app, self.peername,
                 extra={"app": app, "worker": self.worker_id})
        self.hello_running = list(body.get("running") or ())
        self.hello_finished = list(body.get("finished") or ())
        self.hello_tasks = frozenset(str(key) for key in (body.get("tasks") or ())[:100_000])
        self.hello_leading = list(body.get("leading") or ())
        self.server.session_joined(self, self.hello_running, self.hello_finished, list(body.get("second_level") or ()))

    async def _authenticate(self, app: str, role: str, token: str | None) -> Principal | None:
        """Who the peer is: its token's principal, or open access where no token is required
        (a loopback server, an app with no worker token of its own); None: refuse it."""
        auth = self.server.auth
        client = str(self.peername[0]) if isinstance(self.peername, tuple) else str(self.peername)
        if auth.throttled(client):  # too many wrong tokens from this address lately (as over HTTP)
            return None
        if token:
            principal = await auth.verify(token, app)
            needed = Permission.DECLARE if role == "worker" else Permission.READ
            if principal is not None and principal.may(needed, app):
                return principal
            auth.failed(client)
            return None
        if self.server.config.tokens_required or await auth.app_requires_token(app):
            return None
        return OPEN_ACCESS

    def _reject(self, msg: Message, code: str, reason: str) -> None:
        log.warning("HELLO from %s rejected: %s (%s)", self.peername, code, reason)
        self.respond(msg, {"code": code, "reason": reason}, type="REJECT")
        self._close_soon()

    def _close_soon(self) -> None:
        # let the reply frame leave before closing (close() flushes what is buffered)
        asyncio.get_running_loop().call_soon(self.close)

    # ---- reports and API -----------------------------------------------------------------
    def _report(self, msg: Message) -> None:
        self.server.on_report(self, msg.type, msg.body)

    async def _broadcast(self, msg: Message) -> None:
        """BROADCAST (a request): the sub-runs are written before the answer says how many there are."""
        if self.role != "worker":
            self.respond_error(msg, ErrorCode.FORBIDDEN, "only a worker's running handler may broadcast")
            return
        try:
            self.respond(msg, await self.server.broadcast(self, msg.body))
        except ValueError as exc:  # subtasks.TaskRefused: no worker qualifies, a bad parent key
            self.respond_error(msg, ErrorCode.INVALID, str(exc))
        except StoreError as exc:
            self.respond_error(msg, ErrorCode.UNAVAILABLE, f"the server's database is unavailable: {exc}")

    async def _api(self, msg: Message) -> None:
        try:
            await self._answer_api(msg)
        finally:
            self._api_inflight -= 1

    async def _declare(self, body: dict[str, Any]) -> dict[str, Any]:
        """A batch of the worker's job declarations; the one marked final completes its set."""
        if self.role != "worker":
            raise ApiError(ErrorCode.INVALID, "JOB_DECLARE is a worker's; a client writes jobs with JOB_UPSERT")
        async with self._declare_turn if not self.server.store.concurrent_writes else contextlib.nullcontext():
            if not self.server.owns(self.app):
                raise NotOwnerError(self.app, -1)
            specs = declared_specs(self.app, body["jobs"])
            self._declaring.update(spec.name for spec in specs)  # before the write: the final batch may overtake it
            changed = await self.server.declare_jobs(self.app, specs)
        if body["final"]:
            self.declared = frozenset(self._declaring)
            self._declaring = set()
        return {"declared": len(specs), "changed": changed}

    async def _answer_api(self, msg: Message) -> None:
        permission = WIRE_PERMISSIONS.get(msg.type, Permission.READ)
        if not self.principal.may(permission, self.app):
            self.respond_error(msg, ErrorCode.FORBIDDEN,
                               f"a {self.principal.role} token may not make {msg.type} calls for app {self.app!r}")
            return
        outcome = "ok"
        try:
            if msg.type == "JOB_DECLARE":
                reply = await self._declare(msg.body)
            else:
                if msg.type == "JOB_UPSERT":
                    self._check_definer(msg.body)
                reply = await handle_api(self.server, self.app, msg.type, msg.body)
        except ApiError as exc:
            outcome = exc.code
            self.respond_error(msg, exc.code, exc.message)
        except ScheduleError as exc:
            outcome = ErrorCode.INVALID
            self.respond_error(msg, ErrorCode.INVALID, str(exc))
        except NotOwnerError:
            outcome = ErrorCode.NOT_OWNER
            self.respond_error(msg, ErrorCode.NOT_OWNER, f"this server no longer owns app {self.app!r}; reconnect")
        except StoreError as exc:
            outcome = ErrorCode.UNAVAILABLE
            self.respond_error(msg, ErrorCode.UNAVAILABLE, f"database unavailable: {exc}")
        except Exception as exc:  # a bug must fail this call only
            outcome = ErrorCode.INTERNAL
            log.exception("API %s for app %s failed", msg.type, self.app)
            self.respond_error(msg, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        else:
            self.respond(msg, reply)
        finally:
            if permission is not Permission.READ:
                self._audit(msg, outcome)

    def _check_definer(self, body: dict[str, Any]) -> None:
        """A command or container job is an admin's to define (auth.definition_refusal)."""
        job = body.get("job")
        handler = job.get("handler") if isinstance(job, dict) else None
        refusal = definition_refusal(self.principal, handler) if isinstance(handler, str) else None
        if refusal is not None:
            raise ApiError(ErrorCode.FORBIDDEN, refusal)

    def _audit(self, msg: Message, outcome: str) -> None:
        body = msg.body
        target: Any
        if msg.type == "JOB_DECLARE":
            target = f"{len(body.get('jobs') or ())} jobs" + (" (final)" if body.get("final") else "")
        else:
            target = body.get("name") or (body.get("job") or {}).get("name")
        actor = self.principal.name if self.principal.token_id else f"{self.role} {self.worker_id}"
        self.server.audit.record(actor, WIRE_ACTIONS.get(msg.type, msg.type), self.app, str(target or ""), outcome,
                                 via="wire")
