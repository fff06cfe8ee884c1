"""/metrics against a real server and worker: it parses with prometheus_client's parser and its
counters move as fires happen."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from harness import FAST_CLUSTER_ARGS, wait_until
from prometheus_client.parser import text_string_to_metric_families

from fastjob import RemoteError, Worker
from fastjob.server.metrics import Histogram, Metrics

pytestmark = pytest.mark.slow


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, http_address: str) -> Samples:
    async with session.get(f"http://{http_address}/metrics") as answer:  # loopback: no token needed
        assert answer.status == 200 and answer.content_type == "text/plain"
        text = await answer.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name  # every metric says what it is
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_parse_and_count_fires(servers, sqlite_url):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, "--second-level-threshold", "0")
    worker = Worker(app="billing", servers=[server.address], reconnect_max=0.5)

    @worker.handler("ok")
    async def ok(ctx: Any) -> None:
        await asyncio.sleep(0.01)

    @worker.handler("bad")
    async def bad(ctx: Any) -> None:
        raise RuntimeError("no")

    worker.schedule("ok")
    worker.schedule("bad")
    async with aiohttp.ClientSession() as session, worker:
        before = await scrape(session, server.http_address)
        assert before[("fastjob_owned_apps", ())] == 1
        assert before[("fastjob_connected_workers", (("app", "billing"),))] == 1
        ids = [await worker.trigger("ok") for _ in range(3)] + [await worker.trigger("bad")]

        async def counted() -> Any:
            now = await scrape(session, server.http_address)
            done = now.get(("fastjob_fires_total", (("app", "billing"), ("outcome", "succeeded"))), 0)
            return now if done >= 3 else None

        after = await wait_until(counted, 10, "3 succeeded fires counted")
        assert after[("fastjob_fires_total", (("app", "billing"), ("outcome", "failed")))] == 1
        assert after[("fastjob_fire_lateness_seconds_count", (("app", "billing"),))] == len(ids)
        assert after[("fastjob_run_duration_seconds_count", (("app", "billing"),))] == len(ids)
        assert after[("fastjob_protocol_frames_total", (("direction", "in"),))] > before[
            ("fastjob_protocol_frames_total", (("direction", "in"),))]
        assert after[("fastjob_ownership_changes_total", (("kind", "claimed"),))] == 1
        assert after[("fastjob_store_operation_seconds_count", (("operation", "claim_due"),))] > 0
        assert not any(name == "fastjob_fires_total" and dict(labels).get("job") for name, labels in after)


def test_histogram_buckets_are_cumulative():
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.5, 0.5, 5.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 1.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert histogram.total == pytest.approx(6.05)
    assert Metrics().fires == {}


async def test_json_logs_parse_line_by_line(servers, sqlite_url):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, "--log-format", "json")
    worker = Worker(app="billing", servers=[server.address], reconnect_max=0.5)

    @worker.handler("bad")
    async def bad(ctx: Any) -> None:
        raise RuntimeError("no")

    worker.schedule("bad")
    async with worker:
        instance = await worker.trigger("bad")
        await wait_until(lambda: f'"instance": {instance}' in server.log_tail(400), 10, "the failure logged")
    lines = [json.loads(line) for line in server.log_tail(400).splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message", "server"} <= set(line) for line in lines)
    failed = [line for line in lines if line.get("instance") == instance]
    assert failed and failed[0]["app"] == "billing" and failed[0]["server"] == server.address
    connected = [line for line in lines if line.get("worker") == worker.worker_id]
    assert connected and connected[0]["app"] == "billing"


async def test_retention_prunes_old_instances_and_keeps_new_ones(servers, db_url):
    server = await servers.start(db_url, *FAST_CLUSTER_ARGS, "--retain-instances", "3s", "--retain-logs", "3s")
    worker = Worker(app="billing", servers=[server.address], reconnect_max=0.5)

    @worker.handler("ok")
    async def ok(ctx: Any) -> None:
        ctx.log.info("ran")

    worker.schedule("ok")
    async with worker:
        old = [await worker.trigger("ok") for _ in range(3)]
        await wait_until(lambda: _all_final(worker, old), 10, "the old fires final")
        await asyncio.sleep(1.5)
        new = await worker.trigger("ok")

        async def pruned() -> bool:
            ids = {row["id"] for row in await worker.list_instances(job="ok", limit=100)}
            return not ids & set(old)

        await wait_until(pruned, 10, "the old instances pruned")
        rows = await worker.list_instances(job="ok", limit=100)
        assert [row["id"] for row in rows] == [new]  # 1.5 s younger: still kept
        with pytest.raises(RemoteError, match="not_found"):  # gone with its log lines (test_store_admin.py)
            await worker.get_logs(old[0])


async def _all_final(worker: Worker, ids: list[int]) -> bool:
    rows = {row["id"]: row for row in await worker.list_instances(job="ok", limit=100)}
    return all(rows.get(i, {}).get("status") == "succeeded" for i in ids)


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("2m", 120), ("12h", 43200), ("7d", 604800), ("0", 0),
                                           ("1.5", 1.5)])
def test_durations(text, seconds):
    from fastjob.server.config import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "-1d", "nan", "d"])
def test_bad_durations_are_refused(text):
    from fastjob.server.config import ServerConfig

    assert any("retain-instances" in problem for problem in ServerConfig(retain_instances=text).check())


async def test_a_worker_serves_its_own_metrics_when_asked(servers, sqlite_url):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = Worker(app="billing", servers=[server.address], reconnect_max=0.5, metrics_port=0)

    @worker.handler("ok")
    async def ok(ctx: Any) -> None:
        pass

    worker.schedule("ok")
    async with aiohttp.ClientSession() as session, worker:
        instance = await worker.trigger("ok")
        await wait_until(lambda: worker._runs.outcomes["succeeded"] == 1, 10, f"instance {instance} ran")
        async with session.get(f"http://127.0.0.1:{worker.metrics_port}/metrics") as answer:
            families = {f.name: f for f in text_string_to_metric_families(await answer.text())}
        runs = {tuple(s.labels.values()): s.value for s in families["fastjob_worker_runs"].samples
                if s.name.endswith("_total")}
        assert runs == {("billing", "succeeded"): 1.0}
    with pytest.raises(aiohttp.ClientError):  # stopped with the worker
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{worker.metrics_port}/"):
            pass


async def test_sub_task_items_and_batches_are_counted(servers, sqlite_url):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, "--second-level-threshold", "0")
    worker = Worker(app="maps", servers=[server.address], reconnect_max=0.5)

    @worker.handler("half")
    async def half(ctx: Any) -> float:
        if ctx.params == 3:
            raise ValueError("three")
        return ctx.params / 2

    @worker.handler("parent")
    async def parent(ctx: Any) -> None:
        await ctx.map(range(10), "half", batch_size=4, return_exceptions=True)

    worker.schedule("parent", run_once=True)
    async with aiohttp.ClientSession() as session, worker:
        async def counted() -> Any:
            now = await scrape(session, server.http_address)
            done = now.get(("fastjob_subtask_items_total", (("app", "maps"), ("outcome", "succeeded"))), 0)
            return now if done >= 9 else None

        after = await wait_until(counted, 10, "9 succeeded sub-task items counted")
        assert after[("fastjob_subtask_items_total", (("app", "maps"), ("outcome", "failed")))] == 1
        assert after[("fastjob_subtask_batches_total", (("app", "maps"), ("event", "sent")))] == 3
        assert after.get(("fastjob_subtask_batches_open", (("app", "maps"), ("state", "running"))), 0) == 0
