"""Cluster membership and app ownership, synchronised through the database, without locks.

Every server heartbeats its row in ``servers``. Each AppName is owned by one server at a
time, recorded as (owner, epoch) in ``apps``; claiming is a compare-and-set on the epoch, so
of several servers racing for an app exactly one wins and the others see a moved epoch.

Fencing has two layers. The store refuses scheduling writes from a server that no longer
owns the app at its epoch. And a server treats its ownership as a lease: it dispatches only
while its own last successful heartbeat is younger than the timeout minus a margin, so a
server that was frozen (SIGSTOP, a cut network) wakes with a stale lease, re-reads its
epochs, and drops the apps it lost before firing anything.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

from ..store import AppRow, ServerRow, Store, StoreError

log = logging.getLogger("fastjob.cluster")

AppGained = Callable[[str, int, Optional[str]], Awaitable[None]]  # app, epoch, previous owner
AppLost = Callable[[str], Awaitable[None]]


class Cluster:
    """This server's view of the cluster: which apps it owns, at which epoch."""

    def __init__(
        self,
        store: Store,
        server_id: str,
        address: str,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        on_gained: AppGained,
        on_lost: AppLost,
    ) -> None:
        self.store = store
        self.server_id = server_id
        self.address = address
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        self.owned: dict[str, int] = {}  # app -> epoch we hold it at
        self._on_gained = on_gained
        self._on_lost = on_lost
        self._last_heartbeat_ok = -1e18  # loop.time() of the last successful heartbeat
        self._orphan_seen: dict[str, float] = {}  # app -> loop.time() we first saw it ownerless
        self._task: Optional[asyncio.Task[None]] = None
        self._sync_lock = asyncio.Lock()  # one ownership pass at a time (in-process only)
        self.synced = asyncio.Event()  # set after each successful sync; the lease waits on it

    # ---- lease --------------------------------------------------------------------------
    def lease_valid(self) -> bool:
        """True while our last successful heartbeat is younger than timeout minus a margin."""
        margin = min(self.interval, self.timeout / 4)
        age = asyncio.get_running_loop().time() - self._last_heartbeat_ok
        return age < self.timeout - margin

    def owns(self, app: str, epoch: Optional[int] = None) -> bool:
        held = self.owned.get(app)
        return held is not None and (epoch is None or held == epoch)

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.register_server(self.server_id, self.address, time.time())
        self._last_heartbeat_ok = asyncio.get_running_loop().time()
        await self.sync()
        self._task = asyncio.create_task(self._heartbeat_loop(), name="fastjob-cluster")

    async def stop(self, release: bool = True) -> None:
        """Stop heartbeating and set our apps free so survivors claim them at once.

        ``release=False`` (unwritten statuses, or fires held back from a dead owner): leave them
        to expire as if we had crashed, so the successor holds back what we might have sent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not release:
            log.warning("server %s stops without releasing its apps: they expire after the heartbeat timeout",
                        self.server_id)
            self.owned.clear()
            return
        try:
            released = await self.store.release_apps(self.server_id)
            await self.store.remove_server(self.server_id)
            log.info("server %s released apps %s", self.server_id, released)
        except StoreError as exc:
            log.warning("server %s could not release its apps: %s", self.server_id, exc)
        self.owned.clear()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.renew()
            except StoreError as exc:
                log.warning("server %s heartbeat failed: %s", self.server_id, exc)
                if self.owned and not self.lease_valid():
                    # others may own our apps by now: stop serving them (workers reconnect elsewhere)
                    for app in list(self.owned):
                        await self._lose(app, "lease expired while the database was unreachable")
            except Exception:  # keep heartbeating whatever a callback did
                log.exception("server %s: error in cluster loop", self.server_id)

    async def renew(self) -> None:
        """Heartbeat, then re-read epochs; the lease is renewed only once the epochs are known.

        The lease counts from when the heartbeat was sent, and is granted after ``sync`` has
        dropped any app we lost, so no stale fire can slip out while the epochs are read.
        """
        sent_at = asyncio.get_running_loop().time()
        now = time.time()
        if not await self.store.heartbeat_server(self.server_id, now):
            await self.store.register_server(self.server_id, self.address, now)
        await self.sync()
        self._last_heartbeat_ok = sent_at

    # ---- ownership ----------------------------------------------------------------------
    def _alive(self, server: ServerRow, now: float) -> bool:
        return now - server.heartbeat_at < self.timeout

    async def live_servers(self) -> dict[str, ServerRow]:
        now = time.time()
        return {s.id: s for s in await self.store.list_servers() if self._alive(s, now)}

    async def sync(self) -> None:
        """One pass: drop apps we lost, adopt apps assigned to us, take over orphaned apps."""
        async with self._sync_lock:
            live = await self.live_servers()
            apps = await self.store.list_apps()
            load = self._load_by_server(apps, live)
            loop = asyncio.get_running_loop()
            for row in apps:
                held = self.owned.get(row.name)
                if held is not None and row.epoch < held:
                    continue  # a snapshot older than a claim made meanwhile by route()
                if held is not None and (row.owner != self.server_id or row.epoch != held):
                    await self._lose(row.name, f"now owned by {row.owner} at epoch {row.epoch}")
                    continue
                if held is None and row.owner == self.server_id:
                    await self._claim(row)  # assigned to us by another server, or ours before a restart
                elif row.owner is None or row.owner not in live:
                    first_seen = self._orphan_seen.setdefault(row.name, loop.time())
                    preferred = self._least_loaded(load) == self.server_id
                    if preferred or loop.time() - first_seen > 2 * self.timeout:
                        if await self._claim(row):
                            load[self.server_id] = load.get(self.server_id, 0) + 1
                else:
                    self._orphan_seen.pop(row.name, None)
            self.synced.set()

    def _load_by_server(self, apps: list[AppRow], live: dict[str, ServerRow]) -> dict[str, int]:
        load = {server_id: 0 for server_id in live}
        load.setdefault(self.server_id, 0)
        for row in apps:
            if row.owner in load:
                load[row.owner] += 1
        return load

    @staticmethod
    def _least_loaded(load: dict[str, int]) -> str:
        return min(load, key=lambda server_id: (load[server_id], server_id))

    async def _claim(self, row: AppRow, for_server: Optional[str] = None) -> bool:
        """CAS the app to ``for_server`` (default us); on our own win, load it."""
        owner = for_server or self.server_id
        epoch = await self.store.claim_app(row.name, owner, row.epoch)
        if epoch is None:
            log.info("app %s: lost the claim race at epoch %d", row.name, row.epoch)
            return False
        self._orphan_seen.pop(row.name, None)
        log.info("app %s: claimed for %s at epoch %d (was %s)", row.name, owner, epoch, row.owner)
        if owner == self.server_id:
            self.owned[row.name] = epoch
            try:
                await self._on_gained(row.name, epoch, row.owner)
            except BaseException:
                # not recovered: let go of it here, so the next sync adopts it again and reloads
                self.owned.pop(row.name, None)
                await self._on_lost(row.name)
                raise
        return True

    async def _lose(self, app: str, why: str) -> None:
        self.owned.pop(app, None)
        log.warning("app %s: ownership lost by %s (%s)", app, self.server_id, why)
        await self._on_lost(app)

    async def route(self, app: str) -> tuple[str, str]:
        """Where a worker of ``app`` belongs: ("own", "") or ("redirect", address).

        An app that nobody (alive) owns is claimed for the least-loaded live server, which
        may be us; the CAS makes concurrent HELLOs at different servers agree on one owner.
        """
        for _ in range(5):
            if app in self.owned:
                return "own", ""
            async with self._sync_lock:  # claims never interleave with a sync pass
                row = await self.store.ensure_app(app)
                live = await self.live_servers()
                if row.owner == self.server_id:
                    await self._claim(row)  # adopt: it was assigned to us
                    continue
                if row.owner is not None and row.owner in live:
                    return "redirect", live[row.owner].address
                load = self._load_by_server(await self.store.list_apps(), live)
                await self._claim(row, for_server=self._least_loaded(load))
        raise StoreError(f"app {app}: ownership did not settle after 5 attempts")
