"""The embeddable worker: registers handlers, declares jobs, runs what its server dispatches.

A worker connects to any listed server and follows REDIRECT to the owner of its app. It
heartbeats, reconnects with exponential backoff and jitter, runs at most ``max_concurrency``
instances at once (each with its timeout), ships their log lines, and never runs two copies
of one instance: a repeated DISPATCH of an instance it already runs is acknowledged and
ignored. Results that could not be sent (the connection dropped) are kept and sent after the
next handshake, whose HELLO lists them so the server re-attaches them instead of failing them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import inspect
import itertools
import logging
import os
import random
import socket
import ssl as ssl_module
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import msgpack

from . import schedule
from .context import Handler, JobContext, JobLog
from .models import JOB_DEFAULTS, JobSpec, Overlap, ScheduleType, Status, spec_to_wire
from .protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    Connection,
    ErrorCode,
    Message,
    ProtocolError,
    RemoteError,
    parse_address,
)
from .second_level_runner import SecondLevelRunner
from .tasks import BackgroundTasks

log = logging.getLogger("fastjob.worker")
_DEFAULT = JOB_DEFAULTS  # schedule()'s defaults are the model's

FATAL_REJECTS = frozenset({"bad_token", "unsupported_version", "bad_message"})
MAX_LOG_LINES_PER_INSTANCE = 10_000
REMEMBERED_RESULTS = 10_000  # finished instances whose result is replayed on a repeated DISPATCH
# How many of those a HELLO names in `finished` (the newest), for a new owner after a failover.
FINISHED_IN_HELLO = 1000
MAX_LOG_LINE = 4096  # characters kept of one log line
LOG_LINES_PER_FRAME = 100  # so a LOG frame stays far below max_frame (100 x 4 KiB)
RESULT_HEADROOM = 4096  # bytes of a RESULT frame besides the result itself


class WorkerError(Exception):
    """The worker cannot go on: rejected by the server, or a job declaration was refused."""


class _Redirect(NamedTuple):
    """A REDIRECT: the owner's address, and when to come back if it does not answer."""

    address: str
    retry_in: float | None


class _ClientConnection(Connection):
    def __init__(self, worker: Worker) -> None:
        super().__init__(max_frame=worker.max_frame)
        self.worker = worker

    def on_message(self, msg: Message) -> None:
        self.worker._on_message(self, msg)


class Worker:
    """A FastJob worker process's client. See the README for a complete example.

    ``role="client"`` and the query methods (get/list jobs, instances and logs, delete, enable)
    are deprecated: they move to the HTTP admin API's typed client (protocol.md, section 6.5)."""

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
    ) -> None:
        if not servers:
            raise ValueError("give at least one server address host:port")
        for address in servers:
            parse_address(address)
        self.app = app
        self.servers = list(servers)
        self._server_turn = random.randrange(len(self.servers))  # see _next_server
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
        self._is_async: dict[Handler, bool] = {}  # inspect per handler once, not per run
        self.declared: dict[str, JobSpec] = {}
        self.server_id: str | None = None
        self.heartbeat_interval = 2.0
        self.heartbeat_timeout = 10.0
        self.version = PROTOCOL_VERSION  # negotiated at WELCOME
        # with no owning server heard for this long, running instances are stopped: the server
        # then runs them again elsewhere, never at the same time (WELCOME run_lease)
        self.run_lease = 10.0
        self._conn: _ClientConnection | None = None
        # The second-level lease runs from the send time of our last PING (or HELLO) that the
        # server answered, not from when we read the answer: a worker that was frozen reads old
        # buffered frames on waking, and must not take them as a sign its server is alive now.
        self._server_alive_at = float("-inf")
        self._pings: dict[float, float] = {}  # PING ts (wall clock) -> loop.time() it was sent
        self._log_lock = threading.Lock()  # ctx.log is called from handler threads too
        self._max_frame = max_frame  # lowered to the server's limit at WELCOME
        self._ready = asyncio.Event()
        self._stopping = False
        self._fatal: BaseException | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        self._cancel_reasons: dict[int, str] = {}
        self._unsent_results: dict[int, dict[str, Any]] = {}
        # a server that restarted before recording a dispatch fires the row again: answer it
        # with the result we already have instead of running the instance a second time
        self._sent_results: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._log_buffer: dict[int, list[list[Any]]] = {}
        # dispatches received while our run lease had lapsed: started once a PONG renews it
        self._deferred: list[tuple[_ClientConnection, dict[str, Any], float]] = []  # (conn, DISPATCH, since)
        self._loop_time: Callable[[], float] = lambda: asyncio.get_running_loop().time()  # bound at start()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._side_tasks = BackgroundTasks()
        self.second_level = SecondLevelRunner(self)

    # ---- declaration ---------------------------------------------------------------------
    def handler(self, name: str | None = None) -> Callable[[Handler], Handler]:
        """Register a handler (async def, or plain def run in a thread pool) under ``name``."""

        def register(fn: Handler) -> Handler:
            self.handlers[name or fn.__name__] = fn
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
        at: dt.datetime | float | None = None,
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
        allow_overlap: bool | None = None,
    ) -> JobSpec:
        """Declare a job in code; it is created or updated on the server at registration.

        Exactly one of interval (fixed rate, seconds), delay (fixed delay), cron, at (one
        shot) may be given; none means API-triggered, or one run at once with run_once.
        ``overlap`` (queue, buffer_one, skip, allow; default queue) says what a fire does when
        the previous one still runs; ``misfire`` (fire_once, fire_all, skip) what happens to
        fires missed while no server ran the app. ``allow_overlap`` is the old boolean
        (True: allow, False: queue). Raises ValueError at once for an unknown handler or a bad
        schedule.
        """
        handler = handler or name
        if handler not in self.handlers:
            raise ValueError(f"job {name!r}: unknown handler {handler!r}; register it with @worker.handler first")
        given = [k for k, v in (("interval", interval), ("delay", delay), ("cron", cron), ("at", at)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"job {name!r}: give only one of interval, delay, cron, at (got {', '.join(given)})")
        if interval is not None:
            kind, expr = ScheduleType.FIXED_RATE, repr(float(interval))
        elif delay is not None:
            kind, expr = ScheduleType.FIXED_DELAY, repr(float(delay))
        elif cron is not None:
            kind, expr = ScheduleType.CRON, cron
        elif at is not None:
            when = at.timestamp() if isinstance(at, dt.datetime) else float(at)
            kind, expr = ScheduleType.ONCE, repr(when)
        elif run_once:
            kind, expr = ScheduleType.ONCE, ""
        else:
            kind, expr = ScheduleType.API, ""
        spec = JobSpec(
            app=self.app, name=name, handler=handler, schedule_type=kind, schedule_expr=expr,
            timezone=timezone, params=params, timeout=timeout, retry_times=retries,
            retry_backoff=retry_backoff, misfire_policy=misfire, tags=list(tags), routing=routing,
            run_once=run_once, enabled=enabled, overlap=overlap or _overlap_of(allow_overlap),
            catch_up_window=catch_up_window, max_queued=max_queued,
        )
        schedule.validate(spec)
        self.declared[name] = spec
        return spec

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self, timeout: float | None = 30.0) -> None:
        """Connect (following redirects) and register; returns once registered.

        Raises WorkerError if the server rejects the worker or refuses a declared job,
        asyncio.TimeoutError if no server could be reached within ``timeout``.
        """
        if self._main_task is not None:
            raise RuntimeError("worker already started")
        self._stopping = False
        self._loop_time = asyncio.get_running_loop().time
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, self.max_concurrency), thread_name_prefix=f"fastjob-{self.app}")
        self._main_task = asyncio.create_task(self._run(), name=f"fastjob-worker-{self.app}")
        self._side_tasks.spawn(self._flush_logs_loop(), "fastjob-log-flush")
        self._side_tasks.spawn(self._watch_run_lease(), "fastjob-run-lease")
        try:
            await asyncio.wait_for(self._wait_ready(), timeout)
        except BaseException:
            await self.stop(grace=0)
            raise

    def _interrupt_after(self, grace: float, reason: str) -> None:
        """Cancel the running instances still running after ``grace`` seconds (reported interrupted)."""
        def interrupt() -> None:
            self._interrupt(reason)

        asyncio.get_running_loop().call_later(grace, interrupt)

    def _interrupt(self, reason: str) -> None:
        for instance_id, task in list(self._running.items()):
            if not task.done():
                self._cancel_reasons[instance_id] = reason
                task.cancel()

    async def _watch_run_lease(self) -> None:
        """Stop running instances when no owning server has been heard for the run lease: by then
        the server may have given them to another worker, and they must not run twice at once."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, min(1.0, self.run_lease / 4)))
            silent = loop.time() - self._server_alive_at
            if self._running and silent > self.run_lease:
                log.warning("worker %s: no owning server heard for %.1fs: interrupting %d instances",
                            self.worker_id, silent, len(self._running))
                self._interrupt(f"run lease expired: no owning server heard for {silent:.1f}s")
            if self._deferred:  # no server vouched for us within a heartbeat timeout of asking
                self._refuse_deferred(loop.time() - self.heartbeat_timeout,
                                      f"run lease expired: no owning server heard for {silent:.1f}s")

    async def _wait_ready(self) -> None:
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._ready.is_set():
                return
            assert self._main_task is not None
            waiter = asyncio.create_task(self._ready.wait())
            await asyncio.wait({waiter, self._main_task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self._main_task.done() and self._fatal is None:
                raise WorkerError("worker stopped before it registered")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking jobs, let running ones finish for ``grace`` seconds, interrupt the rest.

        The server is told first (DRAIN), so it sends nothing more and hands this worker's
        second-level jobs to another; an instance interrupted here is run again by the server
        (status ``interrupted``, not a failure of the handler)."""
        self._stopping = True
        self.second_level.stop_all("worker stopping")
        await self.second_level.wait_stopped(2.0)
        if self.connected and self.version >= 2:
            self._send("DRAIN", {"reason": "worker stopping"})
        if self._running:
            self._interrupt_after(grace, "worker stopping")
            await asyncio.wait(list(self._running.values()), timeout=grace + 2.0)
        self._flush_logs()
        if self._conn is not None:
            self._conn.close()
        if self._main_task is not None:
            self._main_task.cancel()
            await asyncio.gather(self._main_task, return_exceptions=True)
            self._main_task = None
        await self._side_tasks.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._ready.clear()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def run(self) -> None:
        """Run until interrupted (SIGINT/SIGTERM), on uvloop when installed."""
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
            await self.stop()
            if self._fatal is not None:
                raise self._fatal

        try:
            import uvloop
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())

    def server_alive_at(self) -> float:
        """loop.time() at which our server was last known alive: when we sent the last PING
        (or HELLO) it answered. Second-level jobs' lease runs from it."""
        return self._server_alive_at

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._conn is not None and not self._conn.closed

    # ---- connection management -------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        target: str | None = None
        hops = 0
        # A server that redirected us to an owner whose heartbeat is late: come back to it when
        # that owner's lease runs out (it will then take the app over), not after a long backoff.
        fallback: tuple[str, float] | None = None  # (address, loop.time())
        while not self._stopping:
            address = target or self._next_server()
            target = None
            patience = self.connect_timeout
            if fallback is not None:
                patience = min(patience, max(0.2, fallback[1] - loop.time()))
            try:
                outcome = await self._session(address, patience)
            except WorkerError as exc:
                self._fatal = exc
                log.error("worker %s: %s", self.worker_id, exc)
                return
            except (OSError, ConnectionError, asyncio.TimeoutError, RemoteError, ProtocolError) as exc:
                log.info("worker %s: connection to %s failed: %s", self.worker_id, address, exc or type(exc).__name__)
                outcome = None
            if isinstance(outcome, _Redirect) and hops < 5:
                target, hops = outcome.address, hops + 1
                if outcome.retry_in is not None:
                    fallback = (address, loop.time() + outcome.retry_in)
                continue
            if outcome == "established":
                failures = 0
            hops = 0
            if self._stopping:
                return
            if fallback is not None and outcome != "established":
                back_to, at = fallback
                fallback = None
                log.info("worker %s: the owner of app %s did not answer; back to %s in %.2fs", self.worker_id,
                         self.app, back_to, max(0.0, at - loop.time()))
                await asyncio.sleep(max(0.0, at - loop.time()))
                target = back_to
                continue
            fallback = None
            delay = min(self.reconnect_max, self.reconnect_min * (2 ** failures)) * random.uniform(0.5, 1.0)
            failures = min(failures + 1, 16)
            await asyncio.sleep(delay)

    def _next_server(self) -> str:
        """The servers in turn, from a random start: after one failed, the next try is another."""
        self._server_turn = (self._server_turn + 1) % len(self.servers)
        return self.servers[self._server_turn]

    async def _session(self, address: str, patience: float) -> str | _Redirect | None:
        """One connection: handshake, then serve until it closes. Returns how it ended.

        ``patience`` bounds the connect and the HELLO's answer."""
        loop = asyncio.get_running_loop()
        host, port = parse_address(address)
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _ClientConnection(self), host, port, ssl=self.ssl), patience)
        try:
            hello_sent_at = loop.time()
            reply = await conn.request("HELLO", self._hello_body(), timeout=patience)
            if reply.type == "REDIRECT":
                log.info("worker %s: app %s is owned by %s, following", self.worker_id, self.app, reply.body["address"])
                return _Redirect(reply.body["address"], reply.body.get("retry_in"))
            if reply.type == "REJECT":
                code, reason = reply.body.get("code", ""), reply.body.get("reason", "")
                if code in FATAL_REJECTS:
                    raise WorkerError(f"rejected by {address}: {code}: {reason}")
                log.warning("worker %s: %s refused the session (%s: %s); retrying",
                            self.worker_id, address, code, reason)
                return None
            self.server_id = reply.body["server_id"]
            self.version = int(reply.body["version"])
            self.heartbeat_interval = float(reply.body["heartbeat_interval"])
            self.heartbeat_timeout = float(reply.body["heartbeat_timeout"])
            self.run_lease = float(reply.body.get("run_lease") or self.heartbeat_timeout)
            self._max_frame = min(self.max_frame, int(reply.body["max_frame"]))
            self._server_alive_at = max(self._server_alive_at, hello_sent_at)
            self._conn = conn
            await self._register_jobs(conn)
            self._resend_results(conn)
            self.second_level.connected()
            self._ready.set()
            log.info("worker %s: registered with %s for app %s", self.worker_id, self.server_id, self.app)
            await self._heartbeat_until_closed(conn)
            return "established"
        finally:
            if self._conn is conn:
                self._conn = None
                self._ready.clear()
                self.second_level.disconnected()
            conn.close()

    def _hello_body(self) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "app": self.app,
            "worker_id": self.worker_id,
            "role": self.role,
            "token": self.token,
            "tags": self.tags,
            "capacity": self.max_concurrency,
            "running": sorted({*self._running, *self._unsent_results}),
            # results the last owner may have received but not written before it died
            "finished": list(itertools.islice(reversed(self._sent_results), FINISHED_IN_HELLO)),
            "second_level": self.second_level.job_ids(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    async def _register_jobs(self, conn: _ClientConnection) -> None:
        """Upsert every declared job, many requests in flight at once (one round trip per chunk)."""
        specs = list(self.declared.values())
        for start in range(0, len(specs), 256):
            chunk = specs[start:start + 256]
            replies = await asyncio.gather(
                *(conn.request("JOB_UPSERT", {"job": spec_to_wire(spec)}, timeout=max(30.0, self.connect_timeout))
                  for spec in chunk),
                return_exceptions=True)
            for spec, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, RemoteError) and reply.code == "invalid":
                    raise WorkerError(f"job {spec.name!r} refused by the server: {reply.message}")
                if isinstance(reply, BaseException):
                    raise reply

    async def _heartbeat_until_closed(self, conn: _ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            while not closed.done():
                # asyncio.wait, not wait_for: it never swallows a cancellation (Python < 3.12)
                await asyncio.wait({closed}, timeout=self.heartbeat_interval)
                if closed.done():
                    return
                if loop.time() - conn.last_received > self.heartbeat_timeout:
                    log.warning("worker %s: server %s silent for %.1fs; reconnecting",
                                self.worker_id, self.server_id, self.heartbeat_timeout)
                    conn.fail(ErrorCode.HEARTBEAT_TIMEOUT, "nothing received within the heartbeat timeout")
                    return
                self._ping(conn)
        finally:
            closed.cancel()

    def _ping(self, conn: _ClientConnection) -> None:
        """PING, remembering when: the PONG renews the run lease from this send time."""
        ts = time.time()
        loop = asyncio.get_running_loop()
        self._pings = {t: at for t, at in self._pings.items() if ts - t < 2 * self.heartbeat_timeout}
        self._pings[ts] = loop.time()
        conn.send("PING", {"ts": ts, "running": len(self._running)})

    # ---- incoming ------------------------------------------------------------------------
    def _on_message(self, conn: _ClientConnection, msg: Message) -> None:
        kind = msg.type
        if kind == "DISPATCH":
            self._on_dispatch(conn, msg.body)
        elif kind == "CANCEL":
            task = self._running.get(msg.body["instance_id"])
            if task is not None:
                self._cancel_reasons[msg.body["instance_id"]] = msg.body.get("reason") or "cancelled"
                task.cancel()
        elif kind == "PING":
            conn.send("PONG", {"ts": msg.body.get("ts", 0.0)})
        elif kind == "SL_ASSIGN":
            self.second_level.assign(msg.body["job"], float(msg.body["lease"]))
        elif kind == "SL_REVOKE":
            self.second_level.revoke(msg.body["job_id"], msg.body.get("reason") or "revoked")
        elif kind == "PONG":
            ts = msg.body.get("ts")
            sent_at = self._pings.pop(ts, None) if isinstance(ts, (int, float)) else None
            # a server that cannot vouch for its ownership (lease false) renews nothing
            if sent_at is not None and msg.body.get("lease", True):
                self._server_alive_at = max(self._server_alive_at, sent_at)
                if self._deferred:
                    self._start_deferred()
        elif kind == "ERROR":
            log.warning("worker %s: server error %s: %s", self.worker_id, msg.body.get("code"), msg.body.get("message"))
        else:
            log.debug("worker %s: ignoring %s", self.worker_id, kind)

    def _on_dispatch(self, conn: _ClientConnection, body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        if instance_id in self._running:
            conn.send("ACK", {"instance_id": instance_id, "accepted": True})  # already ours: one copy only
            return
        if instance_id in self._unsent_results or instance_id in self._sent_results:
            conn.send("ACK", {"instance_id": instance_id, "accepted": True})
            conn.send("RESULT", self._unsent_results.get(instance_id) or self._sent_results[instance_id])
            return
        reason = None
        if self._stopping:
            reason = "worker stopping"
        elif body["handler"] not in self.handlers:
            reason = f"unknown handler {body['handler']!r}"
        elif len(self._running) >= self.max_concurrency:
            reason = "at max_concurrency"
        if reason is not None:
            conn.send("ACK", {"instance_id": instance_id, "accepted": False, "reason": reason})
            return
        if not self._lease_held():
            # our run lease lapsed (an outage, or we were frozen and this frame is old): start
            # nothing until an owning server vouches for us again; ask it now
            self._deferred.append((conn, body, asyncio.get_running_loop().time()))
            self._ping(conn)
            return
        if self.version < 2:  # version 2: START acknowledges an accepted DISPATCH (one frame less per fire)
            conn.send("ACK", {"instance_id": instance_id, "accepted": True})
        self._running[instance_id] = asyncio.create_task(self._execute(body), name=f"fastjob-instance-{instance_id}")

    def _lease_held(self) -> bool:
        return self._loop_time() - self._server_alive_at <= self.run_lease

    def _start_deferred(self) -> None:
        """The lease is renewed: take the dispatches that waited for it (on the same connection)."""
        deferred, self._deferred = self._deferred, []
        for conn, body, _ in deferred:
            if not conn.closed:
                self._on_dispatch(conn, body)

    def _refuse_deferred(self, older_than: float, reason: str) -> None:
        """Refuse the dispatches that waited longer than ``older_than`` (loop time) for a vouching PONG."""
        keep = []
        for conn, body, since in self._deferred:
            if since >= older_than:
                keep.append((conn, body, since))
            elif not conn.closed:
                conn.send("ACK", {"instance_id": body["instance_id"], "accepted": False, "reason": reason})
        self._deferred = keep

    # ---- running a handler -------------------------------------------------------------------
    async def _execute(self, body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        started_at = time.time()
        # START goes out at the next loop turn, and only if the handler still runs then: a handler
        # done at once reports once (its RESULT carries started_at), one frame less per fire
        asyncio.get_running_loop().call_soon(self._report_start, instance_id, started_at)
        ctx = JobContext(instance_id, body["job"], body["job_id"], body.get("params"), body["attempt"],
                         body["scheduled_at"], JobLog(self, instance_id, body["job"]))
        status, result, error = await self.run_handler(self.handlers[body["handler"]], ctx, body.get("timeout"),
                                                       lambda: self._cancel_reasons.pop(instance_id, "cancelled"))
        self._flush_logs(instance_id)
        report = {"instance_id": instance_id, "status": status, "started_at": started_at,
                  "finished_at": time.time(), "result": result, "error": error}
        self._running.pop(instance_id, None)
        self._unsent_results[instance_id] = report
        if self._conn is not None and not self._conn.closed:
            self._resend_results(self._conn)

    def _report_start(self, instance_id: int, started_at: float) -> None:
        if instance_id in self._running:
            self._send("START", {"instance_id": instance_id, "started_at": started_at})

    async def run_handler(
        self, fn: Handler, ctx: Any, timeout: float | None, cancel_reason: Callable[[], str],
        check_result: bool = True,
    ) -> tuple[str, Any, str | None]:
        """Run one handler call: (status, result, error). Only this call fails if it misbehaves.

        ``check_result`` verifies that the result can be shipped; second-level runs ship none.
        """
        try:
            is_async = self._is_async.get(fn)
            if is_async is None:
                is_async = self._is_async[fn] = inspect.iscoroutinefunction(fn)
            if is_async:
                coro = fn(ctx)
            else:
                loop = asyncio.get_running_loop()
                coro = loop.run_in_executor(self._executor, functools.partial(fn, ctx))
            result = await asyncio.wait_for(coro, timeout) if timeout else await coro
            if inspect.isawaitable(result):
                result = await result
        except asyncio.TimeoutError:
            return Status.TIMED_OUT.value, None, f"handler exceeded its {timeout}s timeout"
        except asyncio.CancelledError:
            reason = cancel_reason()
            if self._main_task is not None and self._main_task.cancelled():
                raise
            if reason == "timeout":
                return Status.TIMED_OUT.value, None, "cancelled: timeout"
            # cut short by its worker or server, not by the handler: version 1 calls it cancelled
            return (Status.INTERRUPTED if self.version >= 2 else Status.CANCELLED).value, None, f"interrupted: {reason}"
        except Exception as exc:
            log.info("job %s (instance %s) failed: %r", getattr(ctx, "job", "?"), getattr(ctx, "instance_id", "?"), exc)
            return Status.FAILED.value, None, f"{type(exc).__name__}: {exc}"
        if not check_result:
            return Status.SUCCEEDED.value, result, None
        try:
            size = len(msgpack.packb(result))
        except Exception as exc:
            return Status.FAILED.value, None, f"result not serialisable: {type(exc).__name__}: {exc}"
        if size > self._max_frame - RESULT_HEADROOM:
            return (Status.FAILED.value, None,
                    f"result too large: {size} bytes encoded, the frame limit is {self._max_frame}")
        return Status.SUCCEEDED.value, result, None

    # ---- outgoing ------------------------------------------------------------------------------
    def send_frame(self, kind: str, body: dict[str, Any]) -> bool:
        """Send one message to the server; False when there is no connection or it was refused."""
        return self._send(kind, body)

    def _send(self, kind: str, body: dict[str, Any]) -> bool:
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            conn.send(kind, body)
        except ProtocolError as exc:  # a frame over the limit: dropped, never fatal to the worker
            log.error("worker %s: %s frame not sent: %s", self.worker_id, kind, exc.message)
            return False
        return True

    def _resend_results(self, conn: _ClientConnection) -> None:
        for instance_id in list(self._unsent_results):
            report = self._unsent_results.pop(instance_id)
            try:
                conn.send("RESULT", report)
            except ProtocolError as exc:  # should not happen (results are size-checked); fail, never lose
                report = {**report, "status": "failed", "result": None, "error": f"result not sent: {exc.message}"}
                conn.send("RESULT", report)
            self._sent_results[instance_id] = report
            if len(self._sent_results) > REMEMBERED_RESULTS:
                self._sent_results.popitem(last=False)

    def _buffer_log(self, instance_id: int, level: str, text: str) -> None:
        with self._log_lock:
            lines = self._log_buffer.setdefault(instance_id, [])
            if len(lines) < MAX_LOG_LINES_PER_INSTANCE:
                lines.append([time.time(), level, text[:MAX_LOG_LINE]])

    def _flush_logs(self, instance_id: int | None = None) -> None:
        """Ship buffered lines in frames of LOG_LINES_PER_FRAME (each line is bounded)."""
        with self._log_lock:
            ids = [instance_id] if instance_id is not None else list(self._log_buffer)
            batches = {key: self._log_buffer.pop(key) for key in ids if self._log_buffer.get(key)}
        for key, lines in batches.items():
            for start in range(0, len(lines), LOG_LINES_PER_FRAME):
                if not self._send("LOG", {"instance_id": key, "lines": lines[start:start + LOG_LINES_PER_FRAME]}):
                    with self._log_lock:  # not connected: keep the rest for the next flush
                        self._log_buffer[key] = lines[start:] + self._log_buffer.get(key, [])
                    break

    async def _flush_logs_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._flush_logs()

    # ---- client API ---------------------------------------------------------------------------
    async def call(self, kind: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One API request to the app's owner; waits (bounded) for a connection."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await asyncio.wait_for(self._ready.wait(), max(0.01, deadline - asyncio.get_running_loop().time()))
            conn = self._conn
            if conn is None:
                continue
            try:
                reply = await conn.request(kind, body, timeout=max(0.01, deadline - asyncio.get_running_loop().time()))
                return reply.body
            except ConnectionError:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
            except RemoteError as exc:
                if exc.code not in ("not_owner", "unavailable") or asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def trigger(self, name: str, params: Any = None) -> int:
        """Fire job ``name`` now with ``params``; returns the instance id."""
        reply = await self.call("TRIGGER", {"name": name, "params": params})
        return int(reply["instance_id"])

    async def get_instance(self, instance_id: int) -> dict[str, Any]:
        instance: dict[str, Any] = (await self.call("INSTANCE_GET", {"instance_id": instance_id}))["instance"]
        return instance

    async def list_instances(self, job: str | None = None, status: Sequence[str] = (),
                             limit: int = 100) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"limit": limit}
        if job:
            body["job"] = job
        if status:
            body["status"] = list(status)
        instances: list[dict[str, Any]] = (await self.call("INSTANCE_LIST", body))["instances"]
        return instances

    async def get_logs(self, instance_id: int, limit: int = 1000) -> list[list[Any]]:
        lines: list[list[Any]] = (await self.call("LOG_GET", {"instance_id": instance_id, "limit": limit}))["lines"]
        return lines

    async def get_job(self, name: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self.call("JOB_GET", {"name": name}))["job"]
        return job

    async def list_jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = (await self.call("JOB_LIST", {}))["jobs"]
        return jobs

    async def delete_job(self, name: str) -> bool:
        return bool((await self.call("JOB_DELETE", {"name": name}))["deleted"])

    async def set_enabled(self, name: str, enabled: bool) -> bool:
        return bool((await self.call("JOB_ENABLE", {"name": name, "enabled": enabled}))["ok"])


def _overlap_of(allow_overlap: bool | None) -> str:
    return str((Overlap.ALLOW if allow_overlap else Overlap.QUEUE).value)
