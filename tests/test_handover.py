"""Handing an app over, in process: one compare-and-set straight to the successor, only when clean.

A peer here is a server row that heartbeats (written by the test) with no process behind it, so
nothing adopts what is handed to it and the row shows exactly what the hand-over wrote.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from harness import wait_until

from fastjob import Worker
from fastjob.models import InstanceRow, Status
from fastjob.server.app import FastJobServer, ServerConfig
from fastjob.server.fires import Recovery
from fastjob.store import create_store


@pytest.fixture
async def server(tmp_path) -> AsyncIterator[FastJobServer]:
    srv = FastJobServer(ServerConfig(host="127.0.0.1", port=0, http_port=0, db=f"sqlite:///{tmp_path / 'h.db'}",
                                     heartbeat_interval=0.2, heartbeat_timeout=1.0, second_level_threshold=0))
    await srv.start()
    try:
        yield srv
    finally:
        await asyncio.wait_for(srv.stop(), 30)


async def _peer(db: str, server_id: str) -> asyncio.Task[None]:
    """A live-looking server row: heartbeats every 0.1 s until cancelled."""
    store = create_store(db)
    await store.open()
    await store.register_server(server_id, "127.0.0.1:1", time.time())

    async def beat() -> None:
        try:
            while True:
                await store.heartbeat_server(server_id, time.time(), 0.0)
                await asyncio.sleep(0.1)
        finally:
            await store.close()

    return asyncio.create_task(beat())


async def test_stop_hands_each_app_to_a_live_peer_in_one_cas(server: FastJobServer) -> None:
    worker = Worker(app="shop", servers=[server.address], reconnect_max=0.2)
    async with worker:
        me = server.cluster.server_id
        epoch = server.cluster.owned["shop"]
    peer = await _peer(server.config.db, "peer")
    try:
        await wait_until(lambda: server.cluster._judging(), 10, "the server to judge liveness")
        await asyncio.wait_for(server.stop(), 30)
        store = create_store(server.config.db)  # the server's own store is closed now
        await store.open()
        try:
            row = await store.get_app("shop")
            servers = [s.id for s in await store.list_servers()]
        finally:
            await store.close()
    finally:
        peer.cancel()
    assert row is not None
    assert (row.owner, row.epoch, row.prev_owner, row.left_clean, row.adopted) == ("peer", epoch + 1, me, True, False)
    assert me not in servers, "a server that let go of every app leaves the cluster"


async def test_hand_over_is_refused_while_a_fire_is_unresolved(server: FastJobServer) -> None:
    """An app whose previous owner's fires are not resolved yet cannot go clean: it stays ours."""
    worker = Worker(app="shop", servers=[server.address], reconnect_max=0.2)
    async with worker:
        rec_app = "shop"
        server.scheduler.recovery.apps[rec_app] = _unresolved(server.cluster.owned[rec_app])
        moved = await server.cluster.hand_over(rec_app, "peer", "test")
        assert not moved and rec_app in server.cluster.owned and rec_app not in server.scheduler.draining
        assert (await server.store.get_app(rec_app)).owner == server.cluster.server_id
        del server.scheduler.recovery.apps[rec_app]


def _unresolved(epoch: int) -> Recovery:
    """A recovery with a fire of the previous owner still held back."""
    rec = Recovery(epoch, {"w-gone"}, deadline=time.monotonic() + 60)
    rec.suspects[1] = InstanceRow(1, 1, "shop", 0, 1, Status.WAITING, "schedule", None, "dead", epoch - 1)
    return rec


async def test_hellos_racing_for_a_handed_app_adopt_it_once(tmp_path) -> None:
    """Two workers' HELLOs reach the successor of a hand-over together: it must load the app once.
    A second load, on top of live state, recovered a run that had just finished (its status not yet
    written) as lost, and ran it again (seen in bench_failover's join trials)."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    config = dict(host="127.0.0.1", port=0, http_port=0, db=db, heartbeat_interval=0.2, heartbeat_timeout=1.0)
    first, second = FastJobServer(ServerConfig(**config)), FastJobServer(ServerConfig(**config))
    await first.start()
    await second.start()
    try:
        worker = Worker(app="shop", servers=[first.address], reconnect_max=0.2)
        async with worker:
            assert "shop" in first.cluster.owned or "shop" in second.cluster.owned
        giver, taker = (first, second) if "shop" in first.cluster.owned else (second, first)
        epoch = giver.cluster.owned["shop"]
        assert await giver.cluster.hand_over("shop", taker.cluster.server_id, "test")
        gained: list[int] = []
        real = taker.scheduler.app_gained

        async def counted(app: str, at: int, origin: object) -> None:
            gained.append(at)
            await real(app, at, origin)  # type: ignore[arg-type]

        taker.scheduler.app_gained = counted  # type: ignore[method-assign]
        routes = await asyncio.gather(taker.cluster.route("shop"), taker.cluster.route("shop"))
        assert all(r.own for r in routes)
        assert gained == [epoch + 2], f"loaded at epochs {gained}: handed over at {epoch + 1}, adopted once"
        assert (await taker.store.get_app("shop")).epoch == epoch + 2
    finally:
        await asyncio.wait_for(first.stop(), 30)
        await asyncio.wait_for(second.stop(), 30)


async def test_a_stop_waits_for_an_app_being_loaded(server: FastJobServer) -> None:
    """SIGTERM while the app's WAL is being loaded (claimed, recovery not set up yet): the stop must
    wait for the load, so that it sees what the load holds back, rather than hand the app over as
    if nothing were unresolved (seen: a survivor released an app while a fire was held back)."""
    events: list[str] = []
    loading = asyncio.Event()
    proceed = asyncio.Event()
    real = server.scheduler.app_gained

    async def slow_gain(app: str, epoch: int, origin: object) -> None:
        events.append("load begins")
        loading.set()
        await proceed.wait()
        await real(app, epoch, origin)  # type: ignore[arg-type]
        events.append("load ends")

    real_hand_over = server.cluster.hand_over

    async def hand_over(app: str, to: object, why: str) -> bool:
        events.append("hand-over")
        return await real_hand_over(app, to, why)  # type: ignore[arg-type]

    server.scheduler.app_gained = slow_gain  # type: ignore[method-assign]
    server.cluster.hand_over = hand_over  # type: ignore[method-assign]
    claim = asyncio.create_task(server.cluster.route("shop"))
    await asyncio.wait_for(loading.wait(), 10)
    stop = asyncio.create_task(server.cluster.stop())
    await asyncio.sleep(0.2)  # the window in which a stop that does not wait would hand the app over
    proceed.set()
    await asyncio.wait_for(asyncio.gather(claim, stop), 20)
    assert events == ["load begins", "load ends", "hand-over"], events
