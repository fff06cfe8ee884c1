"""Sub-tasks end to end: ctx.map and map_stream across workers, broadcast jobs, workflows (DAG).

Real server processes and workers over TCP, on SQLite and MariaDB (the ``db_url`` fixture)."""
from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest
from harness import FAST_CLUSTER_ARGS, ProcWorker, app_row, db_rows, wait_until
from ledger import FINAL
from tcp_proxy import TcpProxy

from fastjob import Worker
from fastjob.client import ApiError, Client
from fastjob.context import MapError, TaskFailed

REGULAR = [*FAST_CLUSTER_ARGS, "--second-level-threshold", "0"]


def make_worker(address: str, app: str = "maps", **kw: Any) -> Worker:
    kw.setdefault("reconnect_max", 0.5)
    return Worker(app=app, servers=[address], **kw)


async def final_row(worker: Worker, job: str, timeout: float = 20.0) -> dict[str, Any]:
    async def done() -> Any:
        rows = await worker.list_instances(job=job, limit=10)
        ended = [r for r in rows if r["status"] not in ("waiting", "queued", "dispatched", "running")]
        return ended[0] if ended else None

    return await wait_until(done, timeout, f"a final instance of {job}", poll=0.05)


async def test_a_map_runs_every_item_across_workers_and_returns_results_in_order(servers, db_url):
    server = await servers.start(db_url, *REGULAR)
    ran_on: dict[str, set[int]] = {}
    workers = [make_worker(server.address, worker_id=f"w{i}", max_concurrency=4) for i in range(2)]
    for w in workers:
        @w.handler("square")
        async def square(ctx, _w=w):
            ran_on.setdefault(_w.worker_id, set()).add(ctx.params)
            return ctx.params * ctx.params

    got: dict[str, Any] = {}

    @workers[0].handler("parent")
    async def parent(ctx):
        got["list"] = await ctx.map(range(1000), "square", batch_size=50)
        got["stream"] = [r async for r in ctx.map_stream(iter(range(300)), "square", batch_size=7, window=3)]
        return sum(got["list"])

    workers[0].schedule("parent", run_once=True)
    async with workers[1], workers[0]:
        row = await final_row(workers[0], "parent")
    assert row["status"] == "succeeded", row
    assert got["list"] == [i * i for i in range(1000)]
    assert got["stream"] == [i * i for i in range(300)]
    assert row["result"] == sum(i * i for i in range(1000))
    assert set(ran_on) == {"w0", "w1"}  # both workers took batches


async def test_a_failing_item_is_retried_then_reported_by_index(servers, db_url):
    server = await servers.start(db_url, *REGULAR)
    worker = make_worker(server.address)
    tries: dict[int, int] = {}

    @worker.handler("flaky")
    async def flaky(ctx):
        tries[ctx.params] = tries.get(ctx.params, 0) + 1
        if ctx.params == 3 and tries[3] < 3:
            raise ValueError("not yet")
        if ctx.params == 5:
            raise ValueError("never")
        return ctx.params

    seen: dict[str, Any] = {}

    @worker.handler("parent")
    async def parent(ctx):
        seen["partial"] = await ctx.map(range(8), "flaky", retries=2, return_exceptions=True)
        try:
            await ctx.map(range(8), "flaky")
        except MapError as exc:
            seen["error"] = exc
        return "done"

    worker.schedule("parent", run_once=True)
    async with worker:
        await final_row(worker, "parent")
    assert seen["partial"][:5] == [0, 1, 2, 3, 4]
    assert seen["partial"][5] == TaskFailed(5, "ValueError: never")
    assert tries[5] == 3 + 1  # 2 retries in the first map, none in the second
    assert set(seen["error"].failures) == {5}



async def test_nested_maps_on_a_one_slot_worker_finish_because_waiting_parents_are_parked(servers, db_url):
    """One worker with one slot: the parent's map takes the batch slot with a 'middle' batch whose
    items map again. Only because a waiting parent is parked (PARK) can the leaves run at all."""
    server = await servers.start(db_url, *REGULAR)
    worker = make_worker(server.address, max_concurrency=1)

    @worker.handler("leaf")
    async def leaf(ctx):
        return ctx.params + 1

    @worker.handler("middle")
    async def middle(ctx):
        return sum(await ctx.map(range(ctx.params * 10, ctx.params * 10 + 3), "leaf"))

    @worker.handler("top")
    async def top(ctx):
        return await ctx.map(range(3), "middle", batch_size=1)

    worker.schedule("top", run_once=True)
    async with worker:
        row = await final_row(worker, "top")
    assert row["status"] == "succeeded", row
    assert row["result"] == [sum(range(i * 10 + 1, i * 10 + 4)) for i in range(3)]


async def test_a_retried_parent_reuses_the_items_its_earlier_attempt_finished(servers, db_url):
    server = await servers.start(db_url, *REGULAR)
    worker = make_worker(server.address)
    runs: collections.Counter[int] = collections.Counter()

    @worker.handler("work")
    async def work(ctx):
        runs[ctx.params] += 1
        if ctx.params == 7 and ctx.attempt == 1 and runs[7] == 1:
            raise ValueError("first time")
        return ctx.params * 10

    @worker.handler("parent")
    async def parent(ctx):
        results = await ctx.map(range(20), "work", batch_size=5, return_exceptions=True)
        if ctx.attempt == 1:
            raise RuntimeError("the parent fails after its map")
        return results

    worker.schedule("parent", run_once=True, retries=1, retry_backoff=0.05)
    async with worker:
        async def ended_twice() -> Any:
            rows = await worker.list_instances(job="parent", limit=10)
            return rows if [r["status"] for r in rows if r["attempt"] == 2] == ["succeeded"] else None

        rows = await wait_until(ended_twice, 20, "the second attempt to succeed", poll=0.05)
    second = next(r for r in rows if r["attempt"] == 2)
    assert second["result"] == [i * 10 for i in range(20)]  # item 7 failed in attempt 1, ran again
    assert runs == {i: (2 if i == 7 else 1) for i in range(20)}  # nothing else ran twice



async def test_a_batch_whose_worker_is_cut_off_runs_elsewhere_only_after_its_run_lease(servers, db_url):
    """The worker running a batch is cut off (its connection closed, the process alive): the batch
    runs again on another worker, but never while the cut-off worker could still be running it
    (it stops its batches when its run lease lapses; the server waits out that lease)."""
    server = await servers.start(db_url, *REGULAR, "--run-lease", "2")
    host, port = server.address.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    runs: list[dict[str, Any]] = []

    async def slow(ctx):
        run = {"item": ctx.params, "start": time.monotonic(), "end": None}
        runs.append(run)
        try:
            await asyncio.sleep(4)
        finally:
            run["end"] = time.monotonic()
        return ctx.params

    async def parent(ctx):
        return await ctx.map([0], "slow")

    cut_off = make_worker(f"127.0.0.1:{proxy.port}", worker_id="cut-off", reconnect_max=60)
    cut_off.handler("slow")(slow)
    cut_off.handler("parent")(parent)
    cut_off.schedule("parent", run_once=True)
    other = make_worker(server.address, worker_id="other")
    other.handler("slow")(slow)
    other.handler("parent")(parent)
    try:
        async with cut_off:
            await wait_until(lambda: runs, 10, "the batch to start on the first worker")
            async with other:
                await proxy.cut()
                await wait_until(lambda: len(runs) >= 2, 20, "the batch to run again on the other worker")
                first, second = runs[0], runs[1]
                await wait_until(lambda: first["end"] is not None, 10, "the first run to be stopped")
                assert second["start"] >= first["end"], "the batch ran twice at once"
    finally:
        await proxy.close()


# ---- worker processes ------------------------------------------------------------------------------
class Cast:
    """Worker processes (tests/task_worker.py) of one test, and what their handlers recorded."""

    def __init__(self, tmp_path: Path, servers: list[str], app: str = "tasks") -> None:
        self.dir = tmp_path
        self.servers = servers
        self.app = app
        self.procs: dict[str, ProcWorker] = {}

    async def start(self, worker_id: str, **config: Any) -> ProcWorker:
        conf = {"app": self.app, "servers": self.servers, "worker_id": worker_id, "dir": str(self.dir), **config}
        proc = ProcWorker(conf, self.dir / f"{worker_id}.log", script="task_worker.py")
        self.procs[worker_id] = proc
        return await proc.start()

    def records(self, worker_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.dir.glob("runs-*.jsonl")):
            if worker_id is None or path.name == f"runs-{worker_id}.jsonl":
                out += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        return out

    async def close(self) -> None:
        for proc in self.procs.values():
            await proc.close()


@pytest.fixture
async def cast(tmp_path):
    made: list[Cast] = []

    def make(servers: list[str]) -> Cast:
        made.append(Cast(tmp_path, servers))
        return made[-1]

    try:
        yield make
    finally:
        for c in made:
            await c.close()


def batch_rows(db: str, root_prefix: str = "") -> list[dict[str, Any]]:
    cols = ("batch_key", "root", "call_no", "start_index", "size", "status", "worker", "attempt", "results", "errors",
            "extra")
    rows = db_rows(db, f"SELECT {', '.join(cols)} FROM task_batches ORDER BY id")
    return [dict(zip(cols, r, strict=True)) for r in rows if str(r[1]).startswith(root_prefix)]


async def test_kill_9_of_a_worker_mid_map_records_every_item_exactly_once(servers, db_url, cast):
    """A map of 10,000 items over 3 worker processes; one is killed (kill -9) mid-way. Its batches
    run again elsewhere after its run lease; every item's result is recorded exactly once, and only
    items of the killed worker's unanswered batches ran twice."""
    server = await servers.start(db_url, *REGULAR, "--run-lease", "2")
    c = cast([server.address])
    await c.start("w1", item_sleep=0.001)
    await c.start("w2", item_sleep=0.001)
    await c.start("w0", item_sleep=0.001, jobs=[{"name": "mapper", "run_once": True,
                                                 "params": {"n": 10_000, "batch": 100}}])
    await wait_until(lambda: len(c.records("w1")) >= 1000, 30, "w1 to run 1000 items")
    c.procs["w1"].kill()
    await c.procs["w1"].wait()
    killed_runs = {r["item"] for r in c.records("w1")}
    instance = await wait_until(lambda: _final_instance(db_url, "tasks", "mapper"), 60, "the mapper to end")
    assert instance["status"] == "succeeded", instance
    assert json.loads(instance["result"]) == {"count": 10_000, "sum": 2 * sum(range(10_000))}
    rows = batch_rows(db_url)
    covered = sorted(i for r in rows for i in range(r["start_index"], r["start_index"] + r["size"]))
    assert covered == list(range(10_000))  # each item in exactly one batch record
    assert all(r["status"] == "succeeded" for r in rows)
    assert any(r["attempt"] > 1 for r in rows), "no batch of the killed worker was sent again"
    runs = collections.Counter(r["item"] for r in c.records())
    assert set(runs) == set(range(10_000))
    twice = {item for item, n in runs.items() if n > 1}
    assert twice <= killed_runs  # only what the killed worker had started ran again
    assert len(twice) <= 4 * 100  # at most its slots' batches


def _final_instance(db: str, app: str, job: str) -> dict[str, Any] | None:
    """The latest attempt of the job's (first) fire, once final, with its result and error."""
    rows = db_rows(db, "SELECT i.id, i.status, i.result, i.error, i.attempt FROM instances i JOIN jobs j"
                   " ON j.id = i.job_id WHERE j.app = ? AND j.name = ? ORDER BY i.planned_ms, i.attempt", (app, job))
    if not rows or rows[-1][1] not in FINAL:
        return None
    return dict(zip(("id", "status", "result", "error", "attempt"), rows[-1], strict=True))


async def final_api(api: Client, instance_id: int, timeout: float = 30.0) -> dict[str, Any]:
    async def done() -> Any:
        answer = await api.get_instance(instance_id)
        return answer if answer["instance"]["status"] in FINAL else None

    return await wait_until(done, timeout, f"instance {instance_id} to end", poll=0.05)


async def test_a_broadcast_runs_once_on_every_worker_and_fails_below_min_success(servers, db_url, cast):
    server = await servers.start(db_url, *REGULAR)
    c = cast([server.address])
    for worker_id in ("w0", "w1", "w2"):
        await c.start(worker_id)
    async with Client(server.http_address, server.admin_token) as api:
        await api.create_job("tasks", name="everywhere", handler="shard", mode="broadcast",
                             params={"fail_on": ["w2"]})
        first = await final_api(api, await api.trigger("tasks", "everywhere"))
        assert first["instance"]["status"] == "failed"
        assert "1 of 3 sub-runs failed" in first["instance"]["error"], first["instance"]["error"]
        assert first["progress"] == {"items": 3, "done": 3, "failed": 1}
        runs = await api.subtasks(first["instance"]["id"])
        by_worker = {b["worker"]: b for b in runs["batches"]}
        assert sorted(by_worker) == ["w0", "w1", "w2"]
        assert sorted(tuple(b["shard"]) for b in runs["batches"]) == [(0, 3), (1, 3), (2, 3)]
        assert by_worker["w2"]["status"] == "failed" and "shard on w2 fails" in by_worker["w2"]["errors"][0][1]
        assert by_worker["w0"]["status"] == "succeeded" and by_worker["w0"]["results"][0][0] == "w0"
        shards = [(r["w"], r["shard"], r["of"]) for r in c.records() if "shard" in r]
        assert sorted(w for w, _, _ in shards) == ["w0", "w1", "w2"]  # once on each worker
        assert sorted(s for _, s, _ in shards) == [0, 1, 2] and {n for _, _, n in shards} == {3}

        await api.update_job("tasks", "everywhere", min_success=0.5)
        second = await final_api(api, await api.trigger("tasks", "everywhere"))
        assert second["instance"]["status"] == "succeeded", second["instance"]
        assert second["instance"]["result"]["succeeded"] == 2 and second["instance"]["result"]["workers"] == 3


DIAMOND = {
    "extract": {"handler": "step", "params": {"name": "extract"}},
    "left": {"after": ["extract"], "handler": "step", "params": {"name": "left"}},
    "right": {"after": ["extract"], "handler": "step", "params": {"name": "right"}, "retries": 1},
    "join": {"after": ["left", "right"], "handler": "step", "params": {"name": "join"}},
    "load": {"after": ["join"], "handler": "step", "params": {"name": "load"}},
}


def step_runs(c: Cast) -> collections.Counter[str]:
    return collections.Counter(r["step"] for r in c.records() if "step" in r)


async def test_a_diamond_workflow_fails_at_its_step_and_reruns_from_there(servers, db_url, cast, tmp_path):
    server = await servers.start(db_url, *REGULAR)
    c = cast([server.address])
    (tmp_path / "fail-right").touch()
    await c.start("w1")
    await c.start("w0", workflows={"etl": {"steps": DIAMOND}})
    async with Client(server.http_address, server.admin_token) as api:
        first = await final_api(api, await api.trigger("tasks", "etl"))
        instance_id = first["instance"]["id"]
        assert first["instance"]["status"] == "failed" and "step 'right' failed" in first["instance"]["error"]
        steps = {s["name"]: s for s in (await api.steps(instance_id))["steps"]}
        assert {n: s["status"] for n, s in steps.items()} == {
            "extract": "succeeded", "left": "succeeded", "right": "failed", "join": "not_started",
            "load": "not_started"}
        assert steps["join"]["after"] == ["left", "right"]
        assert step_runs(c) == {"extract": 1, "left": 1, "right": 2}  # right: its retry too

        # a rerun runs the failed step again, and what follows it; nothing that succeeded
        (tmp_path / "fail-right").unlink()
        (tmp_path / "fail-join").touch()
        retried = await api.retry(instance_id)
        second = await final_api(api, retried["instance_id"])
        assert second["instance"]["status"] == "failed" and "step 'join' failed" in second["instance"]["error"]
        assert step_runs(c) == {"extract": 1, "left": 1, "right": 3, "join": 1}

        # a step marked succeeded by hand is taken as done by the next rerun
        await api.succeed_step(second["instance"]["id"], "join", result="by hand")
        third = await final_api(api, (await api.retry(second["instance"]["id"]))["instance_id"])
        assert third["instance"]["status"] == "succeeded", third["instance"]
        assert step_runs(c) == {"extract": 1, "left": 1, "right": 3, "join": 1, "load": 1}
        assert third["instance"]["result"]["results"]["join"] == "by hand"
        load = next(r for r in c.records() if r.get("step") == "load")
        assert load["upstream"] == {"join": "by hand"}
        join = next(r for r in c.records() if r.get("step") == "join")
        assert join["upstream"] == {"left": "left", "right": "right"}


async def test_a_workflow_that_times_out_cancels_its_running_step(servers, db_url, cast):
    """The workflow's own timeout ends it, and the step it waited for is stopped on its worker and
    recorded failed (cancelled), instead of running on for nobody."""
    server = await servers.start(db_url, *REGULAR)
    c = cast([server.address])
    await c.start("w1")
    await c.start("w0", workflows={"slow": {"steps": {
        "first": {"handler": "step", "params": {"name": "first", "sleep": 0}},
        "long": {"after": ["first"], "handler": "step", "params": {"name": "long", "sleep": 60}}},
        "timeout": 1.5}})
    async with Client(server.http_address, server.admin_token) as api:
        done = await final_api(api, await api.trigger("tasks", "slow"))
        assert done["instance"]["status"] == "timed_out", done["instance"]
        await wait_until(lambda: any(r.get("step_cancelled") == "long" for r in c.records()), 10,
                         "the long step to be stopped on its worker")
        steps = {s["name"]: s for s in (await api.steps(done["instance"]["id"]))["steps"]}
        assert steps["first"]["status"] == "succeeded"
        assert steps["long"]["status"] == "failed" and steps["long"]["error"].startswith("cancelled:")


async def test_a_step_that_may_be_skipped_fails_and_its_downstream_steps_still_run(servers, db_url):
    server = await servers.start(db_url, *REGULAR)
    worker = make_worker(server.address)
    seen: dict[str, Any] = {}

    @worker.handler("enrich")
    async def enrich(ctx):
        raise RuntimeError("the enrichment service is down")

    @worker.handler("publish")
    async def publish(ctx):
        seen["upstream"] = ctx.upstream
        return "published"

    worker.workflow("flow", {"enrich": {"on_failure": "skip", "retries": 1}, "publish": ["enrich"]})
    async with worker, Client(server.http_address, server.admin_token) as api:
        done = await final_api(api, await api.trigger("maps", "flow"))
        assert done["instance"]["status"] == "succeeded", done["instance"]
        assert done["instance"]["result"]["steps"] == {"enrich": "skipped", "publish": "succeeded"}
        assert "enrichment service is down" in done["instance"]["result"]["errors"]["enrich"]
        assert seen["upstream"] == {"enrich": None}


def test_a_workflow_with_a_cycle_or_an_unknown_step_is_refused_at_declaration():
    worker = Worker(app="tasks", servers=["127.0.0.1:1"])

    @worker.handler("step")
    async def step(ctx):
        return None

    with pytest.raises(ValueError, match=r"cycle: a -> b -> a|cycle: b -> a -> b"):
        worker.workflow("loop", {"a": {"after": ["b"], "handler": "step"}, "b": {"after": ["a"], "handler": "step"}})
    with pytest.raises(ValueError, match="runs after 'nowhere', which is not a step"):
        worker.workflow("lost", {"a": {"after": ["nowhere"], "handler": "step"}})
    with pytest.raises(ValueError, match="names no handler and no job"):
        worker.workflow("unknown", {"mystery": []})
    with pytest.raises(ValueError, match="unknown handler 'nope'"):
        worker.workflow("bad", {"a": {"handler": "nope"}})
    assert worker.workflow("fine", {"step": []}).params == {"steps": {"step": {"after": [], "handler": "step"}}}


@pytest.mark.mysql
async def test_a_workflow_whose_owner_is_killed_mid_run_finishes_each_step_once(servers, mysql_dsn, cast, tmp_path):
    """kill -9 of the app's owner while steps run: the survivor takes the app, the coordinator's
    run and the running steps are re-attached, and no step runs twice."""
    args = [*REGULAR, "--run-lease", "4"]
    first = await servers.start(mysql_dsn, *args)
    second = await servers.start(mysql_dsn, *args)
    by_address = {first.address: first, second.address: second}
    c = cast([first.address, second.address])
    await c.start("w1", item_sleep=0.6)
    await c.start("w0", item_sleep=0.6, workflows={"etl": {"steps": DIAMOND}})
    owner_address = await wait_until(lambda: app_row(mysql_dsn, "tasks")[0], 10, "an owner of the app")
    owner = by_address[owner_address]
    survivor = second if owner is first else first
    async with Client(survivor.http_address, survivor.admin_token or first.admin_token) as api:
        instance_id = await api.trigger("tasks", "etl")
        await wait_until(lambda: step_runs(c)["left"] and step_runs(c)["right"], 20, "the middle steps to start")
        owner.kill()
        await wait_until(lambda: app_row(mysql_dsn, "tasks")[0] == survivor.address, 20, "the survivor to take over")
        done = await final_api(api, instance_id, timeout=60)
        latest = max(done["attempts"], key=lambda a: a["attempt"])
        assert latest["status"] == "succeeded", done["attempts"]
    assert step_runs(c) == {"extract": 1, "left": 1, "right": 1, "join": 1, "load": 1}, (c.records(), done["attempts"])


async def test_a_step_naming_a_job_runs_that_jobs_handler_and_params_and_the_api_checks_the_graph(servers, db_url):
    server = await servers.start(db_url, *REGULAR)
    worker = make_worker(server.address)
    seen: list[Any] = []

    @worker.handler("export")
    async def export(ctx):
        seen.append((ctx.job, ctx.params, ctx.upstream))
        return "exported"

    @worker.handler("prepare")
    async def prepare(ctx):
        return "prepared"

    worker.schedule("nightly-export", handler="export", cron="0 0 3 * * *", params={"table": "orders"})
    worker.workflow("flow", {"prepare": [], "ship": {"after": ["prepare"], "job": "nightly-export"}})
    async with worker, Client(server.http_address, server.admin_token) as api:
        done = await final_api(api, await api.trigger("maps", "flow"))
        assert done["instance"]["status"] == "succeeded", done["instance"]
        assert seen == [("nightly-export", {"table": "orders"}, {"prepare": "prepared"})]
        job = await api.get_job("maps", "nightly-export")
        assert job["job"]["next_fire_at"] is not None  # its own schedule goes on, untouched
        for steps, why in (({"a": {"after": ["b"]}, "b": {"after": ["a"]}}, "cycle"),
                           ({"a": {"after": ["ghost"]}}, "which is not a step")):
            with pytest.raises(ApiError, match=why):
                await api.create_job("maps", name="bad-flow", handler="fastjob:workflow", params={"steps": steps})
