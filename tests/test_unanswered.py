"""A WAL write whose answer was lost still gets its fires run (the fire contract).

A claim can commit while its reply is lost, and then every retry fail (the database went away
right after the COMMIT). Found by three concurrent suites: a per-second fire was written,
never heard of, and never ran. In process on SQLite; the lost reply is the real claim's rows
withheld from the scheduler, as a cut connection would withhold them.
"""
from __future__ import annotations

import asyncio
from typing import Any

from harness import wait_until

from fastjob import Worker
from fastjob.server.app import FastJobServer, ServerConfig
from fastjob.store import StoreError


class LostReply:
    """A real store; the first claim that writes fires commits, then answers with an error."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.lost: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim_due(self, *args: Any, **kwargs: Any) -> Any:
        rows = await self._store.claim_due(*args, **kwargs)
        if rows and not self.lost:
            self.lost = [row.id for row in rows]
            raise StoreError("claim_due: database unavailable (the COMMIT's reply was lost)")
        return rows


async def test_fires_of_a_claim_whose_answer_was_lost_still_run(tmp_path):
    server = FastJobServer(ServerConfig(host="127.0.0.1", port=0, http_port=0, db=f"sqlite:///{tmp_path / 'u.db'}",
                                        heartbeat_interval=0.2, heartbeat_timeout=3.0, scan_horizon=1.0,
                                        second_level_threshold=0))
    store = server.store = LostReply(server.store)  # type: ignore[assignment]
    await server.start()
    ran: set[int] = set()
    worker = Worker(app="shop", servers=[server.address], reconnect_max=0.3)

    @worker.handler("tick")
    async def tick(ctx: Any) -> None:
        ran.add(ctx.instance_id)

    worker.schedule("tick", handler="tick", cron="* * * * * *")
    try:
        await worker.start(timeout=10)
        await wait_until(lambda: store.lost, 10, "a claim whose answer is lost")
        await wait_until(lambda: set(store.lost) <= ran, 10, f"the lost claim's fires {store.lost} to run")
    finally:
        await asyncio.wait_for(worker.stop(grace=0), 15)
        await asyncio.wait_for(server.stop(), 20)
