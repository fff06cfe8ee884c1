"""End to end: a real fastjob-server process, real workers over TCP, SQLite or MariaDB."""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import pytest

from fastjob import RemoteError, Worker, WorkerError
from harness import FAST_CLUSTER_ARGS, next_event, past_fires_final, ticking_worker, wait_until

# Regular-path tests: every job goes through the server's WAL and wheel.
REGULAR = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0"]


def make_worker(address: str, app: str = "billing", **kw: Any) -> Worker:
    kw.setdefault("reconnect_max", 0.5)
    return Worker(app=app, servers=[address], **kw)


async def final_instances(worker: Worker, job: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    final = {"succeeded", "failed", "timed_out", "cancelled", "misfired"}

    async def done() -> Any:
        rows = await worker.list_instances(job=job, limit=1000)
        finished = [r for r in rows if r["status"] in final]
        return finished if len(finished) >= count else None

    return await wait_until(done, timeout, f"{count} final instances of {job}", poll=0.1)


async def test_seed_cases(servers, db_url):
    """The seed design's three cases: an interval job, a run-once job, a job retried 3 times."""
    server = await servers.start(db_url, *REGULAR)
    runs: dict[str, list[float]] = collections.defaultdict(list)
    task3_attempts: list[int] = []
    worker = make_worker(server.address)

    @worker.handler("task1")
    async def task1(ctx):
        runs["task1"].append(time.time())
        ctx.log.info("task1 running.....")

    @worker.handler("task2")
    def task2(ctx):  # plain def: runs in the thread pool
        runs["task2"].append(time.time())

    @worker.handler("task3")
    async def task3(ctx):
        task3_attempts.append(ctx.attempt)
        raise RuntimeError("mock job failed")

    worker.schedule("task1", interval=0.5)
    worker.schedule("task2", run_once=True)
    worker.schedule("task3", run_once=True, retries=3, retry_backoff=0.05)
    async with worker:
        rows = await final_instances(worker, "task3", 4)
        assert sorted(task3_attempts) == [1, 2, 3, 4]
        assert sorted(r["attempt"] for r in rows) == [1, 2, 3, 4]
        assert all(r["status"] == "failed" and "mock job failed" in r["error"] for r in rows)
        await wait_until(lambda: len(runs["task1"]) >= 4, 10, "four runs of task1")
        gaps = [b - a for a, b in zip(runs["task1"], runs["task1"][1:])]
        assert all(0.3 < gap < 0.8 for gap in gaps[1:]), gaps
        task1_rows = await final_instances(worker, "task1", 2)
        logs = await worker.get_logs(task1_rows[-1]["id"])
        assert [line[2] for line in logs] == ["task1 running....."]
        assert len(runs["task2"]) == 1
    # a restarted worker re-declares run-once jobs without running them again
    worker2 = make_worker(server.address)
    worker2.handler("task1")(task1)
    worker2.handler("task2")(task2)
    worker2.handler("task3")(task3)
    worker2.schedule("task2", run_once=True)
    async with worker2:
        await asyncio.sleep(1.5)  # a window in which a wrong second run would happen
        assert len(runs["task2"]) == 1


async def test_cron_with_seconds_fires_on_the_second(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    fired: asyncio.Queue[tuple[float, float]] = asyncio.Queue()
    worker = make_worker(server.address)

    @worker.handler("report")
    async def report(ctx):
        fired.put_nowait((ctx.scheduled_at, time.time()))

    worker.schedule("report", cron="* * * * * *")
    async with worker:
        for _ in range(3):
            planned, ran = await next_event(fired)
            assert planned == int(planned), "cron fires on whole seconds"
            assert ran >= planned - 0.002, "never before the planned time"
            assert ran - planned < 1.0


async def test_fixed_delay_counts_from_finish(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    starts: asyncio.Queue[float] = asyncio.Queue()
    worker = make_worker(server.address)

    @worker.handler("slow")
    async def slow(ctx):
        starts.put_nowait(time.time())
        await asyncio.sleep(0.4)

    worker.schedule("slow", delay=0.3)
    async with worker:
        times = [await next_event(starts) for _ in range(3)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 0.4 s run + 0.3 s delay, less 10 ms of timer granularity (a rate from the start would give ~0.4)
    assert all(gap >= 0.69 for gap in gaps), gaps


async def test_one_shot_at_time_and_trigger_with_params(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    seen: asyncio.Queue[tuple[str, Any, float]] = asyncio.Queue()
    worker = make_worker(server.address)

    @worker.handler("echo")
    async def echo(ctx):
        seen.put_nowait((ctx.job, ctx.params, ctx.scheduled_at))
        return {"echo": ctx.params}

    at = time.time() + 0.8
    worker.schedule("later", handler="echo", at=at)
    worker.schedule("manual", handler="echo")
    async with worker:
        instance_id = await worker.trigger("manual", {"n": 7})
        job, params, _ = await next_event(seen)
        assert (job, params) == ("manual", {"n": 7})
        row = await final_instances(worker, "manual", 1)
        assert row[0]["id"] == instance_id and row[0]["result"] == {"echo": {"n": 7}}
        job, params, planned = await next_event(seen)
        assert job == "later" and abs(planned - at) < 0.002
        with pytest.raises(RemoteError) as err:
            await worker.trigger("nope")
        assert err.value.code == "not_found"


async def test_timeout_marks_timed_out_and_retries(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    worker = make_worker(server.address)
    attempts: list[int] = []

    @worker.handler("hang")
    async def hang(ctx):
        attempts.append(ctx.attempt)
        await asyncio.sleep(3600)

    worker.schedule("hang", run_once=True, timeout=0.3, retries=1, retry_backoff=0.05)
    async with worker:
        rows = await final_instances(worker, "hang", 2)
    assert sorted(r["status"] for r in rows) == ["timed_out", "timed_out"]
    assert sorted(attempts) == [1, 2]


async def test_misbehaving_handlers_fail_only_their_instance(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    worker = make_worker(server.address)

    @worker.handler("bad_result")
    async def bad_result(ctx):
        return object()

    @worker.handler("good")
    async def good(ctx):
        return "fine"

    worker.schedule("bad_result")
    worker.schedule("good")
    async with worker:
        bad_id = await worker.trigger("bad_result")
        good_id = await worker.trigger("good")
        await final_instances(worker, "good", 1)
        bad = await wait_until(lambda: _final(worker, bad_id), 10, "bad_result to finish")
        assert bad["status"] == "failed" and "not serialisable" in bad["error"]
        good_row = await worker.get_instance(good_id)
        assert good_row["status"] == "succeeded" and good_row["result"] == "fine"


async def _final(worker: Worker, instance_id: int) -> Any:
    row = await worker.get_instance(instance_id)
    return row if row["status"] in {"succeeded", "failed", "timed_out", "cancelled", "misfired"} else None


async def test_no_worker_fails_with_a_reason(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR, "--dispatch-wait", "0.5")
    client = make_worker(server.address, role="client")
    # a client declares nothing and runs nothing; it defines a job through the API
    async with client:
        await client.call("JOB_UPSERT", {"job": {"name": "orphan", "handler": "orphan", "schedule_type": "api"}})
        instance_id = await client.trigger("orphan")
        row = await wait_until(lambda: _final(client, instance_id), 10, "the orphan fire to fail")
    assert row["status"] == "failed" and "no worker" in row["error"]


async def test_bad_declarations_are_refused():
    worker = Worker(app="a", servers=["127.0.0.1:1"])

    @worker.handler("h")
    async def h(ctx):
        pass

    with pytest.raises(ValueError, match="unknown handler"):
        worker.schedule("x", handler="missing")
    with pytest.raises(ValueError, match="bad cron"):
        worker.schedule("y", handler="h", cron="61 * * * *")
    with pytest.raises(ValueError, match="only one of"):
        worker.schedule("z", handler="h", cron="* * * * *", interval=5)


async def test_server_refuses_a_bad_job_definition(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    async with make_worker(server.address, role="client") as client:
        with pytest.raises(RemoteError) as err:
            await client.call("JOB_UPSERT", {"job": {"name": "j", "handler": "h", "schedule_type": "cron",
                                                      "schedule_expr": "not a cron"}})
        assert err.value.code == "invalid" and "cron" in err.value.message
        with pytest.raises(RemoteError) as err:
            await client.call("JOB_UPSERT", {"job": {"name": "j", "handler": "h", "schedule_type": "weekly"}})
        assert err.value.code == "invalid"
        assert await client.list_jobs() == []


async def test_tokens(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR, "--app-token", "secure=s3cret")
    with pytest.raises(WorkerError, match="bad_token"):
        await make_worker(server.address, app="secure", token="wrong").start(timeout=10)
    with pytest.raises(WorkerError, match="bad_token"):
        await make_worker(server.address, app="secure").start(timeout=10)
    async with make_worker(server.address, app="secure", token="s3cret") as ok:
        assert ok.connected
    async with make_worker(server.address, app="open") as other:  # apps without a token stay open
        assert other.connected


async def test_routing_spreads_and_tags_restrict(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    ran_on: list[str] = []
    workers = [make_worker(server.address, worker_id=f"w{i}", tags=["gpu"] if i == 2 else []) for i in range(3)]
    for w in workers:
        @w.handler("spread")
        async def spread(ctx, _w=w):
            ran_on.append(_w.worker_id)

        w.handler("gpu_only")(spread)
    workers[0].schedule("spread")
    workers[0].schedule("gpu_only", handler="gpu_only", tags=["gpu"])
    for w in workers:
        await w.start()
    try:
        for _ in range(6):
            await workers[0].trigger("spread")
        await final_instances(workers[0], "spread", 6)
        assert collections.Counter(ran_on) == {"w0": 2, "w1": 2, "w2": 2}
        ran_on.clear()
        for _ in range(3):
            await workers[0].trigger("gpu_only")
        await final_instances(workers[0], "gpu_only", 3)
        assert ran_on == ["w2", "w2", "w2"]
    finally:
        for w in workers:
            await w.stop()


async def test_kill_9_restart_loses_nothing_and_duplicates_nothing(servers, tmp_path):
    """kill -9 the server with fires in its WAL; a restart finishes every one of them, once."""
    db = f"sqlite:///{tmp_path / 'wal.db'}"
    server = await servers.start(db, *REGULAR, "--scan-horizon", "3")
    executions: collections.Counter[int] = collections.Counter()
    worker = ticking_worker([server.address], executions, app="billing")
    await worker.start()
    try:
        await wait_until(lambda: sum(executions.values()) >= 3, 10, "some ticks")
        server.kill()  # the WAL now holds waiting rows claimed up to 3 s ahead
        await server.wait()
        before = sum(executions.values())
        restarted = await servers.start(db, *REGULAR, "--scan-horizon", "3", port=server.port)
        await wait_until(lambda: sum(executions.values()) >= before + 5, 20, "ticks after the restart")
        rows = await wait_until(lambda: past_fires_final(worker, settle=1.0), 20, "every past fire to be final")
    finally:
        await worker.stop()
    assert all(n == 1 for n in executions.values()), "an instance ran twice"
    keys = [(r["planned_ms"], r["attempt"]) for r in rows]
    assert len(keys) == len(set(keys)), "a fire was recorded twice"
    assert restarted.running


async def test_sigterm_stops_cleanly_and_releases_apps(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    async with make_worker(server.address) as worker:
        assert worker.connected
        server.signal(15)
        assert await server.wait(15) == 0
    import sqlite3

    conn = sqlite3.connect(sqlite_url[len("sqlite:///"):])
    owners = conn.execute("SELECT owner FROM apps").fetchall()
    servers_left = conn.execute("SELECT COUNT(*) FROM servers").fetchone()[0]
    conn.close()
    assert owners == [(None,)] and servers_left == 0


@pytest.mark.parametrize("allow_overlap", [False, True])
async def test_overlapping_fires_are_skipped_unless_allowed(servers, sqlite_url, allow_overlap):
    server = await servers.start(sqlite_url, *REGULAR)
    worker = make_worker(server.address)
    running = 0
    peak = 0

    @worker.handler("long")
    async def long(ctx):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.7)
        running -= 1

    worker.schedule("long", interval=0.2, allow_overlap=allow_overlap)
    async with worker:
        rows = await final_instances(worker, "long", 6)
    skipped = [r for r in rows if r["status"] == "cancelled" and "still runs" in (r["error"] or "")]
    if allow_overlap:
        assert peak >= 2 and not skipped
    else:
        assert peak == 1 and skipped


async def test_oversized_results_and_many_log_lines_fail_or_pass_alone(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    worker = make_worker(server.address)

    @worker.handler("huge")
    async def huge(ctx):
        return "x" * (2 << 20)  # more than a frame can carry

    @worker.handler("chatty")
    async def chatty(ctx):
        for i in range(3000):
            ctx.log.info("line %d %s", i, "y" * 300)
        return "done"

    worker.schedule("huge")
    worker.schedule("chatty")
    async with worker:
        huge_id = await worker.trigger("huge")
        chatty_id = await worker.trigger("chatty")
        huge_row = await wait_until(lambda: _final(worker, huge_id), 10, "the huge result to fail")
        chatty_row = await wait_until(lambda: _final(worker, chatty_id), 10, "the chatty job to finish")
        assert huge_row["status"] == "failed" and "too large" in huge_row["error"]
        assert chatty_row["status"] == "succeeded"
        lines = await worker.get_logs(chatty_id, limit=5000)
        assert len(lines) == 3000 and lines[-1][2].startswith("line 2999")


async def test_reenabling_a_fixed_delay_job_keeps_one_chain(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    worker = make_worker(server.address)
    starts: list[float] = []

    @worker.handler("slow")
    async def slow(ctx):
        starts.append(time.time())
        await asyncio.sleep(0.2)

    worker.schedule("slow", delay=0.3, allow_overlap=True)
    async with worker:
        await wait_until(lambda: len(starts) >= 2, 10, "the chain to run")
        for _ in range(3):  # each re-enable sets a fresh next fire; it must not add a chain
            assert await worker.set_enabled("slow", True)
            await asyncio.sleep(0.1)
        first = len(starts)
        await asyncio.sleep(3.0)  # a window in which a second chain would double the rate
        runs = len(starts) - first
    assert runs <= 7, f"{runs} runs in 3 s: more than one chain (one chain runs about 6)"


async def test_a_request_flood_is_answered_busy_and_the_connection_lives_on(servers, sqlite_url):
    """Thousands of requests pipelined at once on one connection: the server works on at most
    1,024 at a time and answers the rest `busy` at once; afterwards the same connection (and
    another client) are served normally."""
    server = await servers.start(sqlite_url, *REGULAR)
    flooder = make_worker(server.address, role="client")
    other = make_worker(server.address, role="client")
    async with flooder, other:
        await flooder.call("JOB_UPSERT", {"job": {"name": "noop", "handler": "noop", "schedule_type": "api"}})
        replies = await asyncio.gather(
            *(flooder.call("JOB_GET", {"name": "noop"}, timeout=30) for _ in range(4000)), return_exceptions=True)
        busy = [r for r in replies if isinstance(r, RemoteError) and r.code == "busy"]
        served = [r for r in replies if isinstance(r, dict)]
        assert busy and served and len(busy) + len(served) == len(replies), {type(r) for r in replies}
        assert all(r["job"]["name"] == "noop" for r in served)
        assert (await flooder.call("JOB_GET", {"name": "noop"}))["job"]["name"] == "noop"
        assert (await other.call("JOB_GET", {"name": "noop"}))["job"]["name"] == "noop"
