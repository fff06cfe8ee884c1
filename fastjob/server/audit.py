"""The audit log: every mutating call, over HTTP or the wire, with who, what, when and how it ended.

Entries are gathered in memory and written in one statement every FLUSH_INTERVAL, so a busy
wire (workers triggering jobs) costs no database round trip per call. A server that dies loses
at most that interval's entries; ``flush`` writes them at once (on stop, and before a read of
the log on this server).
"""
from __future__ import annotations

import asyncio
import logging
import time

from ..store import AuditEntry, Store, StoreError

log = logging.getLogger("fastjob.audit")

FLUSH_INTERVAL = 0.5
#: Entries kept in memory while the database is away; beyond it the oldest are dropped (and counted).
MAX_BUFFERED = 100_000
MAX_DETAIL = 2000


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._buffer: list[AuditEntry] = []
        self.dropped = 0
        self._lock = asyncio.Lock()

    def record(self, actor: str, action: str, app: str | None, target: str, outcome: str,
               detail: str | None = None, via: str = "http") -> None:
        if len(self._buffer) >= MAX_BUFFERED:
            self._buffer.pop(0)
            self.dropped += 1
        self._buffer.append(AuditEntry(time.time(), actor[:191], action, app, str(target)[:255], outcome[:64],
                                       None if detail is None else detail[:MAX_DETAIL], via))

    async def flush(self) -> None:
        async with self._lock:
            entries, self._buffer = self._buffer, []
            if not entries:
                return
            try:
                await self.store.add_audit(entries)
            except StoreError as exc:
                log.warning("audit log: %d entries not written yet (database unavailable: %s)", len(entries), exc)
                self._buffer[:0] = entries

    async def run(self) -> None:
        """Write what was recorded, every FLUSH_INTERVAL, until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush()
