"""Ownership rules in one process: two servers' Cluster objects share one memory store, in fake time.

The lease: a server sends fires only while its last heartbeat is younger than the timeout (less
a margin), so a server that stops heartbeating (frozen, cut off from the database) has stopped
sending before anyone may take its apps. A survivor takes a dead owner's app only once that
owner's heartbeat is older than the timeout and it has itself been in touch with the database
long enough for a live owner to have renewed. test_failover checks the same end to end.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from fastjob.server.cluster import RENEW_SLACK, Cluster, Origin
from fastjob.store import Store, create_store
from fastjob.tasks import cancel_and_wait
from fastjob.testing import FakeClock

pytestmark = pytest.mark.rules

INTERVAL, TIMEOUT = 1.0, 6.0
APP = "billing"


class Node:
    """One server's Cluster, recording what it gained and lost."""

    def __init__(self, name: str, store: Store, clock: FakeClock) -> None:
        self.gained: list[tuple[str, int, Origin]] = []
        self.lost: list[str] = []
        self.cluster = Cluster(store, name, f"{name}:1", INTERVAL, TIMEOUT, self._gained, self._lost,
                               self._drain, lambda app: None, dict, clock=clock)

    async def _gained(self, app: str, epoch: int, origin: Origin) -> None:
        self.gained.append((app, epoch, origin))

    async def _lost(self, app: str) -> None:
        self.lost.append(app)

    async def _drain(self, app: str) -> bool:
        return True


@pytest.fixture
async def world() -> AsyncIterator[tuple[FakeClock, Node, Node]]:
    clock = FakeClock()
    url = f"memory://cluster-{uuid.uuid4().hex}"
    stores = [create_store(url), create_store(url)]
    for store in stores:
        await store.open()
    a, b = Node("a", stores[0], clock), Node("b", stores[1], clock)
    try:
        yield clock, a, b
    finally:
        for node in (a, b):
            await cancel_and_wait(node.cluster._task, 5.0, "the heartbeat loop")  # real time: never woke
        for store in stores:
            await store.close()


async def heartbeats(clock: FakeClock, nodes: list[Node], seconds: float) -> None:
    """Let ``seconds`` pass, each node renewing once an interval (as its heartbeat loop would)."""
    for _ in range(round(seconds / INTERVAL)):
        await clock.advance(INTERVAL)
        for node in nodes:
            await node.cluster.renew()


async def test_the_lease_lasts_a_timeout_less_a_margin_from_the_last_renewal(world) -> None:
    clock, a, _ = world
    await a.cluster.start()
    await a.cluster.renew()
    margin = min(INTERVAL, TIMEOUT / 4)
    await clock.advance(TIMEOUT - margin - 0.01)
    assert a.cluster.lease_valid()
    await clock.advance(0.02)
    assert not a.cluster.lease_valid(), "no renewal for timeout - margin: nothing may be sent"
    await a.cluster.renew()
    assert a.cluster.lease_valid()


async def test_a_silent_owner_has_stopped_sending_before_its_app_is_taken(world) -> None:
    clock, a, b = world
    await a.cluster.start()
    assert (await a.cluster.route(APP)).own
    await b.cluster.start()
    assert not (await b.cluster.route(APP)).own
    await heartbeats(clock, [a, b], 5 * INTERVAL)
    # a freezes: no more heartbeats; b goes on
    taken_at = None
    for step in range(40):
        await heartbeats(clock, [b], INTERVAL)
        if APP in b.cluster.owned:
            taken_at = step + 1
            break
        assert a.cluster.owns(APP) and APP not in b.cluster.owned
    assert taken_at is not None, "the survivor takes the app"
    assert taken_at * INTERVAL >= TIMEOUT, "not before the owner's heartbeat is older than the timeout"
    assert not a.cluster.lease_valid(), "the frozen owner's lease ran out before the takeover"
    app, epoch, origin = b.gained[-1]
    assert (app, origin.prev_owner, origin.left_clean) == (APP, "a", False)
    # a wakes: its next renewal finds the app gone and drops it
    await a.cluster.renew()
    assert APP not in a.cluster.owned and a.lost == [APP]


async def test_a_survivor_just_back_in_touch_with_the_database_judges_no_one(world) -> None:
    clock, a, b = world
    await a.cluster.start()
    assert (await a.cluster.route(APP)).own
    await b.cluster.start()
    await heartbeats(clock, [a, b], 3 * INTERVAL)
    b.cluster._db_up_since = None  # b lost the database; a heartbeats on
    await heartbeats(clock, [a], 2 * TIMEOUT)
    await clock.advance(2 * TIMEOUT)  # now a falls silent too, long past the timeout
    await b.cluster.renew()  # b's database is back: a looks long dead, but b may not judge yet
    assert APP not in b.cluster.owned
    await heartbeats(clock, [b], 2 * INTERVAL + RENEW_SLACK + INTERVAL)
    assert APP in b.cluster.owned, "after two intervals and the slack, it judges"
