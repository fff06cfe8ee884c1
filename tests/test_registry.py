"""The worker registry says which workers may still run something of this server's.

A successor holds back the fires its dead predecessor may have sent until the workers recorded
with it re-attach or their run lease is out. So a worker that vanished (killed, cut off) stays
recorded until its run lease is surely over, and only a clean stop (DRAIN, nothing running)
takes it off at once. Found by three concurrent suites: the dying owner had unregistered its
just-killed worker, and its successor released a held fire at once.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from harness import ProcWorker, db_rows, wait_until

from fastjob.server.app import FastJobServer, ServerConfig

RUN_LEASE = 2.0


def _registered(db: str) -> list[str]:
    return [r[0] for r in db_rows(db, "SELECT worker_id FROM workers WHERE app = 'shop'")]


async def _gone(server: FastJobServer) -> None:
    await wait_until(lambda: not server.workers_of("shop"), 10, "the server to see the worker leave")


async def test_a_vanished_worker_stays_registered_for_its_run_lease_a_stopped_one_goes_at_once(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    server = FastJobServer(ServerConfig(host="127.0.0.1", port=0, http_port=0, db=db, heartbeat_interval=0.2,
                                        heartbeat_timeout=1.0, run_lease=RUN_LEASE))
    await server.start()
    conf: dict[str, Any] = {"app": "shop", "servers": [server.address], "ledger": str(tmp_path / "l.jsonl"),
                            "jobs": [{"name": "noop"}]}
    try:
        killed = await ProcWorker({**conf, "worker_id": "killed"}, tmp_path / "killed.log").start()
        killed.kill()
        await _gone(server)
        left_at = time.monotonic()
        await asyncio.sleep(0.3)  # the server had time to act on the disconnect
        assert _registered(db) == ["killed"], "a worker that may still run was unregistered at once"
        await wait_until(lambda: not _registered(db), RUN_LEASE + 5, "the killed worker's record to expire")
        assert time.monotonic() - left_at >= RUN_LEASE - 0.1

        stopped = await ProcWorker({**conf, "worker_id": "stopped"}, tmp_path / "stopped.log").start()
        await stopped.close()  # SIGTERM: DRAIN, then a clean goodbye
        await _gone(server)
        await wait_until(lambda: not _registered(db), RUN_LEASE / 2, "the stopped worker's record to go")
    finally:
        await asyncio.wait_for(server.stop(), 20)
