"""Background tasks that are owned: errors logged, all cancelled and awaited on shutdown."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("fastjob.tasks")


class BackgroundTasks:
    """A set of fire-and-forget steps whose failures are logged, never lost, and that stop together."""

    def __init__(self, expected: tuple[type[BaseException], ...] = ()) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expected = expected  # failures logged as warnings without a traceback

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, self._expected):
            log.warning("%s failed: %s", task.get_name(), exc)
        else:
            log.error("%s crashed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 10.0) -> None:
        """Cancel every task and wait for them to finish (at most ``timeout`` seconds)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                log.error("%s did not stop within %.1fs after being cancelled", task.get_name(), timeout)


async def wait_until_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set.

    Why not ``asyncio.wait_for(event.wait(), timeout)``: before Python 3.12, when the event is
    set in the same loop turn as the waiting task is cancelled, wait_for returns normally and
    the cancellation is lost, so a ``while True`` loop around it never stops. ``asyncio.wait``
    always lets the cancellation through.
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout: float, what: str) -> None:
    """Cancel a task and wait for it to end, at most ``timeout`` seconds (logged if it does not)."""
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.error("%s did not stop within %.1fs after being cancelled", what, timeout)
