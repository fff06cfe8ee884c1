"""Lock-free HA with real server processes on one MariaDB: redirects, takeover after kill -9, a frozen owner."""
from __future__ import annotations

import asyncio
import collections
import signal
from typing import Any

from fastjob import Worker
from harness import FAST_CLUSTER_ARGS, past_fires_final, restart_mariadb, ticking_worker, wait_until
from conftest import _admin_connect

REGULAR = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0", "--scan-horizon", "2"]


def app_row(dsn: str, app: str) -> tuple[Any, Any]:
    conn = _admin_connect(dsn)
    db = dsn.rsplit("/", 1)[1]
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT owner, epoch FROM `{db}`.apps WHERE name = %s", (app,))
            return cur.fetchone()
    finally:
        conn.close()


async def test_workers_are_redirected_to_the_one_owner(servers, mysql_dsn):
    s1 = await servers.start(mysql_dsn, *REGULAR)
    s2 = await servers.start(mysql_dsn, *REGULAR)
    w1 = Worker(app="shop", servers=[s1.address], worker_id="w1")
    w2 = Worker(app="shop", servers=[s2.address], worker_id="w2")
    async with w1, w2:
        owner, epoch = app_row(mysql_dsn, "shop")
        assert w1.server_id == w2.server_id == owner
        assert epoch >= 1


async def two_servers_and_a_ticking_worker(servers, dsn: str):
    """Two servers on one database and a started worker whose 'tick' job counts each instance's runs."""
    s1 = await servers.start(dsn, *REGULAR)
    s2 = await servers.start(dsn, *REGULAR)
    executions: collections.Counter[int] = collections.Counter()
    worker = ticking_worker([s1.address, s2.address], executions)
    await worker.start()
    return {s1.address: s1, s2.address: s2}, executions, worker


async def test_survivor_takes_over_a_killed_owner_and_fires_its_wal(servers, mysql_dsn):
    by_address, executions, worker = await two_servers_and_a_ticking_worker(servers, mysql_dsn)
    try:
        await wait_until(lambda: sum(executions.values()) >= 3, 10, "ticks on the first owner")
        owner, epoch = app_row(mysql_dsn, "shop")
        by_address[owner].kill()
        survivor = next(address for address in by_address if address != owner)
        before = sum(executions.values())
        await wait_until(lambda: app_row(mysql_dsn, "shop")[0] == survivor, 10, "the survivor to claim the app")
        assert app_row(mysql_dsn, "shop")[1] > epoch
        await wait_until(lambda: sum(executions.values()) >= before + 5, 15, "ticks on the survivor")
        rows = await wait_until(lambda: past_fires_final(worker), 15, "every past fire to be final")
    finally:
        await worker.stop()
    assert_each_fire_once(executions, rows)


def assert_each_fire_once(executions: collections.Counter[int], rows: list[dict[str, Any]]) -> None:
    assert all(n == 1 for n in executions.values()), "an instance ran twice"
    assert len({(r["planned_ms"], r["attempt"]) for r in rows}) == len(rows), "a fire was recorded twice"


async def test_a_frozen_owner_wakes_up_fenced(servers, mysql_dsn):
    """SIGSTOP the owner past the timeout: the survivor takes over; after SIGCONT nothing fires twice."""
    by_address, executions, worker = await two_servers_and_a_ticking_worker(servers, mysql_dsn)
    frozen = None
    try:
        await wait_until(lambda: sum(executions.values()) >= 3, 10, "ticks on the first owner")
        owner, _ = app_row(mysql_dsn, "shop")
        frozen = by_address[owner]
        frozen.signal(signal.SIGSTOP)
        survivor = next(address for address in by_address if address != owner)
        await wait_until(lambda: app_row(mysql_dsn, "shop")[0] == survivor, 10, "the takeover")
        frozen.signal(signal.SIGCONT)
        before = sum(executions.values())
        await wait_until(lambda: sum(executions.values()) >= before + 10, 15, "ticks after the wake-up")
        rows = await wait_until(lambda: past_fires_final(worker), 15, "every past fire to be final")
        assert app_row(mysql_dsn, "shop")[0] == survivor, "the woken server must not take the app back"
    finally:
        if frozen is not None:
            frozen.signal(signal.SIGCONT)
        await worker.stop()
    assert_each_fire_once(executions, rows)


async def test_server_survives_a_database_restart(servers, mysql_dsn):
    """MariaDB restarts under a running server: it keeps serving, and every fire still ends once."""
    server = await servers.start(mysql_dsn, *REGULAR)
    executions: collections.Counter[int] = collections.Counter()
    worker = ticking_worker([server.address], executions, interval=0.3)
    await worker.start()
    try:
        await wait_until(lambda: sum(executions.values()) >= 3, 10, "ticks before the restart")
        await asyncio.to_thread(restart_mariadb)
        after = sum(executions.values())
        await wait_until(lambda: sum(executions.values()) >= after + 5, 30, "ticks after the restart")
        rows = await wait_until(lambda: past_fires_final(worker), 30, "every past fire to be final")
    finally:
        await worker.stop()
    assert server.running, "the server must survive its database going away"
    assert_each_fire_once(executions, rows)
