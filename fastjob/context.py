"""What a handler receives: the job context and its ``ctx.log``.

Kept apart from the worker so that the per-fire path of second-level jobs needs no import.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .models import fire_key

job_log = logging.getLogger("fastjob.job")


class _LogSink(Protocol):
    def _buffer_log(self, instance_id: int, level: str, text: str) -> None: ...


class _Log:
    """The ``debug/info/warning/error`` calls of ``ctx.log``; subclasses decide where lines go."""

    def _emit(self, level: str, message: str, *args: Any) -> None:
        raise NotImplementedError

    def debug(self, message: str, *args: Any) -> None:
        self._emit("DEBUG", message, *args)

    def info(self, message: str, *args: Any) -> None:
        self._emit("INFO", message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self._emit("WARNING", message, *args)

    def error(self, message: str, *args: Any) -> None:
        self._emit("ERROR", message, *args)


class JobLog(_Log):
    """``ctx.log`` of an instance: lines go to the server with it (and to the ``fastjob.job`` logger)."""

    def __init__(self, sink: _LogSink, instance_id: int, job: str) -> None:
        self._sink = sink
        self._instance_id = instance_id
        self._job = job

    def _emit(self, level: str, message: str, *args: Any) -> None:
        text = message % args if args else str(message)
        job_log.log(logging.getLevelName(level), "[%s #%d] %s", self._job, self._instance_id, text)
        self._sink._buffer_log(self._instance_id, level, text)


class LocalLog(_Log):
    """``ctx.log`` where no server listens: lines go to the local logger only."""

    def __init__(self, job: str) -> None:
        self._job = job

    def _emit(self, level: str, message: str, *args: Any) -> None:
        job_log.log(logging.getLevelName(level), "[%s] " + str(message), self._job, *args)


#: Lines of one second-level run shipped with its record, and the characters kept of each.
RUN_LOG_LINES = 20
RUN_LOG_CHARS = 1000


class RunLog(_Log):
    """``ctx.log`` of a second-level run: lines go to the local logger, and the first
    RUN_LOG_LINES to the server with the run's record (if it is sampled); the rest are counted."""

    def __init__(self, job: str) -> None:
        self._job = job
        self.lines: list[list[Any]] = []  # [ts, level, text]
        self.dropped = 0

    def _emit(self, level: str, message: str, *args: Any) -> None:
        text = message % args if args else str(message)
        job_log.log(logging.getLevelName(level), "[%s] %s", self._job, text)
        if len(self.lines) < RUN_LOG_LINES:
            self.lines.append([time.time(), level, text[:RUN_LOG_CHARS]])
        else:
            self.dropped += 1


@dataclass
class JobContext:
    """What a handler receives."""

    instance_id: int  # 0 for a second-level run
    job: str
    job_id: int
    params: Any
    attempt: int
    scheduled_at: float  # planned fire time, epoch seconds
    log: _Log
    #: a broadcast sub-run's shard: this worker's index among the ``shard_total`` that run the fire
    shard_index: int = 0
    shard_total: int = 1
    #: a workflow step's upstream steps' results, by step name
    upstream: dict[str, Any] = field(default_factory=dict)
    #: the task key this run's sub-tasks are written under (worker_tasks.py): a sub-task's is given; a
    #: fire's is made from its job and planned time when it first maps; "" where none can be
    key: str = ""
    subtasks: SubTasks | None = field(default=None, repr=False, compare=False)
    _calls: int = field(default=0, repr=False, compare=False)
    # what a trigger passed, apart from the job's params: sent only for the built-in handlers
    # ("fastjob:..."), whose params are always the job's own (commands.py)
    trigger_params: Any = None
    #: a broadcast job's fire: what its coordinating run fans out (fanout.run_broadcast)
    broadcast_of: dict[str, Any] | None = field(default=None, repr=False)

    async def map(self, items: Iterable[Any], handler: str, *, retries: int = 0, timeout: float | None = None,
                  batch_size: int | None = None, return_exceptions: bool = False) -> list[Any]:
        """Run ``handler`` on each item across the app's workers; their results, in order.

        Each item is a sub-task: written to the store in batches, run once by some worker (again
        only if its worker is lost, or up to ``retries`` more times if it raises), and its result
        kept, so that a re-run of this fire reuses what finished. A failed item raises
        :class:`MapError` once every item ended, unless ``return_exceptions`` puts a
        :class:`TaskFailed` in its place. Call it from an ``async def`` handler."""
        results = [r async for r in self.map_stream(items, handler, retries=retries, timeout=timeout,
                                                    batch_size=batch_size, return_exceptions=True)]
        if not return_exceptions:
            failures = {r.index: r.error for r in results if type(r) is TaskFailed}
            if failures:
                raise MapError(failures, results)
        return results

    def map_stream(self, items: Iterable[Any] | AsyncIterable[Any], handler: str, *, retries: int = 0,
                   timeout: float | None = None, batch_size: int | None = None, window: int | None = None,
                   return_exceptions: bool = False) -> AsyncIterator[Any]:
        """:meth:`map` for any (async) iterable, yielding results in order with bounded memory: at
        most ``window`` batches are out at once, and more are read from ``items`` only as results
        are taken. A failed item raises :class:`MapError` when reached (or yields a TaskFailed)."""
        self._calls += 1
        return self.tasks_client().stream(self, self._calls, items, handler, retries=retries, timeout=timeout,
                                       batch_size=batch_size, window=window,
                                       return_exceptions=return_exceptions)

    async def broadcast(self, handler: str, params: Any = None, *, tags: Iterable[str] = (),
                        timeout: float | None = None) -> list[Any]:
        """Run ``handler`` once on every connected worker of the app (with ``tags``), each told its
        shard; their results (a :class:`TaskFailed` for a failed one), in shard order."""
        self._calls += 1
        return await self.tasks_client().broadcast(self, self._calls, handler, params, tags=list(tags), timeout=timeout)

    @property
    def fanned_out(self) -> bool:
        """Whether this run called map, map_stream or broadcast (its sub-tasks end if it is cut short)."""
        return self._calls > 0

    def tasks_client(self) -> SubTasks:
        """This run's sub-task client, its task key made on first use; RuntimeError where a run can
        have none (a second-level run, a run not from a version-6 server)."""
        if not self.key and self.instance_id:  # a fire's run: its key, made now (not on every run's path)
            self.key = fire_key(self.job_id, round(self.scheduled_at * 1000))
        if self.subtasks is None or not self.key:
            raise RuntimeError("sub-tasks need a run dispatched by a FastJob server (protocol version 6)")
        return self.subtasks


class TaskFailed:
    """A sub-task that failed after its retries, in place of its result (``return_exceptions``)."""

    __slots__ = ("index", "error")

    def __init__(self, index: int, error: str) -> None:
        self.index = index
        self.error = error

    def __repr__(self) -> str:
        return f"TaskFailed({self.index}, {self.error!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskFailed) and (other.index, other.error) == (self.index, self.error)

    def __hash__(self) -> int:
        return hash((self.index, self.error))


class MapError(Exception):
    """Sub-tasks of a map failed: ``failures`` maps each failed item's index to its error."""

    def __init__(self, failures: dict[int, str], results: list[Any] | None = None) -> None:
        first = min(failures)
        super().__init__(f"{len(failures)} sub-task(s) failed; item {first}: {failures[first]}")
        self.failures = failures
        self.results = results


class SubTasks(Protocol):
    """What a context uses of its worker's sub-task client (worker_tasks.MapClient)."""

    def stream(self, ctx: JobContext, call: int, items: Iterable[Any] | AsyncIterable[Any], handler: str, *,
               retries: int, timeout: float | None, batch_size: int | None, window: int | None,
               return_exceptions: bool) -> AsyncIterator[Any]: ...

    async def broadcast(self, ctx: JobContext, call: int, handler: str, params: Any, *, tags: list[str],
                        timeout: float | None) -> list[Any]: ...

    async def step(self, ctx: JobContext, call: int, target: dict[str, Any], params: Any,
                   upstream: dict[str, Any]) -> tuple[bool, Any]: ...

    def abandon(self, parent: str, reason: str) -> None: ...


#: A job's handler: called with the context; async or plain (a plain one runs in a thread).
Handler = Callable[[JobContext], Any | Awaitable[Any]]
