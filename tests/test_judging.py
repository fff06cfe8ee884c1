"""A server judges peers dead only after it has itself been in touch with the database for a
while, counted from when its contact came back, not from when a call that outlived the outage
was sent (found by three concurrent suites: a heartbeat retried through the outage made its
server judge a live peer at once and take its app).

In process, on SQLite; the outage is a heartbeat call held back, as a database that answers
only when it comes back would hold it.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from fastjob.server.cluster import Cluster
from fastjob.store import create_store

INTERVAL, TIMEOUT = 0.25, 1.5


class HeldHeartbeat:
    """A real store whose next heartbeat call waits until ``release`` is set."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.hold = False
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def heartbeat_server(self, *args: Any, **kwargs: Any) -> bool:
        if self.hold:
            self.hold = False
            self.held.set()
            await self.release.wait()
        return await self._store.heartbeat_server(*args, **kwargs)


async def _nothing(*args: Any) -> Any:
    return True


def _cluster(store: Any) -> Cluster:
    return Cluster(store, "me", "127.0.0.1:1", INTERVAL, TIMEOUT, _nothing, _nothing, _nothing,
                   lambda app: None, dict)


async def test_a_peer_is_judged_only_once_our_contact_has_lasted(tmp_path):
    store = create_store(f"sqlite:///{tmp_path / 'j.db'}")
    await store.open()
    held = HeldHeartbeat(store)
    cluster = _cluster(held)
    try:
        await store.register_server("peer", "127.0.0.1:2", time.time())
        await store.ensure_app("shop")
        assert await store.claim_app("shop", "peer", 0) is not None
        await cluster.start()
        assert cluster._task is not None
        cluster._task.cancel()  # this test drives the heartbeats itself
        loop = asyncio.get_running_loop()
        cluster._db_up_since = None  # our own heartbeat just failed: an outage everyone shares
        # A renew is sent during the outage and answered only when the database is back, two
        # timeouts later; the peer's heartbeat is that old by then, and its own renewal is still
        # in its retry backoff.
        held.hold = True
        renew = asyncio.create_task(cluster.renew())
        await asyncio.wait_for(held.held.wait(), 5)
        await store.heartbeat_server("peer", time.time() - 2 * TIMEOUT, 0.0)
        sent_at = loop.time()
        while loop.time() - sent_at < 2 * TIMEOUT:  # the outage lasts (the timer, not a sync point)
            await asyncio.sleep(0.05)
        held.release.set()
        await asyncio.wait_for(renew, 5)
        assert "shop" not in cluster.owned, "a peer was judged dead the moment our contact came back"
        # Once our contact has lasted and the peer still has not renewed, it is dead.
        await asyncio.wait_for(_until_owned(cluster, "shop"), 10)
    finally:
        await cluster.stop()
        await store.close()


async def _until_owned(cluster: Cluster, app: str) -> None:
    while app not in cluster.owned:
        await asyncio.sleep(INTERVAL)
        await cluster.renew()
