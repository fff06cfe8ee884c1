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


def reclaimed(server: Any, instance_id: int, worker_id: str) -> bool:
    """Has the server's log recorded sending the instance back to the worker that had it?"""
    return f"instance {instance_id}: reclaimed from worker {worker_id}" in server.log_path.read_text(errors="replace")


async def final_row(client: Worker, instance_id: int) -> Any:
    """The instance's row once its status is final; None before, or while the client reconnects."""
    try:
        row = await client.get_instance(instance_id)
    except Exception:
        return None
    return row if row["status"] not in ("waiting", "dispatched", "running") else None


async def test_a_fire_dispatched_just_before_the_owner_died_runs_once(servers, mysql_dsn):
    """kill -9 the owner while a job runs and its 'dispatched' status is still unwritten (a long
    status flush interval holds it back): the new owner recovers the fire as waiting, and gives
    it back to the worker running it (its log says so) instead of firing it anew, maybe on the
    idle worker."""
    args = [*REGULAR, "--status-flush-interval", "6"]
    s1 = await servers.start(mysql_dsn, *args)
    s2 = await servers.start(mysql_dsn, *args)
    by_address = {s1.address: s1, s2.address: s2}
    started: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    release = asyncio.Event()
    runs: collections.Counter[int] = collections.Counter()

    def make_worker(worker_id: str) -> Worker:
        worker = Worker(app="shop", servers=[s1.address, s2.address], worker_id=worker_id, reconnect_max=0.3)

        @worker.handler("slow")
        async def slow(ctx: Any) -> str:
            runs[ctx.instance_id] += 1
            started.put_nowait((worker_id, ctx.instance_id))
            await asyncio.wait_for(release.wait(), 60)
            return "done"

        worker.schedule("slow", routing="least_busy")
        return worker

    w1, w2 = make_worker("w1"), make_worker("w2")
    async with w1, w2:
        instance_id = await w1.trigger("slow")
        runner, started_id = await asyncio.wait_for(started.get(), 10)
        assert started_id == instance_id
        owner, epoch = app_row(mysql_dsn, "shop")
        assert (await w1.get_instance(instance_id))["status"] == "waiting"  # the status write is held back
        by_address[owner].kill()
        survivor = next(address for address in by_address if address != owner)
        await wait_until(lambda: app_row(mysql_dsn, "shop")[0] == survivor, 15, "the survivor to claim the app")
        assert app_row(mysql_dsn, "shop")[1] > epoch
        await wait_until(lambda: reclaimed(by_address[survivor], instance_id, runner), 15,
                         "the survivor to give the instance back to its runner")
        release.set()
        row = await wait_until(lambda: final_row(w1, instance_id), 60, "the instance to be final")
    assert row["status"] == "succeeded", row
    assert runs[instance_id] == 1, f"instance ran {runs[instance_id]} times"
    assert started.empty(), "a second copy started"


async def test_a_result_the_dead_owner_never_wrote_is_replayed_not_rerun(servers, mysql_dsn):
    """The worker finished an instance and sent its RESULT, but the owner died before writing any
    of its statuses: the worker names it in its next HELLO (`finished`) and the new owner takes
    the stored result from it.  The runner is then busy at max_concurrency=1, so a fire anew
    would have had to run on the other worker."""
    args = [*REGULAR, "--status-flush-interval", "6"]
    s1 = await servers.start(mysql_dsn, *args)
    s2 = await servers.start(mysql_dsn, *args)
    by_address = {s1.address: s1, s2.address: s2}
    runs: collections.Counter[int] = collections.Counter()
    ran_on: dict[int, str] = {}
    release = asyncio.Event()

    def make_worker(worker_id: str) -> Worker:
        worker = Worker(app="shop", servers=[s1.address, s2.address], worker_id=worker_id,
                        reconnect_max=0.3, max_concurrency=1, tags=[worker_id])

        @worker.handler("quick")
        async def quick(ctx: Any) -> str:
            runs[ctx.instance_id] += 1
            ran_on[ctx.instance_id] = worker_id
            return "quick result"

        @worker.handler("block")
        async def block(ctx: Any) -> None:
            await asyncio.wait_for(release.wait(), 60)

        worker.schedule("quick", routing="least_busy")
        worker.schedule("block_w1", handler="block", tags=["w1"])
        worker.schedule("block_w2", handler="block", tags=["w2"])
        return worker

    workers = {"w1": make_worker("w1"), "w2": make_worker("w2")}
    async with workers["w1"], workers["w2"]:
        client = workers["w1"]
        instance_id = await client.trigger("quick")
        await wait_until(lambda: any(instance_id in w._sent_results for w in workers.values()), 10,
                         "the worker to send the result")
        runner = ran_on[instance_id]
        assert (await client.get_instance(instance_id))["status"] == "waiting"  # nothing written yet
        await client.trigger(f"block_{runner}")  # the runner is now at max_concurrency
        await wait_until(lambda: len(workers[runner]._running) == 1, 10, "the runner to be busy")
        owner, _ = app_row(mysql_dsn, "shop")
        assert (await client.get_instance(instance_id))["status"] == "waiting", "flushed before the kill"
        by_address[owner].kill()
        survivor = next(address for address in by_address if address != owner)
        await wait_until(lambda: app_row(mysql_dsn, "shop")[0] == survivor, 15, "the survivor to claim the app")
        await wait_until(lambda: reclaimed(by_address[survivor], instance_id, runner), 15,
                         "the survivor to ask the runner for its result")
        row = await wait_until(lambda: final_row(client, instance_id), 30, "the instance to be final")
        release.set()
    assert row["status"] == "succeeded" and row["result"] == "quick result", row
    assert runs[instance_id] == 1, f"instance ran {runs[instance_id]} times"


async def test_an_owner_holding_fires_back_stops_without_releasing(servers, mysql_dsn):
    """The survivor of a kill -9 holds back the dead owner's overdue fire (no worker claims it);
    stopped cleanly (SIGTERM) during that grace, it must not release the app: a successor that
    found it released would hold nothing back.  The app stays owned, to expire like a crash."""
    args = [*REGULAR, "--heartbeat-timeout", "4", "--dispatch-wait", "60"]
    s1 = await servers.start(mysql_dsn, *args)
    s2 = await servers.start(mysql_dsn, *args)
    by_address = {s1.address: s1, s2.address: s2}
    client = Worker(app="shop", servers=[s1.address, s2.address], role="client", reconnect_max=0.3)
    async with client:
        await client.call("JOB_UPSERT", {"job": {"name": "nobody", "handler": "nobody", "schedule_type": "api"}})
        instance_id = await client.trigger("nobody")  # no worker: it waits in the owner's queue
        owner, epoch = app_row(mysql_dsn, "shop")
        by_address[owner].kill()
        survivor = next(address for address in by_address if address != owner)
        await wait_until(lambda: app_row(mysql_dsn, "shop")[0] == survivor, 20, "the survivor to claim the app")
        await wait_until(lambda: "recovered" in by_address[survivor].log_tail(200), 5, "the survivor to load the app")
        by_address[survivor].signal(signal.SIGTERM)
        assert await by_address[survivor].wait(15) == 0
    assert app_row(mysql_dsn, "shop")[0] == survivor, "released while holding a fire back"
    assert "stops without releasing" in by_address[survivor].log_tail(200)
    assert instance_id > 0 and epoch >= 1
