"""Fast re-attach: a worker redirected to an owner whose heartbeat is late comes back when that
owner's lease runs out, not after a backoff that kept growing while the owner looked alive.

Two servers in one process on one SQLite file. The owner "dies": its listener and heartbeat stop
and its connections drop, while its row stays (as after a kill -9).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from harness import wait_until

from fastjob import Worker
from fastjob.server.app import FastJobServer, ServerConfig

INTERVAL, TIMEOUT = 0.2, 2.0


def config(db: str) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, http_port=0, db=db, heartbeat_interval=INTERVAL,
                        heartbeat_timeout=TIMEOUT)


async def crash(server: FastJobServer) -> None:
    """Stop everything a dead process would stop, and write nothing (no hand-over, no release)."""
    assert server._listener is not None and server.cluster._task is not None
    server._listener.close()
    server.cluster._task.cancel()
    await asyncio.wait({server.cluster._task}, timeout=5)
    server.cluster._task = None
    for session in list(server.connections):
        session.transport.abort()  # type: ignore[union-attr]
    server.cluster.owned.clear()  # so that its own stop() later hands nothing over


async def test_a_redirect_to_a_late_owner_says_when_to_come_back(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    owner = FastJobServer(config(db))
    await owner.start()
    first = Worker(app="shop", servers=[owner.address], worker_id="w1", reconnect_max=0.3)
    await first.start()  # the only server: it takes the app
    other = FastJobServer(config(db))
    await other.start()
    second = Worker(app="shop", servers=[other.address], worker_id="w2", reconnect_min=20.0, reconnect_max=20.0)
    outcomes: list[Any] = []
    real_session = second._session

    async def recorded(address: str, patience: float) -> Any:
        outcome = await real_session(address, patience)
        outcomes.append((address, outcome))
        return outcome

    second._session = recorded  # type: ignore[method-assign]
    try:
        assert first.server_id == owner.cluster.server_id
        await crash(owner)
        last_beat = max(s.heartbeat_at for s in await other.store.list_servers() if s.id == owner.cluster.server_id)
        await wait_until(lambda: time.time() - last_beat > 3 * INTERVAL, 5, "the owner's heartbeat to be late")
        await second.start(timeout=TIMEOUT + 10)
        came_in = time.time()
    finally:
        await first.stop(grace=0)
        await second.stop(grace=0)
        await other.stop()
        await owner.stop()
    redirects = [o for _, o in outcomes if not isinstance(o, (str, type(None)))]
    assert redirects and redirects[0].address == owner.address, outcomes
    retry_in = redirects[0].retry_in
    assert retry_in is not None and 0 < retry_in <= TIMEOUT, outcomes
    assert second.server_id == other.cluster.server_id
    # It came back when the owner's lease ran out (the other server may judge it dead only then),
    # not after its 20 s reconnect backoff (at least 10 s with jitter): the backoff alone could not be in time.
    assert came_in - last_beat < TIMEOUT + 4.0, f"registered {came_in - last_beat:.2f}s after the last heartbeat"
