"""Running the instances a server dispatches, and getting their results and log lines back to it.

At most ``max_concurrency`` instances run at once, each with its timeout, and never two copies of
one instance: a repeated DISPATCH of an instance that runs is acknowledged and ignored, and one of
an instance that finished is answered with its result (a server that restarted before recording
the dispatch fires the row again). Results that could not be sent (the connection dropped) are
kept and sent after the next handshake, whose HELLO lists them so that the server re-attaches them
instead of failing them. Log lines are buffered per instance and shipped in bounded frames.

The run lease is enforced here: no instance starts, and none goes on running, while no owning
server has vouched for this worker within the lease, because by then the server may have given
the instance to another worker. The link keeps the lease's clock (:class:`RunLink`).

Lead fires (protocol version 5: DISPATCH with ``start_at``) wait in this worker's own timing wheel
and start at their planned instant on the server's clock, never before. One starts only if the
connection that delivered it, or last confirmed it, is still the open one: after a reconnect the
server confirms each (a DISPATCH again) or withdraws it (CANCEL), because meanwhile it may have
sent it to another worker.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import msgpack

from .context import Handler, JobContext, JobLog, SubTasks
from .fanout import run_broadcast
from .isolation import ChildRunError, ProcessPool
from .models import Status
from .protocol import KILL_REASON, WITHDRAW_REASON, Connection, ProtocolError
from .threads import DaemonThreadPool
from .timer import WheelTimer

log = logging.getLogger("fastjob.worker")

MAX_LOG_LINES_PER_INSTANCE = 10_000
REMEMBERED_RESULTS = 10_000  # finished instances whose result is replayed on a repeated DISPATCH
# How many of those a HELLO names in `finished` (the newest), for a new owner after a failover.
FINISHED_IN_HELLO = 1000
MAX_LOG_LINE = 4096  # characters kept of one log line
LOG_LINES_PER_FRAME = 100  # so a LOG frame stays far below max_frame (100 x 4 KiB)
RESULT_HEADROOM = 4096  # bytes of a RESULT frame besides the result itself
HELD_PER_FRAME = 5_000  # lead fire ids per HELD frame (9 bytes each at most: below the smallest frame limit)
_SUCCEEDED = Status.SUCCEEDED.value  # read per run: an Enum member's .value is a Python-level property


class ServerClock(Protocol):
    """The server's wall clock as this worker estimates it (worker_link.ClockOffset)."""

    def to_local(self, server_time: float) -> float: ...
    def surely_after(self, server_time: float) -> float: ...


class LeadFire:
    """A lead fire held until its start: its DISPATCH, the connection that confirmed it last, its timer entry."""

    __slots__ = ("body", "ctx", "conn", "handle")

    def __init__(self, body: dict[str, Any], ctx: JobContext, conn: Connection) -> None:
        self.body = body
        self.ctx = ctx  # made on receipt: one thing less to do when a burst starts
        self.conn = conn
        self.handle: int | None = None  # None: due, waiting for the server to confirm it after a reconnect


class RunLink(Protocol):
    """What the runner uses of the worker's link to its server, and nothing more."""

    @property
    def worker_id(self) -> str: ...
    @property
    def conn(self) -> Connection | None: ...  # the registered session's, if any
    @property
    def version(self) -> int: ...  # negotiated protocol version
    @property
    def frame_limit(self) -> int: ...  # negotiated max frame: bounds a result
    @property
    def stopping(self) -> bool: ...  # the worker is stopping: refuse new runs
    @property
    def alive_at(self) -> float: ...  # loop time an owning server last vouched for us
    @property
    def run_lease(self) -> float: ...
    @property
    def heartbeat_timeout(self) -> float: ...
    @property
    def clock(self) -> ServerClock: ...
    def lease_held(self) -> bool: ...
    def send(self, kind: str, body: dict[str, Any]) -> bool: ...
    def ping(self, conn: Connection) -> None: ...


class InstanceRunner:
    """The instances this worker runs, has run (results to send or replay), and their log lines."""

    def __init__(
        self,
        link: RunLink,
        handlers: Mapping[str, Handler],
        capacity: Callable[[], int],
        abandoned: Callable[[], bool],
        isolation: Mapping[str, str] | None = None,
    ) -> None:
        """``capacity`` is the worker's max_concurrency (read at each DISPATCH); ``abandoned`` says
        the worker's main task was cancelled (the loop is going away): a cancelled handler then
        propagates the cancellation instead of reporting an interruption. ``isolation`` maps a
        handler's name to "thread" or "process" (read at each run; absent: thread)."""
        self._link = link
        self._handlers = handlers
        self._capacity = capacity
        self._abandoned = abandoned
        self._isolation: Mapping[str, str] = isolation if isolation is not None else {}
        self.running: dict[int, asyncio.Task[None]] = {}
        self._cancel_reasons: dict[int, str] = {}
        self.outcomes: collections.Counter[str] = collections.Counter()  # runs by final status (worker metrics)
        self.unsent_results: dict[int, dict[str, Any]] = {}
        # a server that restarted before recording a dispatch fires the row again: answer it
        # with the result we already have instead of running the instance a second time
        self.sent_results: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._log_lock = threading.Lock()  # ctx.log is called from handler threads too
        self._log_buffer: dict[int, list[list[Any]]] = {}
        # dispatches received while our run lease had lapsed: started once a PONG renews it
        self.deferred: list[tuple[Connection, dict[str, Any], float]] = []  # (conn, DISPATCH, since)
        self._is_async: dict[Handler, bool] = {}  # inspect per handler once, not per run
        self._executor: DaemonThreadPool | None = None
        self._processes: ProcessPool | None = None  # for isolation="process" handlers (isolation.py)
        self.leading: dict[int, LeadFire] = {}  # lead fires not started, by instance id
        self._held: list[int] = []  # lead fires taken this loop turn, acknowledged together (HELD)
        self._held_conn: Connection | None = None  # the connection they came on
        self._starts: list[tuple[int, float]] = []  # runs started this loop turn: START for those still running
        self._results_due = False  # a send_results is scheduled
        self._lead_timer: WheelTimer | None = None  # made on the loop when the first lead fire comes
        self.subtasks: SubTasks | None = None  # ctx.map's client (worker_tasks.MapClient), set by the worker
        self.parked: Callable[[], int] = lambda: 0  # runs waiting for their sub-tasks: they take no slot
        #: called while the run lease has lapsed (the worker stops its sub-task batches too)
        self.lease_lapsed: Callable[[str], None] = lambda reason: None

    # ---- lifecycle ----------------------------------------------------------------------------
    def open(self, max_workers: int, thread_name_prefix: str) -> None:
        """Create the thread pool that plain ``def`` handlers run in (daemon threads: see threads.py),
        and the pool of child processes for process-isolated ones (children start when first needed)."""
        self._executor = DaemonThreadPool(max_workers, thread_name_prefix)
        self._processes = ProcessPool(max_workers)

    def close(self) -> None:
        """Drop the thread pool without waiting: a thread cannot be stopped, its run is abandoned.
        Kill every child process: those can be stopped, and none may outlive the worker."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._processes is not None:
            self._processes.close()
            self._processes = None
        if self._lead_timer is not None:
            self._lead_timer.close()
            self._lead_timer = None
        self.leading.clear()

    async def wind_down(self, grace: float) -> None:
        """Let running instances finish for ``grace`` seconds, then interrupt the rest."""
        if self.running:
            self.interrupt_after(grace, "worker stopping")
            await asyncio.wait(list(self.running.values()), timeout=grace + 2.0)
        self.send_results()

    def hello_state(self) -> dict[str, Any]:
        """What a HELLO says of our runs, so that a new owner re-attaches them instead of failing them."""
        return {
            "running": sorted({*self.running, *self.unsent_results}),
            "leading": sorted(self.leading),  # lead fires we hold: each waits for the server's word
            # results the last owner may have received but not written before it died
            "finished": list(itertools.islice(reversed(self.sent_results), FINISHED_IN_HELLO)),
        }

    # ---- stopping runs ------------------------------------------------------------------------
    def cancel(self, instance_id: int, reason: str) -> None:
        """The server's CANCEL: stop that run (it reports itself, with ``reason``); a lead fire not
        started is dropped (ACK refused, with ``reason``). A withdrawal never stops a run."""
        lead = self.leading.pop(instance_id, None)
        if lead is not None:
            self._unarm(lead)
            self._link.send("ACK", {"instance_id": instance_id, "accepted": False, "reason": reason})
            return
        if reason == WITHDRAW_REASON:
            return
        task = self.running.get(instance_id)
        if task is not None:
            self._cancel_reasons[instance_id] = reason
            task.cancel()

    def interrupt_after(self, grace: float, reason: str) -> None:
        """Cancel the running instances still running after ``grace`` seconds (reported interrupted)."""
        def interrupt() -> None:
            self.interrupt(reason)

        asyncio.get_running_loop().call_later(grace, interrupt)

    def interrupt(self, reason: str) -> None:
        for instance_id, task in list(self.running.items()):
            if not task.done():
                self._cancel_reasons[instance_id] = reason
                task.cancel()

    async def watch_run_lease(self) -> None:
        """Stop running instances (and, through ``lease_lapsed``, sub-task batches) when no owning
        server has been heard for the run lease: by then the server may have given them to another
        worker, and they must not run twice at once."""
        loop = asyncio.get_running_loop()
        while True:
            poll = max(0.05, min(1.0, self._link.run_lease / 4))
            lapses_in = self._link.alive_at + self._link.run_lease - loop.time()
            # wake when the lease lapses, not up to a poll later: the server runs them elsewhere soon after
            await asyncio.sleep(min(poll, lapses_in + 0.005) if lapses_in > 0 else poll)
            silent = loop.time() - self._link.alive_at
            if silent > self._link.run_lease:
                reason = f"run lease expired: no owning server heard for {silent:.1f}s"
                if self.running:
                    log.warning("worker %s: no owning server heard for %.1fs: interrupting %d instances",
                                self._link.worker_id, silent, len(self.running))
                    self.interrupt(reason)
                self.lease_lapsed(reason)  # the worker's sub-task batches stop with its instances
            if self.deferred:  # no server vouched for us within a heartbeat timeout of asking
                self.refuse_deferred(loop.time() - self._link.heartbeat_timeout,
                                     f"run lease expired: no owning server heard for {silent:.1f}s")
            if self.leading:
                self.drop_stale_leads()

    # ---- dispatches ---------------------------------------------------------------------------
    def on_dispatch(self, conn: Connection, body: dict[str, Any]) -> None:
        instance_id = body["instance_id"]
        if instance_id in self.running:
            conn.send("ACK", {"instance_id": instance_id, "accepted": True})  # already ours: one copy only
            return
        if instance_id in self.unsent_results or instance_id in self.sent_results:
            conn.send("ACK", {"instance_id": instance_id, "accepted": True})
            conn.send("RESULT", self.unsent_results.get(instance_id) or self.sent_results[instance_id])
            return
        held = self.leading.get(instance_id)
        if held is not None:  # the server confirms a lead fire we hold: it starts on this connection
            held.conn = conn
            self._acknowledge(conn, instance_id)
            if held.handle is None:
                self._arm(held)  # at its start_at, or at once if that passed while it waited
            return
        reason = None
        if self._link.stopping:
            reason = "worker stopping"
        elif body["handler"] not in self._handlers:
            reason = f"unknown handler {body['handler']!r}"
        if reason is not None:
            conn.send("ACK", {"instance_id": instance_id, "accepted": False, "reason": reason})
            return
        if body.get("start_at") is not None:  # a lead fire: it takes its slot when it starts
            held = self.leading[instance_id] = LeadFire(body, self._context(body), conn)
            self._arm(held)
            self._acknowledge(conn, instance_id)
            return
        self._start(conn, body)

    def _start(self, conn: Connection, body: dict[str, Any], ctx: JobContext | None = None) -> None:
        """Run an accepted DISPATCH now, if a slot is free and our run lease holds (else later, or refused)."""
        instance_id = body["instance_id"]
        if len(self.running) - self.parked() >= self._capacity():
            conn.send("ACK", {"instance_id": instance_id, "accepted": False, "reason": "at max_concurrency"})
            return
        if not self._link.lease_held():
            # our run lease lapsed (an outage, or we were frozen and this frame is old): start
            # nothing until an owning server vouches for us again; ask it now
            self.deferred.append((conn, body, asyncio.get_running_loop().time()))
            self._link.ping(conn)
            return
        if self._link.version < 2:  # version 2: START acknowledges an accepted DISPATCH (one frame less per fire)
            conn.send("ACK", {"instance_id": instance_id, "accepted": True})
        # loop.create_task, unnamed: a burst starts thousands at once, and asyncio.create_task's name costs
        self.running[instance_id] = asyncio.get_running_loop().create_task(
            self._execute(body, ctx or self._context(body)))

    # ---- lead fires ---------------------------------------------------------------------------
    def _acknowledge(self, conn: Connection, instance_id: int) -> None:
        """HELD for the lead fires taken in this loop turn: one frame for a burst, not one per fire."""
        if self._held_conn is not conn:
            self._send_held()
            self._held_conn = conn
        self._held.append(instance_id)
        if len(self._held) == 1:
            asyncio.get_running_loop().call_soon(self._send_held)

    def _send_held(self) -> None:
        held, self._held = self._held, []
        conn, self._held_conn = self._held_conn, None
        for start in range(0, len(held), HELD_PER_FRAME):
            if conn is not None and not conn.closed:
                conn.send("HELD", {"instance_ids": held[start:start + HELD_PER_FRAME]})

    def _arm(self, lead: LeadFire) -> None:
        """Start the lead fire at its start_at on the server's clock (now, if that passed)."""
        if self._lead_timer is None:
            self._lead_timer = WheelTimer(self._leads_due)
        delay = self._link.clock.surely_after(lead.body["start_at"]) - time.time()
        lead.handle = self._lead_timer.call_at(time.monotonic() + max(0.0, delay), lead.body["instance_id"])

    def _unarm(self, lead: LeadFire) -> None:
        if lead.handle is not None and self._lead_timer is not None:
            self._lead_timer.cancel(lead.handle)
        lead.handle = None

    def _leads_due(self, instance_ids: list[int]) -> None:
        """Lead fires whose time came: each starts as a DISPATCH would now (capacity, run lease), if
        the connection that confirmed it is still open (a session's connection is closed when it ends;
        the newest may still be finishing its handshake); else it waits for the server to confirm it."""
        for instance_id in instance_ids:
            lead = self.leading.get(instance_id)
            if lead is None:
                continue
            lead.handle = None
            if lead.conn.closed:
                continue  # listed in our next HELLO: the server confirms or withdraws it
            del self.leading[instance_id]
            self._start(lead.conn, lead.body, lead.ctx)

    def refuse_leads(self, reason: str) -> None:
        """Give every lead fire back to the server (the worker is stopping): it sends them elsewhere."""
        for instance_id in list(self.leading):
            self.cancel(instance_id, reason)

    def drop_stale_leads(self) -> None:
        """Lead fires that no server confirmed within the run lease past their start: the server has
        settled them without us (re-run, or sent elsewhere)."""
        limit = time.time() - self._link.run_lease
        for instance_id, lead in list(self.leading.items()):
            if lead.handle is None and self._link.clock.to_local(lead.body["start_at"]) < limit:
                del self.leading[instance_id]

    def start_deferred(self) -> None:
        """The lease is renewed: take the dispatches that waited for it (on the same connection)."""
        deferred, self.deferred = self.deferred, []
        for conn, body, _ in deferred:
            if not conn.closed:
                self._start(conn, body)

    def refuse_deferred(self, older_than: float, reason: str) -> None:
        """Refuse the dispatches that waited longer than ``older_than`` (loop time) for a vouching PONG."""
        keep = []
        for conn, body, since in self.deferred:
            if since >= older_than:
                keep.append((conn, body, since))
            elif not conn.closed:
                conn.send("ACK", {"instance_id": body["instance_id"], "accepted": False, "reason": reason})
        self.deferred = keep

    # ---- running a handler --------------------------------------------------------------------
    def _context(self, body: dict[str, Any]) -> JobContext:
        instance_id = body["instance_id"]
        return JobContext(instance_id, body["job"], body["job_id"], body.get("params"), body["attempt"],
                          body["scheduled_at"], JobLog(self, instance_id, body["job"]),
                          subtasks=self.subtasks,  # its task key is made when it first maps (ctx.tasks_client)
                          trigger_params=body.get("trigger_params"))

    async def _execute(self, body: dict[str, Any], ctx: JobContext) -> None:
        instance_id = body["instance_id"]
        started_at = time.time()
        # START goes out at the next loop turn, and only if the handler still runs then: a handler
        # done at once reports once (its RESULT carries started_at), one frame less per fire. The
        # starts of a turn go in one callback, after every run that starts in that turn has started.
        self._starts.append((instance_id, started_at))
        if len(self._starts) == 1:
            asyncio.get_running_loop().call_soon(self._report_starts)
        fn, in_process = self._handlers[body["handler"]], self._isolation.get(body["handler"]) == "process"
        if body.get("mode") == "broadcast":  # this run coordinates; the handler runs on every worker
            fn, in_process = run_broadcast, False
            ctx.broadcast_of = {"handler": body["handler"], "min_success": body.get("min_success", 1.0),
                                "tags": body.get("tags") or [], "timeout": body.get("timeout")}
        status, result, error = await self.run_handler(fn, ctx, body.get("timeout"),
                                                       lambda: self._cancel_reasons.pop(instance_id, "cancelled"),
                                                       in_process=in_process)
        if ctx.fanned_out and self.subtasks is not None and status in (Status.TIMED_OUT.value, Status.KILLED.value):
            self.subtasks.abandon(ctx.key, error or status)  # its sub-tasks end with it (a re-run would reuse them)
        self.flush_logs(instance_id)
        self.outcomes[status] += 1
        report = {"instance_id": instance_id, "status": status, "started_at": started_at,
                  "finished_at": time.time(), "result": result, "error": error}
        self.running.pop(instance_id, None)
        self.unsent_results[instance_id] = report
        if not self._results_due:
            # sent once the other runs of this turn have started: a burst's handlers start first
            self._results_due = True
            asyncio.get_running_loop().call_soon(self.send_results)

    def _report_starts(self) -> None:
        starts, self._starts = self._starts, []
        for instance_id, started_at in starts:
            if instance_id in self.running:
                self._link.send("START", {"instance_id": instance_id, "started_at": started_at})

    def send_results(self) -> None:
        """Send the results of finished runs on the current session (kept for the next one if none)."""
        self._results_due = False
        conn = self._link.conn
        if conn is not None and not conn.closed:
            self.resend_results(conn)

    async def run_handler(
        self, fn: Handler, ctx: Any, timeout: float | None, cancel_reason: Callable[[], str],
        check_result: bool = True, in_process: bool = False,
    ) -> tuple[str, Any, str | None]:
        """Run one handler call: (status, result, error). Only this call fails if it misbehaves.

        ``check_result`` verifies that the result can be shipped; second-level runs ship none.
        ``in_process`` runs it in a child process, which a timeout or an interruption terminates
        (a thread runs on); it is reported as a thread run would be.
        """
        try:
            is_async = self._is_async.get(fn)
            if is_async is None:
                is_async = self._is_async[fn] = inspect.iscoroutinefunction(fn)
            if in_process:
                coro: Awaitable[Any] = self._process_pool().run(fn, ctx, functools.partial(_forward_log, ctx))
            elif is_async:
                coro = fn(ctx)
            else:
                loop = asyncio.get_running_loop()
                coro = loop.run_in_executor(self._executor, functools.partial(fn, ctx))
            result = await asyncio.wait_for(coro, timeout) if timeout else await coro
            if result is not None and inspect.isawaitable(result):
                result = await result
        except asyncio.TimeoutError:
            return Status.TIMED_OUT.value, None, f"handler exceeded its {timeout}s timeout"
        except asyncio.CancelledError:
            reason = cancel_reason()
            if self._abandoned():
                raise
            if reason == "timeout":
                return Status.TIMED_OUT.value, None, "cancelled: timeout"
            if reason == KILL_REASON and self._link.version >= 4:
                return Status.KILLED.value, None, KILL_REASON
            # cut short by its worker or server, not by the handler: version 1 calls it cancelled
            status = Status.INTERRUPTED if self._link.version >= 2 else Status.CANCELLED
            return status.value, None, f"interrupted: {reason}"
        except Exception as exc:
            log.info("job %s (instance %s) failed: %r", getattr(ctx, "job", "?"), getattr(ctx, "instance_id", "?"), exc)
            # a child's error is already "Type: message" (the handler's exception), or says how it died
            error = str(exc) if isinstance(exc, ChildRunError) else f"{type(exc).__name__}: {exc}"
            return Status.FAILED.value, None, error
        if not check_result or result is None:
            return _SUCCEEDED, result, None
        try:
            size = len(msgpack.packb(result))
        except Exception as exc:
            return Status.FAILED.value, None, f"result not serialisable: {type(exc).__name__}: {exc}"
        limit = self._link.frame_limit
        if size > limit - RESULT_HEADROOM:
            return Status.FAILED.value, None, f"result too large: {size} bytes encoded, the frame limit is {limit}"
        return _SUCCEEDED, result, None

    def _process_pool(self) -> ProcessPool:
        """The pool of child processes (made here if the runner was not opened, as for run_in_executor)."""
        if self._processes is None:
            self._processes = ProcessPool(max(1, self._capacity()))
        return self._processes

    # ---- results and log lines ----------------------------------------------------------------
    def resend_results(self, conn: Connection) -> None:
        """Send every result not yet sent, and remember it (a repeated DISPATCH replays it)."""
        for instance_id in list(self.unsent_results):
            report = self.unsent_results.pop(instance_id)
            try:
                conn.send("RESULT", report)
            except ProtocolError as exc:  # should not happen (results are size-checked); fail, never lose
                report = {**report, "status": "failed", "result": None, "error": f"result not sent: {exc.message}"}
                conn.send("RESULT", report)
            self.sent_results[instance_id] = report
            if len(self.sent_results) > REMEMBERED_RESULTS:
                self.sent_results.popitem(last=False)

    def _buffer_log(self, instance_id: int, level: str, text: str) -> None:
        """``ctx.log``'s sink (see context.JobLog); called from handler threads too."""
        with self._log_lock:
            lines = self._log_buffer.setdefault(instance_id, [])
            if len(lines) < MAX_LOG_LINES_PER_INSTANCE:
                lines.append([time.time(), level, text[:MAX_LOG_LINE]])

    def flush_logs(self, instance_id: int | None = None) -> None:
        """Ship buffered lines in frames of LOG_LINES_PER_FRAME (each line is bounded)."""
        if instance_id is not None and instance_id not in self._log_buffer:
            return  # the usual case: the run logged nothing (a read of a dict is safe without the lock)
        with self._log_lock:
            ids = [instance_id] if instance_id is not None else list(self._log_buffer)
            batches = {key: self._log_buffer.pop(key) for key in ids if self._log_buffer.get(key)}
        for key, lines in batches.items():
            for start in range(0, len(lines), LOG_LINES_PER_FRAME):
                if not self._link.send("LOG", {"instance_id": key, "lines": lines[start:start + LOG_LINES_PER_FRAME]}):
                    with self._log_lock:  # not connected: keep the rest for the next flush
                        self._log_buffer[key] = lines[start:] + self._log_buffer.get(key, [])
                    break

    async def flush_logs_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self.flush_logs()


def _forward_log(ctx: Any, level: str, text: str) -> None:
    """A line a process-isolated handler logged in its child: through the parent's ``ctx.log``, so that
    it goes where a thread-run handler's line goes (the ``fastjob.job`` logger, then the server)."""
    ctx.log._emit(level, text)
