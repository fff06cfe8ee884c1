"""Lock-free HA with real server processes: redirects, a database restart, a survivor that must hold back.

Faults that move apps (kill -9, SIGSTOP, SIGTERM, a join, a drain, an outage) are in
test_failover.py; this module keeps the ownership rules that need no worker ledger, and the
database restart, which runs on a private MariaDB so that no other test run is disturbed.
"""
from __future__ import annotations

import asyncio
import signal
import time

import pytest
from harness import FAST_CLUSTER_ARGS, ProcWorker, app_row, db_rows, instance_rows, wait_until
from ledger import Ledger, assert_each_ran_once, assert_final_records, last_attempts, per_second

from fastjob import Worker

pytestmark = pytest.mark.mysql

REGULAR = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0", "--scan-horizon", "2"]


async def test_workers_are_redirected_to_the_one_owner(servers, mysql_dsn):
    s1 = await servers.start(mysql_dsn, *REGULAR)
    s2 = await servers.start(mysql_dsn, *REGULAR)
    w1 = Worker(app="shop", servers=[s1.address], worker_id="w1")
    w2 = Worker(app="shop", servers=[s2.address], worker_id="w2")
    async with w1, w2:
        owner, epoch = app_row(mysql_dsn, "shop")
        assert w1.server_id == w2.server_id == owner
        # one claim, plus one adoption when the claim assigned the app to the other server
        assert epoch in (1, 2), f"the app changed hands {epoch} times"
        registered = {r[0]: r[1] for r in db_rows(mysql_dsn, "SELECT worker_id, server FROM workers WHERE app = ?",
                                                    ("shop",))}
        assert registered == {"w1": owner, "w2": owner}


async def test_server_survives_a_database_restart(servers, private_mariadb, tmp_path):
    """MariaDB (a private one) restarts under a running server: it keeps serving, keeps its app at
    the same epoch (nobody else could have taken it), and every fire runs once."""
    dsn = private_mariadb.dsn + "?retry_total=2"
    server = await servers.start(dsn, *REGULAR, "--misfire-threshold", "60")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    worker = await ProcWorker({"app": "shop", "servers": [server.address], "worker_id": "w1",
                               "ledger": str(ledger.path), "jobs": [{"name": "tick", "cron": "* * * * * *"}]},
                              tmp_path / "w1.log").start()
    try:
        await wait_until(lambda: len(ledger.runs("tick")) >= 3, 15, "ticks before the restart")
        _, epoch = app_row(private_mariadb.dsn, "shop")
        await asyncio.to_thread(private_mariadb.restart)
        back = time.time()
        await wait_until(lambda: sum(1 for r in ledger.runs("tick") if r.start > back + 1) >= 3, 30,
                         "ticks after the restart")
        planned = per_second(min(r.planned_ms for r in ledger.runs("tick")), int((time.time() - 2) * 1000))

        def settled() -> object:
            rows = instance_rows(private_mariadb.dsn, "shop", "tick")
            last = last_attempts(rows)
            return rows if all(t in last and last[t]["status"] == "succeeded" for t in planned) else None

        rows = await wait_until(settled, 30, "every fire to be final")
        assert_each_ran_once(ledger.runs("tick"), planned)
        assert_final_records(rows, planned)
        assert server.running, "the server must survive its database going away"
        assert app_row(private_mariadb.dsn, "shop") == (server.address, epoch)
    finally:
        await worker.close()


async def test_a_survivor_holding_fires_back_stops_without_letting_go(servers, mysql_dsn, tmp_path):
    """kill -9 the owner AND its only worker: the survivor must hold back the fire the dead owner may
    have sent to that worker (it may still run it) until the worker's run lease is surely over.
    Stopped cleanly (SIGTERM) meanwhile, it must not hand the app over or release it: a successor
    that found it released would hold nothing back. The app stays owned, to expire like a crash."""
    args = [*REGULAR, "--heartbeat-timeout", "4", "--run-lease", "30", "--status-flush-interval", "6"]
    s1 = await servers.start(mysql_dsn, *args)
    s2 = await servers.start(mysql_dsn, *args)
    by_address = {s1.address: s1, s2.address: s2}
    ledger = Ledger(tmp_path / "ledger.jsonl")
    worker = await ProcWorker({"app": "shop", "servers": list(by_address), "worker_id": "w1",
                               "ledger": str(ledger.path), "jobs": [{"name": "long", "hold": 30}]},
                              tmp_path / "w1.log").start()
    client = Worker(app="shop", servers=list(by_address), role="client", reconnect_max=0.3)
    try:
        async with client:
            await client.trigger("long")
            await wait_until(lambda: ledger.runs("long"), 10, "the run to start")
        owner, epoch = app_row(mysql_dsn, "shop")
        worker.kill()
        by_address[owner].kill()
        survivor = next(address for address in by_address if address != owner)
        await wait_until(lambda: app_row(mysql_dsn, "shop")[0] == survivor, 20, "the survivor to claim the app")
        await wait_until(lambda: instance_rows(mysql_dsn, "shop", "long"), 5, "the row")
        by_address[survivor].signal(signal.SIGTERM)
        assert await by_address[survivor].wait(15) == 0
        rows = instance_rows(mysql_dsn, "shop", "long")
    finally:
        await worker.close()
    assert app_row(mysql_dsn, "shop")[0] == survivor, "let go of the app while holding a fire back"
    assert [(r["status"], r["attempt"]) for r in rows] == [("waiting", 1)], rows
    assert app_row(mysql_dsn, "shop")[1] == epoch + 1
