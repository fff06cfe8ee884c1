"""Declared jobs are reconciled with what live workers declare (issue 14), on a real server:
a job removed from code is paused, an operator's pause survives a worker's restart, and a
one-shot that fired is not planned again when its worker re-declares it."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fastjob import Worker
from fastjob.testing import ServerFactory, ServerProcess, wait_until

APP = "shop"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    servers = ServerFactory(tmp_path)
    try:
        yield await servers.start(f"sqlite:///{tmp_path / 'fastjob.db'}", "--undeclared-grace", "1")
    finally:
        await servers.close()


def make_worker(server: ServerProcess, worker_id: str, declare: Callable[[Worker], None]) -> Worker:
    worker = Worker(app=APP, servers=[server.address], worker_id=worker_id, reconnect_min=0.05)
    declare(worker)
    return worker


async def job(worker: Worker, name: str) -> dict[str, Any]:
    return (await worker.call("JOB_GET", {"name": name}))["job"]


async def test_a_job_removed_from_the_code_is_paused_once_no_live_worker_declares_it(server: ServerProcess) -> None:
    def old_code(w: Worker) -> None:
        w.handler("h")(lambda ctx: None)
        w.schedule("kept", handler="h", interval=3600)
        w.schedule("removed", handler="h", interval=3600)

    def new_code(w: Worker) -> None:
        w.handler("h")(lambda ctx: None)
        w.schedule("kept", handler="h", interval=3600)

    old = make_worker(server, "old", old_code)
    await old.start(timeout=10)
    await old.stop(grace=0)
    new = make_worker(server, "new", new_code)
    await new.start(timeout=10)
    try:
        removed = await wait_until(lambda: _paused(new, "removed"), 15, "the undeclared job to be paused")
        assert (removed["paused_by"], removed["origin"]) == ("undeclared", "code")
        assert (await job(new, "kept"))["enabled"]
        # declaring it again (a rollback) resumes it
        await new.stop(grace=0)
        old = make_worker(server, "old", old_code)
        await old.start(timeout=10)
        back = await job(old, "removed")
        assert (back["enabled"], back["paused_by"]) == (True, None)
    finally:
        await new.stop(grace=0)
        await old.stop(grace=0)


async def _paused(worker: Worker, name: str) -> dict[str, Any] | None:
    row = await job(worker, name)
    return None if row["enabled"] else row


async def test_restarting_a_worker_never_resumes_a_job_an_operator_paused(server: ServerProcess) -> None:
    def code(w: Worker) -> None:
        w.handler("h")(lambda ctx: None)
        w.schedule("report", handler="h", interval=3600)

    first = make_worker(server, "w1", code)
    await first.start(timeout=10)
    assert (await first.call("JOB_ENABLE", {"name": "report", "enabled": False}))["ok"]
    await first.stop(grace=0)
    again = make_worker(server, "w1", code)
    await again.start(timeout=10)
    try:
        row = await job(again, "report")
        assert not row["enabled"]
        assert row["paused_by"] == "operator"
    finally:
        await again.stop(grace=0)


async def test_a_run_once_job_that_ran_is_not_planned_again_when_re_declared(server: ServerProcess) -> None:
    ran: asyncio.Queue[int] = asyncio.Queue()

    def code(w: Worker) -> None:
        w.handler("setup")(lambda ctx: ran.put_nowait(ctx.instance_id))
        w.schedule("setup", run_once=True)

    first = make_worker(server, "w1", code)
    await first.start(timeout=10)
    await asyncio.wait_for(ran.get(), 10)
    await wait_until(lambda: _settled(first, "setup"), 10, "the run-once job's fire to be recorded")
    await first.stop(grace=0)
    again = make_worker(server, "w1", code)
    await again.start(timeout=10)
    try:
        row = await job(again, "setup")
        assert row["next_trigger_ms"] is None and row["enabled"]
        instances = (await again.call("INSTANCE_LIST", {"job": "setup"}))["instances"]
        assert len(instances) == 1
    finally:
        await again.stop(grace=0)


async def _settled(worker: Worker, name: str) -> bool:
    instances = (await worker.call("INSTANCE_LIST", {"job": name}))["instances"]
    row = await job(worker, name)
    return len(instances) == 1 and instances[0]["status"] == "succeeded" and row["next_trigger_ms"] is None
