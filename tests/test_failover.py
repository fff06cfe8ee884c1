"""Failover keeps the fire contract: real server and worker processes on the real MariaDB.

Every test counts runs from the handlers' own ledger (tests/ledger.py), never from the rows a
UNIQUE key already guards: each planned fire in the window must have run exactly once (or,
after a worker's death, once more as a later attempt) and must have exactly one final record.
One short trial of each fault; bench/bench_failover.py repeats them and times them.
"""
from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from harness import (
    FAST_CLUSTER_ARGS,
    ProcWorker,
    app_row,
    db_rows,
    instance_rows,
    settled_rows,
    wait_until,
)
from ledger import (
    Ledger,
    assert_each_ran_once,
    assert_final_records,
    assert_no_overlap,
    per_second,
)
from tcp_proxy import TcpProxy

from fastjob import RemoteError

pytestmark = pytest.mark.mysql

# Regular path only (nothing handed down to a worker); a 1 s horizon; a long run lease, so that
# a test passes only if held-back fires are released when the workers re-attach, not by the lease.
ARGS = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0", "--run-lease", "20"]
TICK = {"name": "tick", "cron": "* * * * * *"}


class Scene:
    """Servers, worker processes and a ledger for one test."""

    def __init__(self, servers: Any, db: str, tmp_path: Path, args: list[str]) -> None:
        self.servers = servers
        self.db = db
        self.tmp_path = tmp_path
        self.args = args
        self.ledger = Ledger(tmp_path / "ledger.jsonl")
        self.workers: list[ProcWorker] = []
        self.by_address: dict[str, Any] = {}

    async def start_servers(self, n: int, *extra: str) -> list[Any]:
        started = [await self.servers.start(self.db, *self.args, *extra) for _ in range(n)]
        self.by_address.update({s.address: s for s in started})
        return started

    async def start_worker(self, worker_id: str, jobs: list[dict[str, Any]], app: str = "shop",
                           **config: Any) -> ProcWorker:
        conf = {"app": app, "servers": list(self.by_address), "worker_id": worker_id,
                "ledger": str(self.ledger.path), "jobs": jobs, **config}
        worker = ProcWorker(conf, self.tmp_path / f"{worker_id}.log")
        self.workers.append(worker)
        return await worker.start()

    def owner(self, app: str = "shop") -> tuple[Any, int]:
        owner, epoch = app_row(self.db, app)
        return self.by_address.get(owner), epoch

    async def runs_after(self, job: str, t: float, count: int, timeout: float = 20.0) -> None:
        await wait_until(lambda: sum(1 for r in self.ledger.runs(job) if r.start > t) >= count, timeout,
                         f"{count} runs of {job} after t={t:.1f}")

    async def settled(self, job: str, planned: list[int], app: str = "shop", timeout: float = 20.0) -> list[dict]:
        """The job's rows, once the last attempt of every planned fire is final."""
        return await wait_until(lambda: settled_rows(self.db, app, job, planned), timeout,
                                f"every planned fire of {job} to be final")

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()


@pytest.fixture
async def scene(servers, mysql_dsn, tmp_path):
    made: list[Scene] = []

    def make(args: list[str] = ARGS, db: str = mysql_dsn) -> Scene:
        made.append(Scene(servers, db, tmp_path, args))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            await s.close()


def window(scene: Scene, job: str, start_ms: int, end: float) -> list[int]:
    """The per-second planned times from the job's first run (at or after ``start_ms``) to ``end``."""
    first = min(r.planned_ms for r in scene.ledger.runs(job) if r.planned_ms >= start_ms)
    return per_second(first, int(end * 1000))


async def test_kill_9_of_the_owner_loses_no_fire(scene):
    """The survivor fires the dead owner's WAL (rows of its epoch), releases what the dead owner may
    have sent once the worker re-attached (not after the 20 s run lease), and runs each fire once.
    A 3 s horizon: the dead owner's WAL surely holds fires planned after the kill."""
    s = scene([*ARGS, "--scan-horizon", "3"])
    await s.start_servers(2)
    await s.start_worker("w1", [TICK])
    await s.runs_after("tick", 0, 3)
    owner, epoch = s.owner()
    owner.kill()
    killed_at = time.time()
    survivor = next(a for a, srv in s.by_address.items() if srv is not owner)
    await wait_until(lambda: app_row(s.db, "shop")[0] == survivor, 15, "the survivor to take the app")
    await s.runs_after("tick", killed_at + 3, 3)
    planned = window(s, "tick", 0, time.time() - 2)
    rows = await s.settled("tick", planned)
    assert_each_ran_once(s.ledger.runs("tick"), planned)
    assert_final_records(rows, planned)
    ran_at = {r.instance_id: r.start for r in s.ledger.runs("tick")}
    inherited = [r for r in rows if r["epoch"] == epoch and ran_at.get(r["id"], 0) > killed_at]
    assert inherited, "no row the dead owner wrote was fired by the survivor"
    assert app_row(s.db, "shop")[1] > epoch


async def test_owner_killed_then_successor_frozen(scene):
    """Issue case 1: kill -9 the owner, later SIGSTOP its successor past the timeout and SIGCONT it.
    No fire is dropped, none runs twice, none is skipped under the default policies."""
    s = scene()
    await s.start_servers(3)
    await s.start_worker("w1", [TICK, {"name": "slow", "cron": "*/2 * * * * *", "hold": 1.2}])
    await s.runs_after("tick", 0, 3)
    first, _ = s.owner()
    first.kill()
    await wait_until(lambda: s.owner()[0] not in (None, first), 15, "a successor")
    second, _ = s.owner()
    await s.runs_after("tick", time.time(), 2)
    second.signal(signal.SIGSTOP)
    await wait_until(lambda: s.owner()[0] not in (None, first, second), 15, "a third owner")
    second.signal(signal.SIGCONT)
    await s.runs_after("tick", time.time() + 2, 3)
    end = time.time() - 2
    for job in ("tick", "slow"):
        planned = window(s, job, 0, end)
        if job == "slow":
            planned = [t for t in planned if t // 1000 % 2 == 0]
        rows = await s.settled(job, planned, timeout=30)
        assert_each_ran_once(s.ledger.runs(job), planned)
        assert_final_records(rows, planned)
    assert_no_overlap(s.ledger.runs("slow"))


async def test_frozen_owner_wakes_fenced(scene):
    """SIGSTOP the owner past the timeout: the survivor takes over; after SIGCONT the woken server
    fires nothing it no longer owns, and does not take the app back."""
    s = scene()
    await s.start_servers(2)
    await s.start_worker("w1", [TICK])
    await s.runs_after("tick", 0, 3)
    frozen, _ = s.owner()
    frozen.signal(signal.SIGSTOP)
    try:
        await wait_until(lambda: s.owner()[0] not in (None, frozen), 15, "the takeover")
    finally:
        frozen.signal(signal.SIGCONT)
    woke = time.time()
    await s.runs_after("tick", woke + 2, 3)
    planned = window(s, "tick", 0, time.time() - 2)
    rows = await s.settled("tick", planned)
    assert_each_ran_once(s.ledger.runs("tick"), planned)
    assert_final_records(rows, planned)
    assert s.owner()[0] is not frozen, "the woken server took the app back"


async def test_database_outage_moves_no_app(scene, mysql_dsn, servers):
    """Issue case 6: three servers reach MariaDB through a proxy that is cut for twice the heartbeat
    timeout. No app changes owner or epoch when it comes back (no ping-pong), and every fire of
    both apps runs once (the misfire threshold is above the outage: nothing is a misfire)."""
    from urllib.parse import urlsplit

    parts = urlsplit(mysql_dsn)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 3306)
    await proxy.start()
    proxied = f"mysql://{parts.username or 'root'}@127.0.0.1:{proxy.port}{parts.path}?retry_total=2"
    s = scene([*ARGS, "--misfire-threshold", "30"], db=proxied)
    try:
        await s.start_servers(3)
        await s.start_worker("a1", [TICK], app="alpha")
        await s.start_worker("b1", [TICK], app="beta")
        await wait_until(lambda: len({r.worker for r in s.ledger.runs("tick")}) == 2, 15, "both apps ticking")
        before = {app: app_row(mysql_dsn, app) for app in ("alpha", "beta")}
        await proxy.cut("refuse")
        cut_at = time.time()
        await asyncio.sleep(3.0)  # the outage itself: twice the 1.5 s heartbeat timeout
        await proxy.restore()
        await wait_until(lambda: sum(1 for r in s.ledger.runs("tick") if r.start > cut_at + 6) >= 4, 30,
                         "both apps ticking after the outage")
        after = {app: app_row(mysql_dsn, app) for app in ("alpha", "beta")}
        assert after == before, f"apps moved after an outage everyone shared: {before} -> {after}"
        end = time.time() - 2
        for app, worker in (("alpha", "a1"), ("beta", "b1")):
            runs = [r for r in s.ledger.runs("tick") if r.worker == worker]
            planned = per_second(min(r.planned_ms for r in runs), int(end * 1000))
            rows = await wait_until(lambda app=app, planned=planned: settled_rows(mysql_dsn, app, "tick", planned),
                                    30, f"{app} settled")
            assert_each_ran_once(runs, planned)
            assert_final_records(rows, planned)
    finally:
        await proxy.restore()
        await proxy.close()


async def test_a_fire_sent_just_before_the_owner_died_goes_back_to_its_worker(scene):
    """kill -9 the owner while an instance runs and its 'dispatched' status is unwritten (a 6 s status
    flush holds it back): the survivor holds the fire until the worker re-attaches and names it,
    then gives it back; it runs once, on that worker, well before the 20 s run lease."""
    s = scene([*ARGS, "--status-flush-interval", "6"])
    await s.start_servers(2)
    long = {"name": "long", "hold": 4.0}
    # the runner comes back slowly (3 s), the idle worker at once: a fire sent anew would reach the idle one
    await s.start_worker("w1", [long], reconnect_min=3.0, reconnect_max=3.0)
    client = await _client(s)
    try:
        instance_id = await client.trigger("long")
        await wait_until(lambda: s.ledger.runs("long"), 10, "the run to start")
        runner = s.ledger.runs("long")[0].worker
        await s.start_worker("w2", [long])
        assert (await client.get_instance(instance_id))["status"] == "waiting"  # the status write is held back
        owner, _ = s.owner()
        owner.kill()
        killed_at = time.time()
        # the runner reconnects on a 3 s backoff, maybe to the dead server first; the status write waits 6 s
        row = await wait_until(lambda: _final_instance(client, instance_id), 40, "the instance to finish")
    finally:
        await client.stop()
    assert row["status"] == "succeeded" and row["worker"] == runner, row
    assert [r.worker for r in s.ledger.runs("long")] == [runner], "a second copy ran"
    assert row["finished_at"] - killed_at < 10, "held for the run lease instead of until the re-attach"


async def _client(s: Scene) -> Any:
    from fastjob import Worker

    client = Worker(app="shop", servers=list(s.by_address), role="client", reconnect_max=0.3)
    await client.start()
    return client


async def _final_instance(client: Any, instance_id: int) -> Any:
    try:
        row = await client.get_instance(instance_id)
    except (RemoteError, ConnectionError, asyncio.TimeoutError):
        return None  # reconnecting
    return row if row["status"] not in ("waiting", "queued", "dispatched", "running") else None


async def test_a_stopping_worker_hands_its_run_back(scene):
    """Issue case 4: SIGTERM a worker running a 4 s job (no retries) with a 0.5 s grace: the run is
    interrupted (not cancelled, not a failure) and runs again on the other worker, after the first
    stopped; the per-second job keeps running on the other worker with nothing lost."""
    s = scene()
    await s.start_servers(1)
    long = {"name": "long", "hold": 4.0, "routing": "least_busy"}
    a = await s.start_worker("a", [long, TICK], grace=0.5)
    await s.start_worker("b", [long, TICK], grace=0.5)
    client = await _client(s)
    try:
        instance_id = await client.trigger("long")
        await wait_until(lambda: s.ledger.runs("long"), 10, "the run to start")
        first = s.ledger.runs("long")[0]
        victim = a if first.worker == "a" else next(w for w in s.workers if w.worker_id == "b")
        victim.signal(signal.SIGTERM)
        stopped_at = time.time()
        await victim.wait(15)
        rows = await wait_until(lambda: _reran(s.db, "long"), 20, "the re-run to succeed")
        await s.runs_after("tick", stopped_at + 2, 3)
    finally:
        await client.stop()
    assert [(r["attempt"], r["status"], r["reruns"], r["trigger_kind"]) for r in rows] == [
        (1, "interrupted", 0, "api"), (2, "succeeded", 1, "rerun")], rows
    assert "worker stopping" in rows[0]["error"]
    runs = s.ledger.runs("long")
    assert [r.worker for r in runs] == [first.worker, "b" if first.worker == "a" else "a"]
    assert runs[1].start >= runs[0].end, "the re-run started before the interrupted run stopped"
    assert runs[0].instance_id == instance_id
    planned = window(s, "tick", 0, time.time() - 2)
    assert_each_ran_once(s.ledger.runs("tick"), planned)
    assert_final_records(await s.settled("tick", planned), planned)


def _reran(db: str, job: str) -> list[dict] | None:
    rows = instance_rows(db, "shop", job)
    return rows if rows and rows[-1]["status"] == "succeeded" else None


async def test_a_slow_reattach_never_runs_an_instance_twice_at_once(scene):
    """Issue case 7: kill -9 the owner while a worker runs an instance, and let that worker come back
    only after its run lease (a 6 s reconnect backoff, a 1.5 s lease): its run stops at the lease,
    and the survivor runs the instance again elsewhere only after that."""
    s = scene([*FAST_CLUSTER_ARGS, "--second-level-threshold", "0", "--run-lease", "1.5"])
    await s.start_servers(2)
    long = {"name": "long", "hold": 5.0}
    await s.start_worker("slow", [long], reconnect_min=6.0, reconnect_max=6.0)
    client = await _client(s)
    try:
        await client.trigger("long")
        await wait_until(lambda: s.ledger.runs("long"), 10, "the run to start")
        await s.start_worker("other", [long])  # after the dispatch: the run is surely the slow worker's
        owner, _ = s.owner()
        owner.kill()
        rows = await wait_until(lambda: _reran(s.db, "long"), 30, "the instance to run again and succeed")
    finally:
        await client.stop()
    runs = s.ledger.runs("long")
    assert len(runs) == 2 and rows[0]["status"] == "interrupted", (runs, rows)
    assert runs[0].end is not None and runs[1].start >= runs[0].end, f"two runs at once: {runs}"


async def test_sigterm_hands_the_app_over_cleanly(scene):
    """SIGTERM the owner: it hands the app to the other server with everything written; the running
    instance re-attaches there and finishes once, and the per-second job loses and repeats nothing."""
    s = scene()
    await s.start_servers(2)
    long = {"name": "long", "hold": 2.5}
    await s.start_worker("w1", [TICK, long])
    await s.runs_after("tick", 0, 3)
    client = await _client(s)
    try:
        instance_id = await client.trigger("long")
        await wait_until(lambda: s.ledger.runs("long"), 10, "the long run to start")
        owner, epoch = s.owner()
        owner.signal(signal.SIGTERM)
        assert await owner.wait(15) == 0
        stopped_at = time.time()
        new_owner, new_epoch = s.owner()
        # handed over (epoch + 1), and maybe adopted by its new owner already (+ 1 more)
        assert new_owner is not None and new_owner is not owner and new_epoch in (epoch + 1, epoch + 2)
        prev, clean = db_rows(s.db, "SELECT prev_owner, left_clean FROM apps WHERE name = ?", ("shop",))[0]
        assert prev == owner.address and clean == 1
        row = await wait_until(lambda: _final_instance(client, instance_id), 15, "the long instance to finish")
        await s.runs_after("tick", stopped_at + 1, 3)
    finally:
        await client.stop()
    assert row["status"] == "succeeded" and len(s.ledger.runs("long")) == 1
    planned = window(s, "tick", 0, time.time() - 2)
    assert_each_ran_once(s.ledger.runs("tick"), planned)
    assert_final_records(await s.settled("tick", planned), planned)


async def test_a_joining_server_takes_its_share_and_drain_moves_apps_away(scene):
    """One server owns two apps; a second joins and one app moves to it, with nothing lost or
    repeated. Then `fastjob-server drain` moves the joiner's app back, and --undo lets it take apps."""
    from fastjob.server.cli import request_drain

    s = scene()
    (first,) = await s.start_servers(1)
    await s.start_worker("a1", [TICK], app="alpha")
    await s.start_worker("b1", [TICK], app="beta")
    await wait_until(lambda: len({r.worker for r in s.ledger.runs("tick")}) == 2, 15, "both apps ticking")
    (joiner,) = await s.start_servers(1)
    def owners() -> set[str]:
        return {app_row(s.db, app)[0] for app in ("alpha", "beta")}

    await wait_until(lambda: owners() == {first.address, joiner.address}, 30, "one app to move to the joiner")
    moved_at = time.time()
    await wait_until(lambda: sum(1 for r in s.ledger.runs("tick") if r.start > moved_at + 1) >= 4, 15, "ticks")
    assert await request_drain(s.db, joiner.address, True)
    await wait_until(lambda: owners() == {first.address}, 15, "the drained server to hand its app back")
    assert joiner.running, "drain must not stop the server"
    drained_at = time.time()
    await wait_until(lambda: sum(1 for r in s.ledger.runs("tick") if r.start > drained_at + 1) >= 4, 15, "ticks")
    end = time.time() - 2
    for app, worker in (("alpha", "a1"), ("beta", "b1")):
        runs = [r for r in s.ledger.runs("tick") if r.worker == worker]
        planned = per_second(min(r.planned_ms for r in runs), int(end * 1000))
        rows = await wait_until(lambda app=app, planned=planned: settled_rows(s.db, app, "tick", planned),
                                20, f"{app} settled")
        assert_each_ran_once(runs, planned)
        assert_final_records(rows, planned)
    assert await request_drain(s.db, joiner.address, False)


async def test_kill_9_of_a_worker_mid_run_runs_it_again_elsewhere(scene):
    """A worker dies mid-run: its instance ends interrupted ("worker lost") once its run lease has
    surely run out, and runs again on the other worker; the second run starts after the first died."""
    s = scene([*FAST_CLUSTER_ARGS, "--second-level-threshold", "0", "--run-lease", "1.5"])
    await s.start_servers(1)
    long = {"name": "long", "hold": 2.0}
    await s.start_worker("a", [long])
    await s.start_worker("b", [long])
    client = await _client(s)
    try:
        await client.trigger("long")
        await wait_until(lambda: s.ledger.runs("long"), 10, "the run to start")
        victim = next(w for w in s.workers if w.worker_id == s.ledger.runs("long")[0].worker)
        victim.kill()
        died_at = time.time()
        rows = await wait_until(lambda: _reran(s.db, "long"), 20, "the instance to run again")
    finally:
        await client.stop()
    assert [(r["status"], r["trigger_kind"]) for r in rows] == [("interrupted", "api"), ("succeeded", "rerun")]
    assert "lost" in rows[0]["error"]
    runs = s.ledger.runs("long")
    # never while the old run could go on: the server waits the 1.5 s run lease from the worker's
    # last frame (up to one 0.25 s heartbeat before the kill), so well after the death
    assert len(runs) == 2 and runs[1].worker != runs[0].worker and runs[1].start >= died_at + 1.0


async def test_downtime_misfires_follow_each_policy(scene, tmp_path):
    """Issue case 5: the only server is down for 6 s (twice the 3 s misfire threshold). Fires in
    its WAL run; the fires never written follow their policy: fire_once runs one catch-up fire and
    records the rest skipped, fire_all runs every one, skip runs none. Every planned fire has one
    final record."""
    db = f"sqlite:///{tmp_path / 'fastjob.db'}"
    s = scene(ARGS, db=db)
    (server,) = await s.start_servers(1)
    jobs = [{"name": name, "cron": "* * * * * *", "misfire": policy}
            for name, policy in (("once", "fire_once"), ("all", "fire_all"), ("none", "skip"))]
    await s.start_worker("w1", jobs)
    await s.runs_after("once", 0, 2)
    server.kill()
    await server.wait()
    down_at = time.time()
    await asyncio.sleep(6.0)  # the downtime under test
    await s.servers.start(db, *ARGS, port=server.port)
    up_at = time.time()
    await s.runs_after("once", up_at + 1, 3)
    end = time.time() - 2
    for job in ("once", "all", "none"):
        planned = window(s, job, 0, end)
        rows = await s.settled(job, planned)
        last = assert_final_records(rows, planned, lambda t: {"succeeded", "skipped"})
        runs = s.ledger.runs(job)
        ran = {r.planned_ms for r in runs}
        assert len(ran) == len(runs), f"{job}: a fire ran twice"
        skipped = sorted(t for t in planned if last[t]["status"] == "skipped")
        caught_up = [t for t in planned if last[t]["trigger_kind"] == "catch_up"]
        assert all(t in ran for t in planned if last[t]["status"] == "succeeded")
        assert all("misfire" in last[t]["error"] for t in skipped)
        missed = [t for t in planned if down_at + 1 < t / 1000 < up_at - 3.5]  # surely never written
        assert missed, "the downtime left no missed fire to test"
        if job == "once":
            assert len(caught_up) == 1 and skipped and set(missed) <= set(skipped) | set(caught_up)
        elif job == "all":
            assert not skipped and set(missed) <= set(caught_up)
        else:
            assert not caught_up and set(missed) <= set(skipped)
