"""What a handler receives: the job context and its ``ctx.log``.

Kept apart from the worker so that the per-fire path of second-level jobs needs no import.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

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
    # what a trigger passed, apart from the job's params: sent only for the built-in handlers
    # ("fastjob:..."), whose params are always the job's own (commands.py)
    trigger_params: Any = None


#: A job's handler: called with the context; async or plain (a plain one runs in a thread).
Handler = Callable[[JobContext], Any | Awaitable[Any]]
