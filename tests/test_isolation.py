"""``isolation="process"``: a handler in a child process, which a timeout, a CANCEL or a stopping
worker terminates, where a thread runs on (issue 14). Against a real server (SQLite)."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import isolated_handlers as handlers
import pytest
from harness import FAST_CLUSTER_ARGS, wait_until

from fastjob import Worker

FINAL = {"succeeded", "failed", "timed_out", "cancelled", "interrupted"}


def make_worker(address: str, **kw: Any) -> Worker:
    worker = Worker(app="iso", servers=[address], reconnect_max=0.5, **kw)
    for fn in (handlers.spin, handlers.chatty, handlers.async_echo, handlers.boom, handlers.die):
        worker.handler(isolation="process")(fn)
    return worker


def alive(pid: int) -> bool:
    """Is ``pid`` a process (a zombie counts: the worker must reap its children)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def final(worker: Worker, instance_id: int, timeout: float = 15.0) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        row = await worker.get_instance(instance_id)
        return row if row["status"] in FINAL else None

    row: dict[str, Any] = await wait_until(done, timeout, f"instance {instance_id} to finish", poll=0.05)
    return row


async def started_pid(pid_file: Path) -> int:
    text = await wait_until(lambda: pid_file.exists() and pid_file.read_text(), 15.0, "the handler to start")
    return int(text)


async def test_a_timed_out_handler_is_killed_and_the_worker_goes_on(servers, sqlite_url, tmp_path):
    """The target of issue 14: in a thread this handler would spin forever after its timeout."""
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = make_worker(server.address)
    worker.schedule("spin", timeout=1)
    worker.schedule("chatty")
    pid_file = tmp_path / "spin.pid"
    async with worker:
        instance_id = await worker.trigger("spin", {"pid_file": str(pid_file)})
        pid = await started_pid(pid_file)
        await wait_until(lambda: not alive(pid), 10.0, "the handler's process to die", poll=0.01)
        dead_at = time.time()
        row = await final(worker, instance_id)
        assert row["status"] == "timed_out" and "timeout" in row["error"], row
        after_timeout = dead_at - row["started_at"] - 1.0
        print(f"child dead {after_timeout:.3f}s after its 1s timeout")
        assert after_timeout <= 1.5, f"the child died {after_timeout:.2f}s after the timeout"
        # the worker is healthy: the next run gets a new child and succeeds
        second = await final(worker, await worker.trigger("chatty", {"who": "next"}))
        assert second["status"] == "succeeded", second
        assert second["result"]["pid"] not in (pid, os.getpid())


async def test_log_lines_and_the_result_come_back_from_the_child(servers, sqlite_url):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = make_worker(server.address)
    worker.schedule("chatty")
    worker.schedule("async_echo")
    async with worker:
        row = await final(worker, await worker.trigger("chatty", {"who": "world"}))
        assert row["status"] == "succeeded", row
        result = row["result"]
        assert result["pid"] != os.getpid()
        assert result == {"pid": result["pid"], "job": "chatty", "attempt": 1, "params": {"who": "world"}}
        lines = await wait_until(lambda: _lines(worker, row["id"], 2), 10.0, "the child's log lines")
        assert lines == [["INFO", "hello world"], ["WARNING", f"from process {result['pid']}"]]
        # an async handler runs under asyncio.run in its child; children are reused between runs
        row = await final(worker, await worker.trigger("async_echo", [1, 2]))
        assert row["status"] == "succeeded" and row["result"] == {"pid": result["pid"], "params": [1, 2]}, row
        assert await wait_until(lambda: _lines(worker, row["id"], 1), 10.0, "its line") == [
            ["INFO", "async in the child"]]


async def _lines(worker: Worker, instance_id: int, count: int) -> list[list[Any]] | None:
    lines = [[level, text] for _, level, text in await worker.get_logs(instance_id)]
    return lines if len(lines) >= count else None


async def test_an_exception_or_a_dead_child_fails_only_its_run(servers, sqlite_url):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = make_worker(server.address)
    for name in ("boom", "die", "chatty"):
        worker.schedule(name)
    async with worker:
        row = await final(worker, await worker.trigger("boom", {"n": 7}))
        assert (row["status"], row["error"]) == ("failed", "ValueError: bad input 7")
        row = await final(worker, await worker.trigger("die"))
        assert row["status"] == "failed" and "exit code 3" in row["error"], row
        # the line it wrote just before it died was read before the end of its pipe
        assert await wait_until(lambda: _lines(worker, row["id"], 1), 10.0, "its line") == [["INFO", "about to exit"]]
        row = await final(worker, await worker.trigger("chatty", {"who": "after"}))
        assert row["status"] == "succeeded", row


async def test_a_cancel_terminates_the_child(servers, sqlite_url, tmp_path):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = make_worker(server.address)
    worker.schedule("spin")
    pid_file = tmp_path / "spin.pid"
    async with worker:
        instance_id = await worker.trigger("spin", {"pid_file": str(pid_file)})
        pid = await started_pid(pid_file)
        worker._runs.cancel(instance_id, "cancelled by the test")  # as a CANCEL frame does
        await wait_until(lambda: instance_id in worker._sent_results, 5.0, "the run's report")
        assert worker._sent_results[instance_id]["status"] == "interrupted"
        assert worker._sent_results[instance_id]["error"] == "interrupted: cancelled by the test"
        assert not alive(pid)


async def test_stop_with_a_stuck_handler_returns_within_the_grace_and_leaves_no_child(servers, sqlite_url, tmp_path):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = make_worker(server.address)
    worker.schedule("spin")
    worker.schedule("chatty")
    pid_file = tmp_path / "spin.pid"
    await worker.start()
    try:
        idle = (await final(worker, await worker.trigger("chatty", {"who": "idle"})))["result"]["pid"]
        instance_id = await worker.trigger("spin", {"pid_file": str(pid_file)})
        pid = await started_pid(pid_file)
        began = time.monotonic()
        await worker.stop(grace=0.5)
        took = time.monotonic() - began
    finally:
        await worker.stop(grace=0)
    assert took <= 0.5 + 1.0, f"stop(grace=0.5) took {took:.2f}s"
    assert worker._sent_results[instance_id]["status"] == "interrupted"
    assert not alive(pid), "the stuck handler's process outlived the worker"
    assert not alive(idle), "an idle child outlived the worker"


def test_refused_at_once() -> None:
    with pytest.raises(ValueError, match="isolation must be one of thread, process, got 'fork'"):
        Worker(app="a", servers=["127.0.0.1:1"], isolation="fork")
    worker = Worker(app="a", servers=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="handler 'odd': isolation must be one of thread, process, got 'green'"):
        worker.handler("odd", isolation="green")(handlers.chatty)
    assert "odd" not in worker.handlers

    class Local(dict):  # msgpack takes it (a map); pickle cannot find the class by name
        pass

    worker.handler("in_thread")(handlers.chatty)
    worker.schedule("in_thread", params=Local(a=1))  # a thread gets the params as they are
    worker.handler("in_child", isolation="process")(handlers.chatty)
    with pytest.raises(ValueError, match="job 'pickled'.*cannot be pickled") as refused:
        worker.schedule("pickled", handler="in_child", params=Local(a=1))
    assert "isolation='process'" in str(refused.value)
    worker.schedule("plain", handler="in_child", params={"a": 1})
    # the worker's default, and a handler's override of it
    processes = Worker(app="a", servers=["127.0.0.1:1"], isolation="process")
    processes.handler("by_default")(handlers.chatty)
    processes.handler("override", isolation="thread")(handlers.chatty)
    assert processes.handler_isolation == {"by_default": "process", "override": "thread"}
    with pytest.raises(ValueError, match="job 'by_default'"):
        processes.schedule("by_default", params=Local())
    processes.schedule("override", params=Local())


def test_the_pool_alone_on_each_loop(run, tmp_path):
    """SIGKILL follows SIGTERM after TERM_WAIT; a large run and result cross the pipe (under uvloop
    a watched fd turns non-blocking, which broke a version reading with add_reader); a handler that
    cannot be pickled fails its run only; close() kills the idle children."""
    from fastjob.context import JobContext, LocalLog
    from fastjob.isolation import TERM_WAIT, ChildRunError, ProcessPool

    def context(params: Any) -> JobContext:
        return JobContext(1, "job", 1, params, 1, 0.0, LocalLog("job"))

    async def scenario() -> int:
        pool = ProcessPool(2)
        lines: list[tuple[str, str]] = []
        pid_file = tmp_path / "stubborn.pid"
        try:
            stuck = asyncio.ensure_future(pool.run(handlers.stubborn, context({"pid_file": str(pid_file)}), print))
            pid = await started_pid(pid_file)
            began = time.monotonic()
            stuck.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stuck
            took = time.monotonic() - began
            assert not alive(pid) and TERM_WAIT <= took <= TERM_WAIT + 1.0, took
            big = "x" * 3_000_000
            result = await pool.run(handlers.chatty, context({"who": "big", "big": big}),
                                    lambda *line: lines.append(line))
            assert result["params"]["big"] == big
            assert lines == [("INFO", "hello big"), ("WARNING", f"from process {result['pid']}")]
            with pytest.raises(ChildRunError, match="handler cannot be sent to a child process"):
                await pool.run(lambda ctx: None, context(None), print)
            assert pool.pids == [result["pid"]]
        finally:
            pool.close()
        return int(result["pid"])

    idle = run(scenario(), 30.0)
    assert not alive(idle)
