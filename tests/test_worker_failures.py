"""A worker off the happy path says why, once, and ends when nothing can mend it (issue 14)."""
from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fastjob import Worker
from fastjob.testing import ServerFactory


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_start_that_reaches_no_server_says_where_it_tried_and_why(caplog: pytest.LogCaptureFixture) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    worker = Worker(app="a", servers=[address], reconnect_min=0.05, reconnect_max=0.1)
    caplog.set_level(logging.INFO, "fastjob.worker")
    with pytest.raises(asyncio.TimeoutError) as timed_out:
        await worker.start(timeout=1.0)
    message = str(timed_out.value)
    assert f"not registered with any of {address} within 1.0s" in message
    assert "last failure" in message and ("refused" in message.lower() or "connect call failed" in message.lower())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "connection to" in r.getMessage()]
    assert len(warnings) == 1, "the first failure of a streak is a warning, its repeats are not"


async def test_run_refused_for_good_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    servers = ServerFactory(tmp_path)
    try:
        server = await servers.start(f"sqlite:///{tmp_path / 'fastjob.db'}", "--app-token", "billing=right")
        script = ("from fastjob import Worker\n"
                  f"w = Worker(app='billing', servers=['{server.address}'], token='wrong', worker_id='w1')\n"
                  "w.run()\n")
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], capture_output=True,
                                       text=True, timeout=60)
    finally:
        await servers.close()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fastjob worker w1 of app 'billing': rejected by") and "bad_token" in last


async def test_sigterm_with_a_stuck_plain_def_handler_exits_within_the_grace(tmp_path: Path) -> None:
    """A thread cannot be interrupted: its run is abandoned (and run again by the server), and the
    process does not wait for it at exit."""
    import signal
    import time

    servers = ServerFactory(tmp_path)
    marker = tmp_path / "running"
    script = (
        "import threading\n"
        "from pathlib import Path\n"
        "from fastjob import Worker\n"
        f"w = Worker(app='stuck', servers=[ADDRESS], worker_id='w1')\n"
        "@w.handler('stuck')\n"
        "def stuck(ctx):\n"
        f"    Path({str(marker)!r}).write_text('x')\n"
        "    threading.Event().wait()  # never returns\n"
        "w.schedule('stuck', interval=3600)\n"
        "w.run(grace=1.0)\n")
    try:
        server = await servers.start(f"sqlite:///{tmp_path / 'fastjob.db'}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script.replace("ADDRESS", repr(server.address)),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            from fastjob.testing import wait_until

            await wait_until(marker.exists, 30.0, "the handler to start")
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30.0)
            took = time.monotonic() - sent
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await servers.close()
    assert took <= 1.0 + 1.0, f"exited {took:.1f}s after SIGTERM with a 1s grace"


async def test_an_instance_whose_worker_is_cut_off_runs_again_only_after_the_first_run_stopped(servers, sqlite_url):
    """The worker running an instance is cut off (its connection closed, the process alive): the
    instance runs again on another worker only once the first run has stopped. The worker stops its
    runs the moment its run lease lapses, not up to a poll later, and the server waits past it."""
    import time

    from harness import FAST_CLUSTER_ARGS, wait_until
    from tcp_proxy import TcpProxy

    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, "--second-level-threshold", "0", "--run-lease", "2")
    host, port = server.address.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    runs: list[dict[str, float | None]] = []

    async def slow(ctx):
        run: dict[str, float | None] = {"start": time.monotonic(), "end": None}
        runs.append(run)
        try:
            await asyncio.sleep(4)
        finally:
            run["end"] = time.monotonic()

    cut_off = Worker(app="cut", servers=[f"127.0.0.1:{proxy.port}"], worker_id="cut-off", reconnect_max=60)
    cut_off.handler("slow")(slow)
    cut_off.schedule("slow", run_once=True)
    other = Worker(app="cut", servers=[server.address], worker_id="other", reconnect_max=0.5)
    other.handler("slow")(slow)
    try:
        async with cut_off:
            await wait_until(lambda: runs, 10, "the instance to start on the first worker")
            async with other:
                await proxy.cut()
                await wait_until(lambda: len(runs) >= 2, 20, "the instance to run again on the other worker")
                await wait_until(lambda: runs[0]["end"] is not None, 10, "the first run to be stopped")
                assert runs[1]["start"] >= runs[0]["end"], "the instance ran twice at once"  # type: ignore[operator]
    finally:
        await proxy.close()
