"""Cluster membership and app ownership, synchronised through the database, without locks.

Every server heartbeats its row in ``servers``. Each AppName is owned by one server at a
time, recorded as (owner, epoch) in ``apps``; claiming is a compare-and-set on the epoch, so
of several servers racing for an app exactly one wins and the others see a moved epoch.

Fencing has two layers. The store refuses scheduling writes from a server that no longer
owns the app at its epoch. And a server treats its ownership as a lease: it dispatches only
while its own last successful heartbeat is younger than the timeout minus a margin, so a
server that was frozen (SIGSTOP, a cut network) wakes with a stale lease, re-reads its
epochs, and drops the apps it lost before firing anything.

Liveness is judged only by a server that has itself been in touch with the database for a
while: after an outage everyone shared, every heartbeat is old, and a server that judged at
once would take everyone's apps. A server keeps its apps through its own outage (it sends
nothing meanwhile: its lease is stale) and finds out when the database is back whether
someone took them.

Apps move cleanly too: a server that stops, is asked to drain, or owns more than its share
when another server joins hands an app over: it stops sending the app's fires, writes
everything, and sets the new owner in one compare-and-set, so no third server can race in.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..clock import SYSTEM_CLOCK, Clock
from ..store import AppRow, OwnershipChange, ServerRow, Store, StoreError

log = logging.getLogger("fastjob.cluster")

#: Slack for a peer's heartbeat after the database comes back: its store retries back off up to 1 s.
RENEW_SLACK = 1.0
#: A server that owns more than another by this factor of an app's weight gives the app away;
#: less, and apps would move back and forth as fire rates wander.
REBALANCE_FACTOR = 0.75
#: EWMA weight of the newest fire-rate sample (one per heartbeat).
RATE_SMOOTHING = 0.2


@dataclass(frozen=True, slots=True)
class Origin:
    """How an app came to us: what its previous owner may have left unwritten."""

    prev_owner: str | None
    left_clean: bool  # released or handed over with everything written
    prev_last_heartbeat: float | None  # wall clock; None when unknown


AppGained = Callable[[str, int, Origin], Awaitable[None]]
AppLost = Callable[[str], Awaitable[None]]
AppDrain = Callable[[str], Awaitable[bool]]  # stop sending the app's fires, write everything; clean?
AppUndrain = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a worker of an app belongs."""

    own: bool
    address: str = ""  # the owner, when not us
    retry_in: float | None = None  # the owner looks dead: its lease runs out in this many seconds


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
        on_drain: AppDrain,
        on_undrain: AppUndrain,
        fire_rates: Callable[[], dict[str, float]],
        clock: Clock = SYSTEM_CLOCK,
        changes: collections.Counter[str] | None = None,
    ) -> None:
        self.store = store
        #: ownership changes this server made, by kind (claimed, takeover, handed over, ...): metrics
        self.changes: collections.Counter[str] = changes if changes is not None else collections.Counter()
        self.clock = clock  # monotonic: leases and judging; wall: heartbeats stored for peers
        self.server_id = server_id
        self.address = address
        self.http_address = ""  # of our admin API, set before start(): peers forward requests there
        #: (event, app, a key every server agrees on, text): a cluster alarm (takeover, no_owner)
        self.alarm: Callable[[str, str, str, str], None] = lambda event, app, key, text: None
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        self.owned: dict[str, int] = {}  # app -> epoch we hold it at
        self._on_gained = on_gained
        self._on_lost = on_lost
        self._on_drain = on_drain
        self._on_undrain = on_undrain
        self._fire_rates = fire_rates
        self._rates: dict[str, float] = {}  # app -> smoothed fires per second
        self._gained_at: dict[str, float] = {}  # app -> monotonic time we gained it
        self._last_heartbeat_ok = -1e18  # monotonic time of the last successful heartbeat
        self._lease_until = -1e18  # monotonic time at which the lease it earned goes stale
        self._db_up_since: float | None = None  # monotonic time since when every database call succeeded
        self._started_at = 0.0
        self._orphan_seen: dict[str, float] = {}  # app -> monotonic time we first saw it ownerless
        self._previous_heartbeat: float | None = None  # of our previous incarnation (a restart)
        self._ever_owned: set[str] = set()
        self._fenced: dict[str, float | None] = {}  # dead server -> the heartbeat we fenced it at
        self.draining = False  # handing every app over: claims nothing
        self._task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()  # one ownership pass at a time (in-process only)
        self.synced = asyncio.Event()  # set after each successful sync; the lease waits on it

    # ---- lease --------------------------------------------------------------------------
    def lease_valid(self) -> bool:
        """True while our last successful heartbeat is younger than timeout minus a margin
        (asked for every fire: the deadline is worked out when the lease is renewed)."""
        return self.clock.monotonic() < self._lease_until

    def _renewed(self, sent_at: float) -> None:
        self._last_heartbeat_ok = sent_at
        self._lease_until = sent_at + self.timeout - min(self.interval, self.timeout / 4)

    def owns(self, app: str, epoch: int | None = None) -> bool:
        held = self.owned.get(app)
        return held is not None and (epoch is None or held == epoch)

    def load(self) -> float:
        """The weight of the apps we own: 1 each, plus their recent fires per second."""
        return sum(1.0 + self._rates.get(app, 0.0) for app in self.owned)

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        mine = [s for s in await self.store.list_servers() if s.id == self.server_id]
        self._previous_heartbeat = mine[0].heartbeat_at if mine else None
        await self.store.register_server(self.server_id, self.address, self.clock.wall(), self.http_address)
        self._started_at = self.clock.monotonic()
        self._renewed(self._started_at)
        self._db_up_since = self.clock.monotonic()
        await self.sync()
        self._task = asyncio.create_task(self._heartbeat_loop(), name="fastjob-cluster")

    async def stop(self) -> None:
        """Hand every app over to a live peer (or release it) and leave the cluster.

        An app that cannot go cleanly (statuses unwritten, fires of a previous owner
        unresolved) is left to expire as if we had crashed, so its successor holds back what
        we might have sent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=10)
            self._task = None
        async with self._sync_lock:  # an app being claimed and loaded is let go only once loaded
            try:
                live = await self.live_servers()
            except StoreError:
                live = {}
            for app in list(self.owned):
                await self.hand_over(app, self._successor(live), "server stopping")
        if self.owned:
            log.warning("server %s stops without letting go of apps %s: they expire after the heartbeat timeout",
                        self.server_id, sorted(self.owned))
            self.owned.clear()
            return
        try:
            await self.store.remove_server(self.server_id)
        except StoreError as exc:
            log.warning("server %s could not remove its row: %s", self.server_id, exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.renew()
            except StoreError as exc:
                self._db_up_since = None
                log.warning("server %s heartbeat failed (apps kept; nothing is sent while the lease is stale): %s",
                            self.server_id, exc)
            except Exception:  # keep heartbeating whatever a callback did
                log.exception("server %s: error in cluster loop", self.server_id)

    async def renew(self) -> None:
        """Heartbeat, then re-read epochs; the lease is renewed only once the epochs are known.

        The lease counts from when the heartbeat was sent, and is granted after ``sync`` has
        dropped any app we lost, so no stale fire can slip out while the epochs are read.
        """
        sent_at = self.clock.monotonic()
        now = self.clock.wall()
        self._update_rates()
        try:
            if not await self.store.heartbeat_server(self.server_id, now, self.load()):
                await self.store.register_server(self.server_id, self.address, now, self.http_address)
        except StoreError:
            self._db_up_since = None
            raise
        if self._db_up_since is None:
            # from when the database answered, not from when we asked: a call retried through
            # an outage was sent before it, and peers have had no time to renew since
            self._db_up_since = self.clock.monotonic()
        await self.sync()
        self._renewed(sent_at)

    def _update_rates(self) -> None:
        for app, rate in self._fire_rates().items():
            old = self._rates.get(app, rate)
            self._rates[app] = old + RATE_SMOOTHING * (rate - old)
        for app in list(self._rates):
            if app not in self.owned:
                del self._rates[app]

    # ---- liveness -------------------------------------------------------------------------
    def _judging(self) -> bool:
        """May we call a peer dead? Only after we have seen the database long enough for a live
        peer to have renewed its heartbeat (two intervals, and the slack of its retries)."""
        if self._db_up_since is None:
            return False
        return self.clock.monotonic() - self._db_up_since > 2 * self.interval + RENEW_SLACK

    def _alive(self, server: ServerRow, now: float) -> bool:
        return server.id == self.server_id or now - server.heartbeat_at < self.timeout or not self._judging()

    async def live_servers(self) -> dict[str, ServerRow]:
        now = self.clock.wall()
        return {s.id: s for s in await self.store.list_servers() if self._alive(s, now)}

    # ---- ownership ----------------------------------------------------------------------
    async def sync(self) -> None:
        """One pass: drop apps we lost, adopt apps assigned to us, take over orphaned apps, balance."""
        async with self._sync_lock:
            try:
                servers = {s.id: s for s in await self.store.list_servers()}
                apps = await self.store.list_apps()
            except StoreError:
                self._db_up_since = None
                raise
            now = self.clock.wall()
            live = {sid: s for sid, s in servers.items() if self._alive(s, now)}
            me = servers.get(self.server_id)
            await self._follow_drain_request(me is not None and me.drain)
            load = self._load_by_server(apps, live)
            for row in apps:
                held = self.owned.get(row.name)
                if held is not None and row.epoch < held:
                    continue  # a snapshot older than a claim made meanwhile by route()
                if held is not None and (row.owner != self.server_id or row.epoch != held):
                    await self._lose(row.name, f"now owned by {row.owner} at epoch {row.epoch}")
                    continue
                if held is None and row.owner == self.server_id:
                    await self._claim(row, servers)  # assigned to us by another server, or ours before a restart
                elif row.owner is None or row.owner not in live:
                    first_seen = self._orphan_seen.setdefault(row.name, self.clock.monotonic())
                    orphaned_for = self.clock.monotonic() - first_seen
                    if self.draining:  # we may not take it: if nobody does, say so (once per epoch, cluster-wide)
                        if orphaned_for > 2 * self.timeout:
                            self.alarm("no_owner", row.name, str(row.epoch),
                                       f"app {row.name} has had no live owner for {orphaned_for:.0f}s")
                        continue
                    preferred = self._least_loaded(load, live) == self.server_id
                    if (preferred or orphaned_for > 2 * self.timeout) and await self._claim(row, servers):
                        load[self.server_id] = load.get(self.server_id, 0) + 1
                else:
                    self._orphan_seen.pop(row.name, None)
            self.synced.set()
            await self._rebalance(live)

    def _load_by_server(self, apps: list[AppRow], live: dict[str, ServerRow]) -> dict[str, float]:
        """Each live server's weight: the load it reported, or its app count if it reported none."""
        counts = {server_id: 0 for server_id in live}
        for row in apps:
            if row.owner in counts:
                counts[row.owner] += 1
        load = {sid: max(float(counts[sid]), live[sid].load_score) for sid in live}
        load[self.server_id] = self.load()
        return load

    def _least_loaded(self, load: dict[str, float], live: dict[str, ServerRow]) -> str:
        """The server that should take a new app: the least loaded that is not draining."""
        willing = {sid: w for sid, w in load.items() if not (sid in live and live[sid].drain)
                   and not (sid == self.server_id and self.draining)}
        if not willing:
            return self.server_id
        return min(willing, key=lambda server_id: (willing[server_id], server_id))

    def _origin(self, row: AppRow, servers: dict[str, ServerRow]) -> Origin:
        """What the app's row says about how its owner before us let go of it."""
        prev: str | None
        if row.owner is not None and row.owner != self.server_id:  # a takeover from a dead owner
            prev, clean = row.owner, False
        elif row.owner == self.server_id and row.adopted:  # ours before: a restart, or dropped by us
            prev, clean = self.server_id, False
        else:  # released, or assigned/handed to us and not loaded yet
            prev, clean = row.prev_owner, row.left_clean
        if prev == self.server_id:
            last = self._previous_heartbeat if row.name not in self._ever_owned else self.clock.wall()
        else:
            last = servers[prev].heartbeat_at if prev in servers else None
        return Origin(prev, clean, last)

    async def _claim(self, row: AppRow, servers: dict[str, ServerRow], for_server: str | None = None) -> bool:
        """CAS the app to ``for_server`` (default us); on our own win, load it."""
        owner = for_server or self.server_id
        if owner == self.server_id and row.name in self.owned:
            return True  # ours already: a second load would work from rows our own writes have not reached
        origin = self._origin(row, servers)
        if row.owner is not None and row.owner != self.server_id:
            await self._fence(row.owner, servers.get(row.owner))
        epoch = await self.store.claim_app(row.name, owner, row.epoch, prev_owner=origin.prev_owner,
                                           left_clean=origin.left_clean, adopted=owner == self.server_id)
        if epoch is None:
            log.info("app %s: lost the claim race at epoch %d", row.name, row.epoch)
            return False
        self._orphan_seen.pop(row.name, None)
        log.info("app %s: claimed for %s at epoch %d (was %s)", row.name, owner, epoch, row.owner)
        await self._record(row.name, row.owner, owner, epoch, self._claim_reason(row, owner, servers))
        if owner == self.server_id:
            self.owned[row.name] = epoch
            self._ever_owned.add(row.name)
            self._gained_at[row.name] = self.clock.monotonic()
            try:
                await self._on_gained(row.name, epoch, origin)
            except BaseException:
                # not recovered: let go of it here, so the next sync adopts it again and reloads
                self.owned.pop(row.name, None)
                await self._on_lost(row.name)
                raise
        return True

    def _claim_reason(self, row: AppRow, owner: str, servers: dict[str, ServerRow]) -> str:
        if row.owner is None:
            return "claimed" if owner == self.server_id else f"assigned by {self.server_id}"
        if row.owner == owner:
            return "adopted" if row.prev_owner != owner else "restarted"
        return f"takeover: {row.owner} {'silent' if row.owner in servers else 'gone'}"

    async def _record(self, app: str, from_server: str | None, to_server: str | None, epoch: int,
                      reason: str) -> None:
        """Write the ownership history (GET /api/v1/cluster/history); a failure costs only the entry."""
        kind = reason.split(":")[0].split(" by ")[0]  # the kind, not who or why
        self.changes[kind] += 1
        if kind == "takeover":
            self.alarm("takeover", app, str(epoch), f"{to_server} took app {app} over from {from_server} ({reason})")
        try:
            await self.store.add_ownership_change(
                OwnershipChange(app, from_server, to_server, epoch, reason, self.clock.wall()))
        except StoreError as exc:
            log.warning("app %s: ownership change not recorded: %s", app, exc)

    async def _fence(self, dead: str, row: ServerRow | None) -> None:
        """End a dead owner's database sessions before taking its apps: if it froze inside a
        transaction, its locks would hold our claim. Once per heartbeat we judged it by."""
        seen = row.heartbeat_at if row is not None else None
        if dead in self._fenced and self._fenced[dead] == seen:
            return
        ended = await self.store.fence_server(dead)
        self._fenced[dead] = seen
        if ended:
            log.warning("server %s judged dead: ended its %d database session(s)", dead, ended)

    async def _lose(self, app: str, why: str) -> None:
        self.owned.pop(app, None)
        log.warning("app %s: ownership lost by %s (%s)", app, self.server_id, why)
        await self._on_lost(app)

    async def route(self, app: str) -> Route:
        """Where a worker of ``app`` belongs.

        An app that nobody (alive) owns is claimed for the least-loaded live server, which
        may be us; the CAS makes concurrent HELLOs at different servers agree on one owner.
        An owner whose heartbeat is late comes with the time its lease runs out, so that the
        worker comes back then instead of backing off further and further.
        """
        for _ in range(5):
            if app in self.owned:
                return Route(True)
            async with self._sync_lock:  # claims never interleave with a sync pass
                if app in self.owned:  # another HELLO claimed it while we waited for the lock
                    return Route(True)
                row = await self.store.ensure_app(app)
                servers = {s.id: s for s in await self.store.list_servers()}
                now = self.clock.wall()
                live = {sid: s for sid, s in servers.items() if self._alive(s, now)}
                if row.owner == self.server_id:
                    await self._claim(row, servers)  # adopt: it was assigned or handed to us
                    continue
                if row.owner is not None and row.owner in live:
                    owner = live[row.owner]
                    return Route(False, owner.address, self._retry_in(owner, now))
                load = self._load_by_server(await self.store.list_apps(), live)
                await self._claim(row, servers, for_server=self._least_loaded(load, live))
        raise StoreError(f"app {app}: ownership did not settle after 5 attempts")

    def _retry_in(self, owner: ServerRow, now: float) -> float | None:
        """Seconds until we would call a late owner dead (its lease has run out and we may judge),
        with a little jitter; None if it is not late."""
        age = now - owner.heartbeat_at
        if age <= 2 * self.interval:
            return None
        until_judging = 0.0
        if self._db_up_since is not None:
            until_judging = self._db_up_since + 2 * self.interval + RENEW_SLACK - self.clock.monotonic()
        return max(0.0, self.timeout - age, until_judging) + random.uniform(0.05, 0.05 + self.interval / 2)

    # ---- handing apps over ----------------------------------------------------------------------
    def _successor(self, live: dict[str, ServerRow] | None = None) -> str | None:
        """The live peer that should take an app we give away, or None (release it)."""
        peers = {sid: s for sid, s in (live or {}).items() if sid != self.server_id and not s.drain}
        if not peers:
            return None
        return min(peers, key=lambda sid: (peers[sid].load_score, sid))

    async def hand_over(self, app: str, to: str | None, why: str) -> bool:
        """Give the app to server ``to`` (None: release it) once everything about it is written.

        Our sessions of the app are then closed with ``not_owner``; the workers reconnect and
        are redirected to the new owner, which loads the app knowing nothing was left unwritten."""
        epoch = self.owned.get(app)
        if epoch is None:
            return False
        clean = await self._on_drain(app)
        if not clean:
            log.warning("app %s: not handed over (%s): statuses unwritten or fires of a previous owner unresolved",
                        app, why)
            self._on_undrain(app)
            return False
        try:
            if to is None:
                moved = app in await self.store.release_apps(self.server_id, [app])
            else:
                moved = await self.store.claim_app(app, to, epoch, prev_owner=self.server_id, left_clean=True,
                                                   adopted=False) is not None
        except StoreError as exc:
            log.warning("app %s: hand-over to %s failed: %s", app, to or "nobody", exc)
            self._on_undrain(app)
            return False
        if not moved:  # someone took it meanwhile: it was not ours any more
            await self._lose(app, "the hand-over found the epoch moved")
            return False
        self.owned.pop(app, None)
        log.info("app %s: handed over by %s to %s (%s)", app, self.server_id, to or "nobody (released)", why)
        await self._record(app, self.server_id, to, epoch + 1, f"{'handed over' if to else 'released'}: {why}")
        await self._on_lost(app)
        return True

    async def _follow_drain_request(self, requested: bool) -> None:
        """An operator set (or cleared) our drain flag: hand every app over (or take apps again)."""
        if requested != self.draining:
            self.draining = requested
            log.warning("server %s: drain %s", self.server_id, "requested: handing apps over" if requested
                        else "cleared: taking apps again")
        if requested and self.owned and self._judging():
            live = await self.live_servers()
            for app in list(self.owned):
                await self.hand_over(app, self._successor(live), "drain requested")

    async def _rebalance(self, live: dict[str, ServerRow]) -> None:
        """Give one app to the least-loaded peer when we carry clearly more than it (a server joined)."""
        if self.draining or not self._judging() or self.clock.monotonic() - self._started_at < 4 * self.interval:
            return
        to = self._successor(live)
        if to is None:
            return
        gap = self.load() - live[to].load_score
        cooldown = max(5.0, 20 * self.interval)
        movable = [(1.0 + self._rates.get(app, 0.0), app) for app in self.owned
                   if self.clock.monotonic() - self._gained_at.get(app, 0.0) > cooldown]
        fitting = [(weight, app) for weight, app in movable if weight <= REBALANCE_FACTOR * gap]
        if fitting:
            weight, app = max(fitting)
            await self.hand_over(app, to, f"balancing: load {self.load():.2f} vs {live[to].load_score:.2f}"
                                          f" on {to}, app weight {weight:.2f}")
