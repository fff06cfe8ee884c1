"""The scan: the WAL write that comes before the wheel.

Every ``scan_interval`` (or when woken: a job changed, an app was gained), for each app this
server owns, the store claims every fire due within ``scan_horizon`` in one fenced transaction
(the instance rows, then the jobs' next fire times), and only then do the fires enter the wheel.
A claim whose answer was lost may still have committed: its stamp is kept, and the next scan
finds its fires by that stamp (``Store.written_at``) so that none is left out of the wheel.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .. import schedule
from ..clock import Clock
from ..models import InstanceRow, JobRow
from ..store import NotOwnerError, Store, StoreError
from ..tasks import BackgroundTasks, cancel_and_wait, wait_until_set

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger("fastjob.scheduler")

CLAIM_LIMIT = 5000  # fires one claim transaction writes at most
MAX_CLAIMS_PER_SCAN = 20  # claims one scan pass makes for one app before the next app's turn


class Scanner:
    """Claims the owned apps' due fires into the WAL and hands them to the wheel."""

    def __init__(
        self,
        *,
        store: Store,
        cluster: Cluster,
        jobs: dict[int, JobRow],
        load_jobs: Callable[[str], Awaitable[None]],
        enter_wheel: Callable[[InstanceRow, int], None],
        known: Callable[[int], bool],
        draining: dict[str, list[tuple[InstanceRow, int]]],
        tasks: BackgroundTasks,
        clock: Clock,
        scan_horizon: float,
        scan_interval: float,
        misfire_threshold: float,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.jobs = jobs
        self.load_jobs = load_jobs
        self.enter_wheel = enter_wheel
        self.known = known  # is this instance already in the wheel or in flight?
        self.draining = draining  # apps being handed over: not scanned
        self.tasks = tasks
        self.clock = clock
        self.scan_horizon = scan_horizon
        self.scan_interval = scan_interval
        self.misfire_threshold = misfire_threshold
        # WAL writes that failed without an answer, by app: (epoch, created_at); they may have
        # committed, and then only a query by their stamp finds their fires (_recover_unanswered)
        self._unanswered: dict[str, list[tuple[int, float]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._now = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="fastjob-scan")

    async def stop(self) -> None:
        await cancel_and_wait(self._task, 10.0, "the scan loop")

    def wake(self) -> None:
        self._now.set()

    def unanswered(self, app: str, epoch: int, created_at: float) -> None:
        """A WAL write stamped ``created_at`` failed without an answer: look for its rows next scan."""
        self._unanswered.setdefault(app, []).append((epoch, created_at))

    def forget(self, app: str) -> None:
        """The app was lost, or is being loaded whole: its unanswered writes need no search."""
        self._unanswered.pop(app, None)

    async def _loop(self) -> None:
        while True:
            await wait_until_set(self._now, self.scan_interval)
            self._now.clear()
            if not self.cluster.lease_valid():
                continue
            for app, epoch in list(self.cluster.owned.items()):
                if app in self.draining:
                    continue
                try:
                    await self.scan_app(app, epoch)
                except NotOwnerError:
                    log.warning("app %s: scan fenced at epoch %d; re-syncing ownership", app, epoch)
                    self.tasks.spawn(self.cluster.sync(), "fastjob-resync")
                except StoreError as exc:
                    log.warning("app %s: scan failed, will retry: %s", app, exc)
                except Exception:
                    log.exception("app %s: scan crashed", app)

    async def scan_app(self, app: str, epoch: int) -> int:
        """Claim the app's fires due within the horizon and put them into the wheel.

        A claim writes at most CLAIM_LIMIT fires (a bounded transaction); while one comes back
        full, the next is claimed at once: 10,000 per-second jobs need 10,000 fires a second."""
        await self._recover_unanswered(app, epoch)
        claimed = 0
        for _ in range(MAX_CLAIMS_PER_SCAN):
            now = self.clock.wall()
            horizon_ms = int((now + self.scan_horizon) * 1000)
            planner = schedule.make_planner(int(now * 1000), int(self.misfire_threshold * 1000))
            try:
                rows = await self.store.claim_due(self.cluster.server_id, app, epoch, horizon_ms, planner, now,
                                                  limit=CLAIM_LIMIT)
            except StoreError:
                self.unanswered(app, epoch, now)
                raise
            await self._wheel_claimed(app, epoch, rows)
            claimed += len(rows)
            if len(rows) < CLAIM_LIMIT:
                break
        if claimed:
            log.debug("app %s: claimed %d fires", app, claimed)
        return claimed

    async def _wheel_claimed(self, app: str, epoch: int, rows: list[InstanceRow]) -> None:
        jobs = self.jobs
        if any(row.job_id not in jobs for row in rows):
            await self.load_jobs(app)  # one query for the app, not a round trip per job
        for row in rows:
            if row.job_id in jobs:
                self.enter_wheel(row, epoch)

    async def _recover_unanswered(self, app: str, epoch: int) -> None:
        """Wheel the fires of our WAL writes that failed without an answer but committed (the
        reply lost, every retry failed): no one else holds them. A write of an older epoch is
        the business of whoever gained the app since (it loads every unfinished row)."""
        unanswered = self._unanswered.get(app)
        while unanswered:
            written_epoch, created_at = unanswered[0]
            if written_epoch == epoch:
                rows = await self.store.written_at(self.cluster.server_id, app, epoch, created_at)
                known = [r for r in rows if self.known(r.id)]
                if rows:
                    log.warning("app %s: %d fires of a write whose answer was lost found in the WAL",
                                app, len(rows) - len(known))
                await self._wheel_claimed(app, epoch, [r for r in rows if r not in known])
            unanswered.pop(0)
