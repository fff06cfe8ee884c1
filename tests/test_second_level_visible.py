"""Worker-run (second-level) jobs are as visible as server-run ones (issue 14), on a real server:
the first run of a new job comes at once, failures and ``ctx.log`` lines reach the job's run
history, totals survive a worker's restart, and a 10 s job is run by the server, with instances."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fastjob import Worker
from fastjob.context import JobContext
from fastjob.testing import FAST_CLUSTER_ARGS, ServerFactory, ServerProcess, wait_until

APP = "visible"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    servers = ServerFactory(tmp_path)
    try:
        yield await servers.start(f"sqlite:///{tmp_path / 'fastjob.db'}", *FAST_CLUSTER_ARGS)
    finally:
        await servers.close()


def make_worker(server: ServerProcess, worker_id: str, handler: Callable[[JobContext], Any], interval: float) -> Worker:
    worker = Worker(app=APP, servers=[server.address], worker_id=worker_id, reconnect_min=0.05)
    worker.handler("h")(handler)
    worker.schedule("job", handler="h", interval=interval)
    return worker


async def test_the_first_run_of_a_new_worker_run_job_comes_at_once(server: ServerProcess) -> None:
    started: asyncio.Queue[float] = asyncio.Queue()
    worker = make_worker(server, "w1", lambda ctx: started.put_nowait(time.time()), interval=2.5)
    began = time.time()
    await worker.start(timeout=10)
    try:
        first = await asyncio.wait_for(started.get(), 5)
        assert first - began < 1.0, f"the first run came {first - began:.2f}s after start (period 2.5 s)"
        assert (await worker.get_job("job"))["next_trigger_ms"] is None, "run by the worker, not the server"
    finally:
        await worker.stop(grace=0)


async def test_failures_and_log_lines_of_a_worker_run_job_reach_its_run_history(server: ServerProcess) -> None:
    numbers = itertools.count()

    def flaky(ctx: JobContext) -> None:
        n = next(numbers)
        ctx.log.info("run %d", n)
        if n % 2:
            raise RuntimeError(f"boom {n}")

    worker = make_worker(server, "w1", flaky, interval=0.2)
    await worker.start(timeout=10)
    try:
        runs = await wait_until(lambda: _runs(worker, lambda r: r["status"] == "failed", 2), 15, "two failed runs")
        failed = [r for r in runs if r["status"] == "failed"]
        n = int(failed[0]["error"].rsplit(" ", 1)[1])
        assert f"boom {n}" in failed[0]["error"] and n % 2 == 1
        assert [line[1:] for line in failed[0]["logs"]] == [["INFO", f"run {n}"]]
        assert (failed[0]["worker"], failed[0]["duration"] >= 0) == ("w1", True)
        logged_ok = [r for r in runs if r["status"] == "succeeded"]
        assert logged_ok and logged_ok[0]["logs"][0][2].startswith("run "), "a run that logged is kept too"
        starts = [r["started_at"] for r in runs]
        assert starts == sorted(starts, reverse=True), "newest first"
    finally:
        await worker.stop(grace=0)


async def _runs(worker: Worker, keep: Callable[[dict[str, Any]], bool], at_least: int) -> list[dict[str, Any]] | None:
    runs = await worker.list_runs("job")
    return runs if sum(1 for r in runs if keep(r)) >= at_least else None


async def test_totals_of_a_worker_run_job_survive_its_workers_restart(server: ServerProcess) -> None:
    first = make_worker(server, "w1", lambda ctx: None, interval=0.2)
    await first.start(timeout=10)
    try:
        stats = await wait_until(lambda: _stats(first, lambda s: s["runs"] >= 15), 15, "15 runs reported")
    finally:
        await first.stop(grace=0)
    before, stopped_at = stats["runs"], time.time()
    second = make_worker(server, "w2", lambda ctx: None, interval=0.2)
    await second.start(timeout=10)
    try:
        # the first totals that count runs of the new worker already hold the old worker's
        after = await wait_until(lambda: _stats(second, lambda s: (s["last_run_at"] or 0) > stopped_at), 15,
                                 "a report of the new worker")
        assert after["runs"] > before, f"the total fell from {before} to {after['runs']}: it restarted at 0"
    finally:
        await second.stop(grace=0)


async def _stats(worker: Worker, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    stats = (await worker.get_job("job"))["stats"]
    return stats if stats and ok(stats) else None


async def test_a_ten_second_job_is_run_by_the_server_and_has_instances(server: ServerProcess) -> None:
    worker = make_worker(server, "w1", lambda ctx: None, interval=10)
    await worker.start(timeout=10)
    try:
        instances = await wait_until(lambda: _finished(worker), 10, "the first run's instance")
        assert instances[0]["status"] == "succeeded"
    finally:
        await worker.stop(grace=0)


async def _finished(worker: Worker) -> list[dict[str, Any]] | None:
    instances = await worker.list_instances(job="job")
    return instances if instances and instances[0]["status"] == "succeeded" else None
