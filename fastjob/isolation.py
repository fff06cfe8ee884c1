"""Handlers run in child processes (``isolation="process"``), so that a run can be stopped.

Python cannot interrupt a thread (threads.py): a plain ``def`` handler that overruns its timeout,
or whose run is cancelled, goes on until it returns. A handler registered with
``isolation="process"`` runs in a child process instead, and a run that must end (timeout,
CANCEL, lapsed run lease, worker shutdown) ends by terminating that child: SIGTERM, then SIGKILL
if it still lives after :data:`TERM_WAIT` seconds. The pool starts a new child when one is next
needed.

Children are started with the ``spawn`` method, never ``fork``: a forked copy of the worker
inherits its event loop and its threads' locks in whatever state they were, and can deadlock.
Spawn pickles the handler by reference, so a process-isolated handler must be a module-level
function, and a worker script must start the worker under ``if __name__ == "__main__":`` (a
spawned child imports the main module again, as with any use of multiprocessing).

Each child is in a process group of its own, so that terminating it also ends what the handler
started, and Ctrl-C in a terminal reaches the worker (which gives runs their grace) rather than
the children. A child exits when the worker process goes away, even mid-run.

Unix only (process groups, signals).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import pickle
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .context import Handler, JobContext, _Log

ISOLATIONS = ("thread", "process")  # the values of Worker(isolation=) and @worker.handler(isolation=)
TERM_WAIT = 0.2  # seconds a child gets to exit after SIGTERM before SIGKILL
REAP_WAIT = 2.0  # seconds to wait for a child to be reaped after SIGKILL, or after it closed its pipe
INLINE_SEND = 32 * 1024  # larger runs are written from a thread: the child may not read yet (booting)
PARENT_CHECK = 0.5  # seconds between a child's checks that the worker still lives
CONTEXT_FIELDS = ("instance_id", "job", "job_id", "params", "attempt", "scheduled_at")

LogLine = Callable[[str, str], None]  # (level, text)


class ChildRunError(Exception):
    """A run in a child failed; ``str()`` is the error to report as is ("ValueError: ...")."""


class ProcessPool:
    """At most ``max_workers`` child processes, started when first needed and reused between runs."""

    def __init__(self, max_workers: int) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._slots = asyncio.Semaphore(max(1, max_workers))  # one run per child: bounds the children
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()  # every child not yet reaped, idle, busy or being stopped
        self._stopping: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references
        self._closed = False

    async def run(self, fn: Handler, ctx: Any, on_log: LogLine) -> Any:
        """Run ``fn`` on ``ctx``'s plain data in a child; its ``ctx.log`` lines go to ``on_log``.

        Returns the result; raises :class:`ChildRunError` when the handler raised or its process
        died. Cancelled (a timeout, an interruption), it terminates the child before it re-raises,
        so that the run has ended when it is reported."""
        data = {field: getattr(ctx, field) for field in CONTEXT_FIELDS}
        try:
            payload = pickle.dumps((fn, data), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a handler defined in a function, a lambda, odd params
            raise ChildRunError(f"handler cannot be sent to a child process: {type(exc).__name__}: {exc}") from None
        async with self._slots:
            if self._closed:
                raise ChildRunError("the worker's process pool is closed")
            child = self._take()
            try:
                result = await child.call(payload, on_log)
            except asyncio.CancelledError:
                await self._stop(child)
                raise
            except ChildRunError:
                if child.usable:  # the handler raised: its child is fine and serves the next run
                    self._idle.append(child)
                else:
                    await self._stop(child)
                raise
            except BaseException:
                await self._stop(child)
                raise
            self._idle.append(child)
            return result

    def _take(self) -> _Child:
        while self._idle:
            child = self._idle.pop()
            if child.usable:
                return child
            child.kill_now()  # died while idle (killed from outside): reap it
            self._children.discard(child)
        child = _Child(self._mp)
        self._children.add(child)
        return child

    async def _stop(self, child: _Child) -> None:
        """Terminate ``child`` and forget it; a second cancellation does not stop the termination."""
        task = asyncio.ensure_future(child.stop())
        self._stopping.add(task)

        def stopped(_: asyncio.Task[None]) -> None:
            self._stopping.discard(task)
            self._children.discard(child)

        task.add_done_callback(stopped)
        await asyncio.shield(task)

    def close(self) -> None:
        """Kill every child now (SIGKILL) and reap it: no process is left behind."""
        self._closed = True
        for child in list(self._children):
            child.kill_now()
        self._children.clear()
        self._idle.clear()

    @property
    def pids(self) -> list[int]:
        """The process ids of the live children (for tests and diagnostics)."""
        return [child.pid for child in self._children if child.alive]


class _Child:
    """One child process, the parent's end of its pipe, and the thread that reads that end.

    A thread rather than ``loop.add_reader``: under uvloop, watching an fd switches it to
    non-blocking mode, and multiprocessing's framed ``recv``/``send_bytes`` then fail with
    EAGAIN on any message larger than the socket buffer (a large result or params). The thread
    reads whole messages with a blocking ``recv``, so the loop never waits for one; it hands each
    to the loop, and ends at the end of the pipe (the child exited)."""

    def __init__(self, mp: multiprocessing.context.SpawnContext) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = mp.Pipe()
        # daemon: multiprocessing's exit handler terminates it should close() never run
        self._process = mp.Process(target=_serve, args=(child_end, os.getpid()), daemon=True,
                                   name="fastjob-isolated")
        self._process.start()
        child_end.close()
        self._conn = parent_end
        self._runs = 0  # runs sent: the child numbers its messages the same way
        self._current: tuple[int, asyncio.Future[Any], LogLine] | None = None  # (number, answer, log sink)
        self.broken = False  # its pipe ended: never reused, even should the process live on
        threading.Thread(target=self._read, args=(loop,), name=f"fastjob-isolated-{self.pid}", daemon=True).start()

    @property
    def pid(self) -> int:
        return int(self._process.pid or 0)

    @property
    def alive(self) -> bool:
        return self._process.exitcode is None  # polls waitpid: a dead child is reaped here

    @property
    def usable(self) -> bool:
        return not self.broken and self.alive

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reading thread: each message, then None at the end of the pipe, goes to the loop."""
        while True:
            message: tuple[str, int, Any] | None
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = None
            except Exception as exc:  # a message that does not unpickle here (the pipe is still in step)
                message = ("error", 0, f"the child's answer cannot be read: {type(exc).__name__}: {exc}")
            try:
                loop.call_soon_threadsafe(self._deliver, message)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            if message is None:
                return

    def _deliver(self, message: tuple[str, int, Any] | None) -> None:
        """In the loop: a log line, the answer of the current run, or the end of the pipe."""
        if message is None:
            self.broken = True
            if self._current is not None and not self._current[1].done():
                self._current[1].set_exception(_Exited())
            return
        kind, number, value = message
        if self._current is None or number not in (self._current[0], 0):
            return  # a late line of an earlier run (a thread its handler left behind)
        _, done, on_log = self._current
        if done.done():
            return
        if kind == "log":
            on_log(*value)
        elif kind == "ok":
            done.set_result(value)
        else:
            done.set_exception(ChildRunError(value))

    async def call(self, payload: bytes, on_log: LogLine) -> Any:
        """Send one run and wait for its answer; log lines go to ``on_log`` as they arrive."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._runs += 1
        self._current = (self._runs, done, on_log)
        try:
            if self.broken:
                raise _Exited()
            if len(payload) <= INLINE_SEND:
                self._conn.send_bytes(payload)
            else:  # a child still booting reads nothing yet: do not hold the loop meanwhile
                await asyncio.to_thread(self._conn.send_bytes, payload)
            return await done
        except (_Exited, OSError):  # OSError: the child died before it read the run
            self.broken = True
            raise ChildRunError(_death(await self._reaped(REAP_WAIT))) from None
        finally:
            self._current = None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after TERM_WAIT seconds; returns once the child is reaped."""
        self._signal(signal.SIGTERM)
        if await self._reaped(TERM_WAIT) is None:
            self._signal(signal.SIGKILL)
            await self._reaped(REAP_WAIT)
        self._conn.close()

    def kill_now(self) -> None:
        """SIGKILL and reap, blocking (briefly: nothing outlives SIGKILL): for close(), which is synchronous."""
        self._signal(signal.SIGKILL)
        self._process.join(REAP_WAIT)
        self._conn.close()

    async def _reaped(self, timeout: float) -> int | None:
        """The exit code once the child has exited and been reaped, None if not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (code := self._process.exitcode) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return code

    def _signal(self, sig: int) -> None:
        """Signal the child's process group (what the handler started dies too), else the child alone
        (it may not have made its group yet). Never once it is reaped: its pid could be reused."""
        if not self.alive:
            return
        try:
            os.killpg(self.pid, sig)
        except OSError:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class _Exited(Exception):
    """The child closed its end of the pipe: it exited (or is about to)."""


def _death(code: int | None) -> str:
    if code is None:
        return "the handler's process closed its pipe and did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the handler's process was killed by {name} (exit code {code})"
    return f"the handler's process exited with exit code {code}"


# ---- in the child -------------------------------------------------------------------------------
class _PipeLog(_Log):
    """``ctx.log`` in a child: each line goes to the worker at once, which ships it as usual."""

    def __init__(self, send: Callable[[str, str], None]) -> None:
        self._send = send

    def _emit(self, level: str, message: str, *args: Any) -> None:
        self._send(level, message % args if args else str(message))


def _serve(conn: multiprocessing.connection.Connection, parent: int) -> None:
    """A child's life: run what the worker sends, one run at a time, until the pipe closes."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    threading.Thread(target=_exit_with, args=(parent,), name="fastjob-parent-watch", daemon=True).start()
    lock = threading.Lock()  # a handler's own threads may log at the same time

    def send(message: tuple[str, int, Any]) -> None:
        with lock:
            conn.send(message)

    run = 0
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        run += 1
        kind, value = _run_one(payload, functools.partial(_send_line, send, run))
        try:
            send((kind, run, value))
        except (EOFError, OSError):
            return
        except Exception as exc:  # the result cannot be pickled (nothing was written)
            send(("error", run, f"result not serialisable: {type(exc).__name__}: {exc}"))


def _send_line(send: Callable[[tuple[str, int, Any]], None], run: int, level: str, text: str) -> None:
    send(("log", run, (level, text)))


def _run_one(payload: bytes, log_line: LogLine) -> tuple[str, Any]:
    """("ok", result) or ("error", "Type: message"); an async handler runs under asyncio.run."""
    try:
        fn, data = pickle.loads(payload)
    except Exception as exc:  # its module does not import here, say
        return "error", f"handler cannot be loaded in the child process: {type(exc).__name__}: {exc}"
    ctx = JobContext(**data, log=_PipeLog(log_line))
    try:
        if inspect.iscoroutinefunction(fn):
            result = asyncio.run(fn(ctx))
        else:
            result = fn(ctx)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
    except Exception as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    return "ok", result


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _exit_with(parent: int) -> None:
    """End this child when the worker is gone (killed -9, say): its run would otherwise go on
    alone while the server gives the instance to another worker."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK)
    os._exit(1)
