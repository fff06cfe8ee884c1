"""The embeddable worker: registers handlers, declares jobs, runs what its server dispatches.

:class:`Worker` is the public face and composes three parts, each usable and readable alone:

* :class:`~fastjob.worker_link.ServerLink` - the sessions with the servers: REDIRECT to the app's
  owner, HELLO, job declaration, heartbeats, reconnect backoff, and the run lease's clock;
* :class:`~fastjob.worker_runs.InstanceRunner` - the dispatched instances: at most
  ``max_concurrency`` at once, one copy of each, results kept until sent (and replayed on a
  repeated DISPATCH), log lines shipped, runs stopped when the run lease lapses;
* :class:`~fastjob.second_level_runner.SecondLevelRunner` - the handed-down second-level jobs.

The worker routes each incoming frame to its part and owns the lifecycle (start, stop, run).
The deprecated operator queries come from :class:`~fastjob.worker_queries.OperatorQueries`.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import os
import pickle
import socket
import ssl as ssl_module
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import commands, jobdef
from .context import Handler
from .fanout import WORKFLOW_HANDLER, normalize_steps, run_workflow
from .isolation import ISOLATIONS
from .models import JOB_DEFAULTS, JobSpec, spec_to_wire
from .protocol import DEFAULT_MAX_FRAME, Connection, Message, encode, parse_address
from .second_level_runner import SecondLevelRunner
from .tasks import BackgroundTasks
from .worker_link import LinkHooks, ServerLink, SessionOutcome, WorkerError
from .worker_queries import OperatorQueries
from .worker_runs import InstanceRunner
from .worker_tasks import MapClient, TaskRunner

__all__ = ["Worker", "WorkerError"]

log = logging.getLogger("fastjob.worker")
_DEFAULT = JOB_DEFAULTS  # schedule()'s defaults are the model's


class Worker(OperatorQueries):
    """A FastJob worker process's client. See the README for a complete example.

    ``role="client"`` and the query methods (get/list jobs, instances and logs, delete, enable)
    are deprecated: they move to the HTTP admin API's typed client (protocol.md, section 6.5).

    ``isolation`` is where handlers run unless they say otherwise (see :meth:`handler`): "thread"
    (the default) or "process".

    ``allow_commands`` (program names on PATH or absolute paths) and ``allow_images`` (fnmatch
    patterns) enable the built-in handlers ``fastjob:command`` and ``fastjob:container``, which run
    only what they list; ``container_runtime`` is the container CLI (default: podman, else docker)."""

    def __init__(
        self,
        app: str,
        servers: Sequence[str],
        token: str | None = None,
        max_concurrency: int = 32,
        tags: Iterable[str] = (),
        *,
        worker_id: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        connect_timeout: float = 5.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        role: str = "worker",
        isolation: str = "thread",
        metrics_port: int | None = None,
        allow_commands: Iterable[str] | None = None,
        allow_images: Iterable[str] | None = None,
        container_runtime: str | None = None,
    ) -> None:
        if not servers:
            raise ValueError("give at least one server address host:port")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
        for address in servers:
            parse_address(address)
        self.app = app
        self.servers = list(servers)
        self.token = token
        self.max_concurrency = max_concurrency
        self.tags = list(tags)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.max_frame = max_frame
        self.role = role
        self.handlers: dict[str, Handler] = {}
        self.isolation = isolation  # the default of handlers registered from now on
        self.metrics_port = metrics_port  # serve /metrics there (0: a free port; None: not at all)
        self._metrics_server: Any = None
        self.handler_isolation: dict[str, str] = {}  # name -> "thread" or "process", as registered
        self.declared: dict[str, JobSpec] = {}
        # the built-in command and container handlers, only with an allow-list (commands.py); async,
        # so they run on the loop whatever the isolation, and a kill stops them
        for builtin, fn in commands.builtin_handlers(allow_commands, allow_images, container_runtime).items():
            self.handlers[builtin] = fn
            self.handler_isolation[builtin] = "thread"
        self.handlers[WORKFLOW_HANDLER] = run_workflow  # every worker can coordinate a workflow (async: on the loop)
        self._main_task: asyncio.Task[None] | None = None
        self._side_tasks = BackgroundTasks()
        self.second_level = SecondLevelRunner(self)
        # The link reads this worker's settings (LinkConfig) at each use, so they have one home;
        # everything else it needs of the worker comes through these callbacks.
        self._link = ServerLink(self, LinkHooks(
            # through the attribute at each frame, not bound now: tests wrap _on_message to watch frames
            on_message=lambda conn, msg: self._on_message(conn, msg),
            hello_state=self._hello_state,
            load=lambda: len(self._runs.running),
            registered=self._registered,
            lost=self.second_level.disconnected,
        ))
        self._runs = InstanceRunner(self._link, self.handlers, capacity=lambda: self.max_concurrency,
                                    abandoned=self._abandoned, isolation=self.handler_isolation)
        self._maps = MapClient(self._link)
        self._runs.subtasks = self._maps
        self._runs.parked = lambda: self._maps.parked_runs
        self._tasks = TaskRunner(self._link, self.handlers, self._runs.run_handler, lambda: self.max_concurrency,
                                 self._maps, self.handler_isolation)
        self._runs.lease_lapsed = self._tasks.interrupt

    # ---- declaration ---------------------------------------------------------------------
    def handler(self, name: str | None = None, *, isolation: str | None = None) -> Callable[[Handler], Handler]:
        """Register a handler (async def, or plain def run in a thread pool) under ``name``.

        ``isolation="process"`` (None: the worker's default) runs it in a child process instead, which
        is terminated when its run times out or is interrupted, where a thread would run on. Such a
        handler must be a module-level function (it is pickled by reference; fastjob/isolation.py)."""

        def register(fn: Handler) -> Handler:
            key = name or fn.__name__
            where = self.isolation if isolation is None else isolation
            if where not in ISOLATIONS:
                raise ValueError(f"handler {key!r}: isolation must be one of {', '.join(ISOLATIONS)}, got {where!r}")
            self.handlers[key] = fn
            self.handler_isolation[key] = where
            return fn

        return register

    def schedule(
        self,
        name: str,
        *,
        handler: str | None = None,
        interval: float | None = None,
        delay: float | None = None,
        cron: str | None = None,
        at: dt.datetime | float | str | None = None,
        run_once: bool = _DEFAULT.run_once,
        retries: int = _DEFAULT.retry_times,
        retry_backoff: float = _DEFAULT.retry_backoff,
        timeout: float | None = _DEFAULT.timeout,
        params: Any = _DEFAULT.params,
        timezone: str = _DEFAULT.timezone,
        misfire: str = _DEFAULT.misfire_policy,
        catch_up_window: float = _DEFAULT.catch_up_window,
        tags: Iterable[str] = (),
        routing: str = _DEFAULT.routing,
        overlap: str | None = None,
        max_queued: int = _DEFAULT.max_queued,
        enabled: bool = _DEFAULT.enabled,
        alarm: dict[str, Any] | None = None,
        mode: str = _DEFAULT.mode,
        min_success: float = _DEFAULT.min_success,
        allow_overlap: bool | None = None,
    ) -> JobSpec:
        """Declare a job in code; it is created or updated on the server at registration.

        Exactly one of interval (fixed rate, seconds), delay (fixed delay), cron, at (one
        shot) may be given; none means API-triggered, or one run at once with run_once.
        ``overlap`` (queue, buffer_one, skip, allow; default queue) says what a fire does when
        the previous one still runs; ``misfire`` (fire_once, fire_all, skip) what happens to
        fires missed while no server ran the app. ``allow_overlap`` is the old boolean
        (True: allow, False: queue). ``alarm`` says which of the job's events alarm the server's
        webhooks (models.ALARM_SETTINGS). ``mode="broadcast"`` runs each fire on every connected
        worker of the app (with the job's tags); the fire succeeds when at least ``min_success``
        (a fraction) of those runs do. Raises ValueError at once for an unknown handler or a
        bad schedule.
        """
        handler = handler or name
        if handler not in self.handlers:
            raise ValueError(f"job {name!r}: unknown handler {handler!r}; register it with @worker.handler first")
        spec = jobdef.build_spec(
            self.app, name, handler=handler, interval=interval, delay=delay, cron=cron, at=at, run_once=run_once,
            retries=retries, retry_backoff=retry_backoff, timeout=timeout, params=params, timezone=timezone,
            misfire=misfire, catch_up_window=catch_up_window, tags=tags, routing=routing, overlap=overlap,
            max_queued=max_queued, enabled=enabled, alarm=alarm, mode=mode, min_success=min_success,
            allow_overlap=allow_overlap)
        self._check_sendable(spec)
        self._check_picklable(spec)
        self.declared[name] = spec
        return spec

    def workflow(self, name: str, steps: Mapping[str, Any], **schedule: Any) -> JobSpec:
        """Declare a workflow: a job whose fire runs ``steps``, a graph of handlers or jobs, each step
        once all its upstream steps succeeded (fastjob/fanout.py).

        ``steps`` maps each step's name to its upstream steps (``{"load": ["transform"]}``; the name
        then names a handler, or a job declared before), or to its settings: ``after``, ``handler``
        or ``job``, ``retries``, ``timeout``, ``on_failure`` ("fail", the default, or "skip"),
        ``params``. A step that names a job runs that job's handler with its params; the job's own
        schedule is not touched. ``schedule`` takes :meth:`schedule`'s keywords (cron, timeout,
        overlap, retries...: the workflow's own). Raises ValueError for a cycle or an unknown step."""
        if "handler" in schedule or "params" in schedule:
            raise ValueError(f"workflow {name!r}: its handler and params are its steps")
        normalized = normalize_steps(steps, handlers=self.handlers, jobs=self.declared)
        return self.schedule(name, handler=WORKFLOW_HANDLER, params={"steps": normalized}, **schedule)

    def _check_sendable(self, spec: JobSpec) -> None:
        """A declaration the server could never take is refused here, naming the job: params msgpack
        cannot carry, or a declaration larger than a frame."""
        try:
            size = len(encode("JOB_UPSERT", {"job": spec_to_wire(spec)}))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"job {spec.name!r}: params cannot be sent to the server: {exc}") from None
        if size > self.max_frame:
            raise ValueError(f"job {spec.name!r}: its declaration is {size} bytes encoded, more than the"
                             f" {self.max_frame}-byte frame limit (params too large?)")

    def _check_picklable(self, spec: JobSpec) -> None:
        """A process-isolated handler gets its params pickled into a child process: params that cannot
        be pickled would fail every run, so they are refused here, naming the job."""
        if self.handler_isolation.get(spec.handler) != "process":
            return
        try:
            pickle.dumps(spec.params, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ValueError(f"job {spec.name!r}: its handler {spec.handler!r} runs in a child process"
                             f" (isolation='process') and its params cannot be pickled to get there:"
                             f" {type(exc).__name__}: {exc}") from None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self, timeout: float | None = 30.0) -> None:
        """Connect (following redirects) and register; returns once registered.

        Raises WorkerError if the server rejects the worker or refuses a declared job,
        asyncio.TimeoutError if no server could be reached within ``timeout``.
        """
        if self._main_task is not None:
            raise RuntimeError("worker already started")
        if self.metrics_port is not None and self._metrics_server is None:
            self._serve_metrics(self.metrics_port)  # first: a port in use fails start() before anything runs
        self._link.begin()
        self._runs.open(max(1, self.max_concurrency), f"fastjob-{self.app}")
        self._main_task = asyncio.create_task(self._link.run(self._session), name=f"fastjob-worker-{self.app}")
        self._side_tasks.spawn(self._runs.flush_logs_loop(), "fastjob-log-flush")
        self._side_tasks.spawn(self._runs.watch_run_lease(), "fastjob-run-lease")
        try:
            await asyncio.wait_for(self._wait_ready(), timeout)
        except asyncio.TimeoutError:
            await self.stop(grace=0)
            raise asyncio.TimeoutError(
                f"worker {self.worker_id}: not registered with any of {', '.join(self.servers)} within {timeout}s"
                f" (last failure: {self._link.last_failure or 'none: connected, registration unfinished'})") from None
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _wait_ready(self) -> None:
        while True:
            if self._link.fatal is not None:
                raise self._link.fatal
            if self._link.ready.is_set():
                return
            assert self._main_task is not None
            waiter = asyncio.create_task(self._link.ready.wait())
            await asyncio.wait({waiter, self._main_task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self._main_task.done() and self._link.fatal is None:
                raise WorkerError("worker stopped before it registered")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking jobs, let running ones finish for ``grace`` seconds, interrupt the rest.

        The server is told first (DRAIN), so it sends nothing more and hands this worker's
        second-level jobs to another; an instance interrupted here is run again by the server
        (status ``interrupted``, not a failure of the handler)."""
        self._link.stopping = True
        self.second_level.stop_all("worker stopping")
        await self.second_level.wait_stopped(2.0)
        if self.connected and self.version >= 2:
            self._link.send("DRAIN", {"reason": "worker stopping"})
        self._runs.refuse_leads("worker stopping")  # their server sends them elsewhere, still on time
        await asyncio.gather(self._runs.wind_down(grace), self._tasks.wind_down(grace))
        self._runs.flush_logs()
        self._link.close()
        if self._main_task is not None:
            self._main_task.cancel()
            await asyncio.gather(self._main_task, return_exceptions=True)
            self._main_task = None
        await self._side_tasks.close()
        self._runs.close()
        self._link.ready.clear()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def _serve_metrics(self, port: int) -> None:
        from .worker_metrics import WorkerCollector, serve_metrics

        collector = WorkerCollector(self.app, self._runs.outcomes, lambda: len(self._runs.running),
                                    lambda: len(self.second_level.job_ids()))
        self._metrics_server, self.metrics_port = serve_metrics(collector, port)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def run(self, grace: float = 10.0) -> None:
        """Run until interrupted (SIGINT/SIGTERM), on uvloop when installed. A refusal no retry can mend
        (a wrong token, a job the server refuses) ends the process with a one-line message and status 1.
        On a signal, running instances get ``grace`` seconds (see :meth:`stop`); a plain ``def``
        handler still running then is abandoned, and the process does not wait for it."""
        async def main() -> None:
            import signal

            await self.start(timeout=None)
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, done.set)
            assert self._main_task is not None
            waiter = asyncio.create_task(done.wait())
            await asyncio.wait({waiter, self._main_task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            await self.stop(grace)
            if self._link.fatal is not None:
                raise self._link.fatal

        try:
            import uvloop
        except ImportError:
            run: Callable[[Any], None] = asyncio.run
        else:
            run = uvloop.run
        try:
            run(main())
        except WorkerError as exc:  # a refusal no retry can mend: say why on one line, exit non-zero
            raise SystemExit(f"fastjob worker {self.worker_id} of app {self.app!r}: {exc}") from None

    def _abandoned(self) -> bool:
        """The main task was cancelled: the loop is going away, and a cancelled run must not report."""
        return self._main_task is not None and self._main_task.cancelled()

    # ---- the link, as the worker shows it --------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def server_id(self) -> str | None:
        """The server this worker is (or was last) registered with."""
        return self._link.server_id

    @property
    def version(self) -> int:
        """The protocol version negotiated at WELCOME."""
        return self._link.version

    @property
    def heartbeat_interval(self) -> float:
        return self._link.heartbeat_interval

    @property
    def heartbeat_timeout(self) -> float:
        return self._link.heartbeat_timeout

    @property
    def run_lease(self) -> float:
        """With no owning server heard for this long, running instances are stopped (WELCOME run_lease)."""
        return self._link.run_lease

    def server_alive_at(self) -> float:
        """loop.time() at which our server was last known alive: when we sent the last PING
        (or HELLO) it answered. Second-level jobs' lease runs from it."""
        return self._link.alive_at

    def send_frame(self, kind: str, body: dict[str, Any]) -> bool:
        """Send one message to the server; False when there is no connection or it was refused."""
        return self._link.send(kind, body)

    async def run_handler(
        self, fn: Handler, ctx: Any, timeout: float | None, cancel_reason: Callable[[], str],
        check_result: bool = True,
    ) -> tuple[str, Any, str | None]:
        """Run one handler call: (status, result, error). Only this call fails if it misbehaves.

        ``check_result`` verifies that the result can be shipped; second-level runs ship none.
        """
        return await self._runs.run_handler(fn, ctx, timeout, cancel_reason, check_result)

    # Inner state as tests read it: the session's connection, the replayable results, and the
    # run lease's clock. The seams tests wrap (_session, _on_message, _on_dispatch) are below.
    @property
    def _conn(self) -> Connection | None:
        return self._link.conn

    @property
    def _sent_results(self) -> OrderedDict[int, dict[str, Any]]:
        return self._runs.sent_results

    @property
    def _server_alive_at(self) -> float:
        return self._link.alive_at

    # ---- between the parts -----------------------------------------------------------------
    async def _session(self, address: str, patience: float) -> SessionOutcome:
        """One connection (ServerLink.session). The link's loop makes each through this method,
        so that how each session ended can be observed (tests wrap it)."""
        return await self._link.session(address, patience)

    def _hello_state(self) -> dict[str, Any]:
        return {**self._runs.hello_state(), "second_level": self.second_level.job_ids(),
                "handlers": self.handler_kinds(), "tasks": self._tasks.hello_state()}

    def handler_kinds(self) -> dict[str, str]:
        """How each handler runs: "async" or "process" (an operator's kill stops it) or "thread" (it cannot)."""
        return {name: "process" if self.handler_isolation.get(name) == "process"
                else "async" if inspect.iscoroutinefunction(fn) else "thread" for name, fn in self.handlers.items()}

    def _registered(self, conn: Connection) -> None:
        """A session is registered: results kept while disconnected go out, and sub-task answers; a
        parent's unanswered batches are sent again (the server dedupes them); second-level jobs resume."""
        self._runs.resend_results(conn)
        self._tasks.resend()
        self._maps.resubmit()
        self.second_level.connected()

    def _on_message(self, conn: Connection, msg: Message) -> None:
        """Route one frame from the server to the part that handles it."""
        kind = msg.type
        if kind == "DISPATCH":
            self._on_dispatch(conn, msg.body)
        elif kind == "RUN_TASKS":
            self._tasks.on_run(conn, msg.body)
        elif kind == "TASK_RESULTS":
            self._maps.on_results(msg.body)
        elif kind == "TASKS_STOP":
            self._tasks.stop(msg.body["key"], msg.body.get("reason") or "cancelled")
        elif kind == "CANCEL":
            self._runs.cancel(msg.body["instance_id"], msg.body.get("reason") or "cancelled")
        elif kind == "PING":
            conn.send("PONG", {"ts": msg.body.get("ts", 0.0)})
        elif kind == "SL_ASSIGN":
            self.second_level.assign(msg.body["job"], float(msg.body["lease"]))
        elif kind == "SL_REVOKE":
            self.second_level.revoke(msg.body["job_id"], msg.body.get("reason") or "revoked")
        elif kind == "PONG":
            if self._link.on_pong(msg.body) and self._runs.deferred:
                self._runs.start_deferred()
        elif kind == "ERROR":
            log.warning("worker %s: server error %s: %s", self.worker_id, msg.body.get("code"), msg.body.get("message"))
        else:
            log.debug("worker %s: ignoring %s", self.worker_id, kind)

    def _on_dispatch(self, conn: Connection, body: dict[str, Any]) -> None:
        """A DISPATCH, for the runner; a method of the worker so that tests can stand in for it."""
        self._runs.on_dispatch(conn, body)

    # ---- API ---------------------------------------------------------------------------------
    async def call(self, kind: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One API request to the app's owner; waits (bounded) for a connection."""
        return await self._link.call(kind, body, timeout)

    async def trigger(self, name: str, params: Any = None) -> int:
        """Fire job ``name`` now with ``params``; returns the instance id."""
        reply = await self.call("TRIGGER", {"name": name, "params": params})
        return int(reply["instance_id"])
