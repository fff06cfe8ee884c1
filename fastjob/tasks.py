"""Background tasks that are owned: errors logged, all cancelled and awaited on shutdown."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

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

    async def close(self) -> None:
        """Cancel every task and wait for them to finish."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
