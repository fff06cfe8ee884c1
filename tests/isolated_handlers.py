"""Handlers that tests/test_isolation.py runs with ``isolation="process"``.

Module-level, because a child process started with ``spawn`` gets a handler pickled by reference
(a function defined inside a test cannot be). Each that should be watched from outside writes
its process id to ``ctx.params["pid_file"]`` first.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastjob.context import JobContext


def _note_pid(ctx: JobContext) -> None:
    if isinstance(ctx.params, dict) and "pid_file" in ctx.params:
        path = Path(ctx.params["pid_file"])
        path.with_suffix(".tmp").write_text(str(os.getpid()))
        path.with_suffix(".tmp").rename(path)  # whole or absent when the test reads it


def spin(ctx: JobContext) -> None:
    """Never returns, and never yields: only the end of its process stops it."""
    _note_pid(ctx)
    while True:
        pass


def chatty(ctx: JobContext) -> dict[str, Any]:
    ctx.log.info("hello %s", ctx.params["who"])
    ctx.log.warning("from process %d", os.getpid())
    return {"pid": os.getpid(), "job": ctx.job, "attempt": ctx.attempt, "params": ctx.params}


async def async_echo(ctx: JobContext) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    ctx.log.info("async in the child")
    return {"pid": os.getpid(), "params": ctx.params}


def boom(ctx: JobContext) -> None:
    raise ValueError(f"bad input {ctx.params['n']}")


def die(ctx: JobContext) -> None:
    ctx.log.info("about to exit")
    os._exit(3)


def stubborn(ctx: JobContext) -> None:
    """Ignores SIGTERM: only SIGKILL ends it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _note_pid(ctx)
    while True:
        pass
