"""Status changes and log lines, written in batches that are never lost.

Dispatching must not wait for the database: the scheduler hands every change to the writer,
which gathers a burst into one multi-row write and keeps a batch the database refused.
"""
from __future__ import annotations

import asyncio
import logging

from ..models import InstanceUpdate, LogLine
from ..store import Store, StoreError
from ..store.base import AlarmRow

log = logging.getLogger("fastjob.scheduler")


class StatusWriter:
    """Collects status changes and log lines and writes them in batches, never losing one.

    A failed write keeps the batch and is retried on the next flush, so a database outage
    delays status updates but drops none.
    """

    def __init__(self, store: Store, flush_interval: float = 0.02, max_batch: int = 2000) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self._updates: list[InstanceUpdate] = []
        self._logs: list[LogLine] = []
        self._finished: dict[int, float] = {}  # job id -> latest finish, for last_finished_time
        self._alarms: list[AlarmRow] = []  # raised by the statuses queued with them: written together
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def update(self, change: InstanceUpdate) -> None:
        self._updates.append(change)
        self._wake.set()

    def logs(self, lines: list[LogLine]) -> None:
        self._logs.extend(lines)
        self._wake.set()

    def alarms(self, rows: list[AlarmRow]) -> None:
        """Alarms for the outbox, written in the same transaction as the statuses queued so far."""
        if rows:
            self._alarms.extend(rows)
            self._wake.set()

    def job_finished(self, job_id: int, finished_at: float) -> None:
        if finished_at > self._finished.get(job_id, 0.0):
            self._finished[job_id] = finished_at
        self._wake.set()

    def queued(self) -> int:
        """Status changes and log lines waiting for the next write (a gauge)."""
        return len(self._updates) + len(self._logs)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fastjob-status-writer")

    async def stop(self) -> bool:
        """Stop the background flushing; True if the final flush wrote everything."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        return await self.flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_interval)  # let a burst gather into one batch
            if not await self.flush():
                await asyncio.sleep(0.5)
                self._wake.set()

    async def flush(self) -> bool:
        """Write what is pending; False (and keep it) if the database refused."""
        updates, self._updates = self._updates, []
        lines, self._logs = self._logs, []
        finished, self._finished = self._finished, {}
        alarms, self._alarms = self._alarms, []
        try:
            if updates or lines or finished or alarms:
                await self.store.write_statuses(updates, lines, finished, alarms)  # one transaction
            return True
        except StoreError as exc:
            log.warning("status write of %d updates, %d log lines failed, will retry: %s",
                        len(updates), len(lines), exc)
            self._updates[:0] = updates
            self._logs[:0] = lines
            self._alarms[:0] = alarms
            for job_id, finished_at in finished.items():
                self.job_finished(job_id, finished_at)
            return False
