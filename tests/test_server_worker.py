"""End to end: a real fastjob-server process, real workers over TCP, SQLite or MariaDB."""
from __future__ import annotations

import asyncio
import collections
import time
from itertools import pairwise
from typing import Any

import pytest
from harness import FAST_CLUSTER_ARGS, next_event, settled_rows, wait_until
from ledger import FINAL, Ledger, assert_each_ran_once, assert_final_records, assert_no_overlap, per_second

from fastjob import RemoteError, Worker, WorkerError

# Regular-path tests: every job goes through the server's WAL and wheel.
REGULAR = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0"]


def make_worker(address: str, app: str = "billing", **kw: Any) -> Worker:
    kw.setdefault("reconnect_max", 0.5)
    return Worker(app=app, servers=[address], **kw)


async def final_instances(worker: Worker, job: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    async def done() -> Any:
        rows = await worker.list_instances(job=job, limit=1000)
        finished = [r for r in rows if r["status"] in FINAL]
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
        runs["task1"].append(ctx.scheduled_at)
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
        # fixed rate: planned exactly every 0.5 s, none skipped, none twice
        gaps = [round(b - a, 3) for a, b in pairwise(runs["task1"])]
        assert gaps == [0.5] * len(gaps), gaps
        task1_rows = await final_instances(worker, "task1", 2)
        logs = await worker.get_logs(task1_rows[-1]["id"])
        assert [line[2] for line in logs] == ["task1 running....."]
        assert len(runs["task2"]) == 1
    # a restarted worker re-declares run-once jobs without running them again: once task1 has
    # run twice more, the re-declaration has been scanned (a wrong second run would be due at once)
    worker2 = make_worker(server.address)
    worker2.handler("task1")(task1)
    worker2.handler("task2")(task2)
    worker2.handler("task3")(task3)
    worker2.schedule("task2", run_once=True)
    async with worker2:
        seen = len(runs["task1"])
        await wait_until(lambda: len(runs["task1"]) >= seen + 2, 10, "task1 to run twice more")
        assert len(runs["task2"]) == 1
        assert len(await worker2.list_instances(job="task2")) == 1


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
    gaps = [b - a for a, b in pairwise(times)]
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
    return row if row["status"] in FINAL else None


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


async def test_a_badly_typed_declaration_is_refused_naming_the_job_and_the_session_lives_on(servers, sqlite_url):
    server = await servers.start(sqlite_url, *REGULAR)
    async with make_worker(server.address) as worker:
        good = {"name": "ok", "handler": "h", "schedule_type": "api"}
        bad = {"name": "typo", "handler": "h", "schedule_type": "fixed_rate", "schedule_expr": 5}
        with pytest.raises(RemoteError) as err:
            await worker.call("JOB_DECLARE", {"jobs": [good, bad], "final": False})
        assert err.value.code == "invalid"
        assert err.value.message == "job 'typo': job field 'schedule_expr' has the wrong type int"
        assert worker.connected and await worker.list_jobs() == []  # nothing of the batch was written


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
    """kill -9 the only server with fires in its WAL and an instance running; the restarted server
    fires every WAL row once, holds back what it may have sent until its worker re-attached (not for
    the 30 s run lease), and takes the running instance's result from the worker, which kept it."""
    db = f"sqlite:///{tmp_path / 'wal.db'}"
    args = [*REGULAR, "--scan-horizon", "3", "--run-lease", "30"]
    server = await servers.start(db, *args)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    worker = make_worker(server.address, worker_id="w1")
    worker.handler("tick")(ledger.handler("w1"))
    worker.handler("long")(ledger.handler("w1", hold=2.0))
    worker.schedule("tick", cron="* * * * * *")
    worker.schedule("long")
    async with worker:
        await wait_until(lambda: len(ledger.runs("tick")) >= 3, 10, "some ticks")
        long_id = await worker.trigger("long")
        await wait_until(lambda: _status_is(worker, long_id, "running"), 10, "the long run to be recorded running")
        server.kill()  # the WAL holds waiting rows claimed up to 3 s ahead, and one running row
        await server.wait()
        killed_at = time.time()
        restarted = await servers.start(db, *args, port=server.port)
        await wait_until(lambda: sum(1 for r in ledger.runs("tick") if r.start > killed_at + 2) >= 3, 20,
                         "ticks after the restart")
        long_row = await wait_until(lambda: _final(worker, long_id), 15, "the long instance to finish")
    planned = per_second(min(r.planned_ms for r in ledger.runs("tick")), int((time.time() - 2) * 1000))
    rows = await wait_until(lambda: settled_rows(db, "billing", "tick", planned), 10, "every fire to be final")
    assert_each_ran_once(ledger.runs("tick"), planned)
    assert_final_records(rows, planned)
    assert long_row["status"] == "succeeded" and len(ledger.runs("long")) == 1
    assert restarted.running


async def _status_is(worker: Worker, instance_id: int, status: str) -> bool:
    return (await worker.get_instance(instance_id))["status"] == status


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


@pytest.mark.parametrize("overlap,max_queued", [("queue", 100), ("queue", 2), ("buffer_one", 100), ("skip", 100),
                                               ("allow", 100)])
async def test_overlap_policies(servers, tmp_path, overlap, max_queued):
    """A 0.5 s job every 0.2 s: each policy decides what the fires that come due meanwhile do."""
    server = await servers.start(f"sqlite:///{tmp_path / 'o.db'}", *REGULAR)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    worker = make_worker(server.address, worker_id="w")
    worker.handler("long")(ledger.handler("w", hold=0.5))
    worker.schedule("long", interval=0.2, overlap=overlap, max_queued=max_queued)
    async with worker:
        await wait_until(lambda: len([r for r in ledger.runs("long") if r.end]) >= 5, 15, "five finished runs")
        rows = await worker.list_instances(job="long", limit=1000)
    runs = [r for r in ledger.runs("long") if r.end]
    first = min(r.planned_ms for r in ledger.runs("long"))
    grid = lambda t: (t - first) % 200 == 0  # noqa: E731
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(grid(r.planned_ms) for r in runs) and all(grid(r["planned_ms"]) for r in rows)
    if overlap == "allow":
        starts = sorted(r.start for r in runs)
        assert any(b - a < 0.5 for a, b in pairwise(starts)), "allow: runs never overlapped"
        assert not skipped and not [r for r in rows if r["status"] == "queued"]
        return
    assert_no_overlap(ledger.runs("long"))
    planned_runs = [r.planned_ms for r in ledger.runs("long")]
    assert planned_runs == sorted(planned_runs), "runs out of planned order"
    if overlap == "queue" and max_queued == 100:  # every fire runs, one after another, none skipped
        assert not skipped
        assert planned_runs == list(range(first, first + 200 * len(planned_runs), 200))
        assert [r for r in rows if r["status"] == "queued"], "nothing waited behind the running fire"
    else:
        reason = {"queue": "max_queued", "buffer_one": "buffer_one", "skip": "overlap skip"}[overlap]
        assert skipped and all(reason in r["error"] for r in skipped), skipped
        assert not set(planned_runs) & {r["planned_ms"] for r in skipped}
    if overlap == "skip":  # nothing ever waits: a fire runs when due, or never
        assert not [r for r in rows if r["status"] == "queued"]
        assert all(r.start - r.planned_ms / 1000 < 0.2 for r in runs)


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
    """Re-enabling a running fixed-delay job restarts nothing twice: it keeps ONE chain (each fire
    planned at least run + delay after the previous one's planned time) and it keeps running."""
    server = await servers.start(sqlite_url, *REGULAR)
    worker = make_worker(server.address)
    planned: list[float] = []

    @worker.handler("slow")
    async def slow(ctx):
        planned.append(ctx.scheduled_at)
        await asyncio.sleep(0.2)

    worker.schedule("slow", delay=0.3, overlap="allow")
    async with worker:
        await wait_until(lambda: len(planned) >= 2, 10, "the chain to run")
        for _ in range(3):  # each re-enable sets a fresh next fire; it must not add a chain
            assert await worker.set_enabled("slow", True)
        mark = len(planned)
        await wait_until(lambda: len(planned) >= mark + 5, 10, "five runs after the re-enables")
        assert (await worker.get_job("slow"))["enabled"]
    gaps = [round(b - a, 3) for a, b in pairwise(planned[mark:])]
    # one chain: the next fire is planned 0.3 s after the previous run ended (0.2 s later)
    assert all(gap >= 0.5 for gap in gaps), f"two chains: planned gaps {gaps}"


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
