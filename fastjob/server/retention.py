"""Retention: finished instances, log lines, the audit log and the ownership history are pruned
when older than their retention, in small batches off the hot path.

Each owner prunes the instances of its own apps (the app's planned-time index finds the oldest),
so two servers never contend for the same rows; the shared append-only tables are pruned by
every server, which costs nothing when another got there first. A batch is one short
transaction of at most BATCH rows; a pass keeps going while batches come back full (it is
behind) but yields to the event loop between them, so a claim or the status writer waits
for one batch at most.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ..store import Store, StoreError
from ..store.base import IDEMPOTENCY_TTL

log = logging.getLogger("fastjob.retention")

#: Rows one statement deletes.
BATCH = 500
#: Seconds between passes when nothing is behind.
INTERVAL = 1.0
#: Batches of one table in one pass (a pass that is far behind continues at the next).
MAX_BATCHES = 20
#: Passes between two of the shared tables (logs, audit, history, outbox, keys): they grow slower.
SHARED_EVERY = 30
#: Delivered alarms are kept at most this long (or the audit retention, if shorter).
OUTBOX_KEEP = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Seconds each kind of row is kept after it was written or planned (0: forever)."""

    instances: float
    logs: float
    audit: float
    per_app: Mapping[str, float]

    def for_app(self, app: str) -> float:
        return self.per_app.get(app, self.instances)


class Retention:
    def __init__(self, store: Store, policy: RetentionPolicy, owned: Callable[[], list[str]]) -> None:
        self.store = store
        self.policy = policy
        self.owned = owned
        self.pruned = 0  # rows deleted so far (all tables)
        self._passes = 0
        self._behind = False  # a shared table had more to prune than one pass takes

    async def run(self) -> None:
        """Prune every INTERVAL until cancelled."""
        while True:
            try:
                await self.prune_once(time.time())
            except StoreError as exc:
                log.warning("retention: database unavailable, pruning later: %s", exc)
            await asyncio.sleep(INTERVAL)

    async def prune_once(self, now: float) -> int:
        """One pass over every table; returns the rows deleted."""
        pruned = 0
        for app in self.owned():
            keep = self.policy.for_app(app)
            if keep > 0:
                cutoff_ms = int((now - keep) * 1000)
                pruned += await self._batches(functools.partial(self.store.prune_instances, app, cutoff_ms, BATCH))
        self._passes += 1
        if self._behind or self._passes % SHARED_EVERY == 1:  # behind: every pass until caught up
            outbox = min(self.policy.audit or OUTBOX_KEEP, OUTBOX_KEEP)
            shared = {"job_logs": self.policy.logs, "audit_log": self.policy.audit, "app_history": self.policy.audit,
                      "alarm_outbox": outbox, "idempotency_keys": IDEMPOTENCY_TTL,
                      "task_batches": self.policy.logs}  # sub-task batches carry their log lines
            self._behind = False
            for table, keep in shared.items():
                if keep > 0:
                    done = await self._batches(functools.partial(self.store.prune_older, table, now - keep, BATCH))
                    self._behind = self._behind or done >= BATCH * MAX_BATCHES
                    pruned += done
        self.pruned += pruned
        return pruned

    @staticmethod
    async def _batches(batch: Callable[[], Awaitable[int]]) -> int:
        """Batches while they come back full (at most MAX_BATCHES), yielding to the loop between."""
        total = 0
        for _ in range(MAX_BATCHES):
            done = await batch()
            total += done
            if done < BATCH:
                break
            await asyncio.sleep(0)
        return total
