"""Real ``fastjob-server`` processes for tests: on 127.0.0.1, free ports, always stopped.

FastJob's own acceptance tests use these, and so can a project's tests of its workers::

    from fastjob.testing import ServerFactory

    async def test_my_job(tmp_path):
        servers = ServerFactory(tmp_path)
        try:
            server = await servers.start(f"sqlite:///{tmp_path / 'fastjob.db'}")
            worker = Worker(app="billing", servers=[server.address])
            ...
        finally:
            await servers.close()
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAST_CLUSTER_ARGS = [
    "--heartbeat-interval", "0.25",
    "--heartbeat-timeout", "1.5",
    "--scan-horizon", "1.0",
    "--misfire-threshold", "3",
]


class ServerProcess:
    """One server subprocess. ``start()`` waits for its FASTJOB_READY line (bounded)."""

    def __init__(self, db: str, log_path: Path, *args: str, port: int = 0) -> None:
        self.db = db
        self.log_path = log_path
        self.args = list(args)
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""
        self.http_address = ""  # of its admin API
        self.admin_token: str | None = None  # printed on the first start of a database

    async def start(self, timeout: float = 30.0) -> str:
        log_file = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", str(self.port), "--http-port", "0",
            "--db", self.db, "--log-level", "DEBUG", *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env)
        log_file.close()
        assert self.proc.stdout is not None
        try:
            while True:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
                if not line:
                    raise RuntimeError(f"server exited before it was ready; see {self.log_path}:\n{self.log_tail()}")
                if line.startswith(b"FASTJOB_ADMIN_TOKEN "):
                    self.admin_token = line.split()[1].decode()
                elif line.startswith(b"FASTJOB_HTTP "):
                    self.http_address = line.split()[1].decode()
                elif line.startswith(b"FASTJOB_READY "):
                    self.address = line.split()[1].decode()
                    self.port = int(self.address.rsplit(":", 1)[1])
                    return self.address
        except BaseException:
            self.kill()
            raise

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def kill(self) -> None:
        """kill -9: no clean shutdown, nothing released."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.proc is None:
            return 0
        if self.proc.returncode is not None:
            return self.proc.returncode
        self.proc.terminate()
        try:
            return await self.wait(timeout)
        except asyncio.TimeoutError:
            self.kill()
            await self.wait(5)
            raise


class ServerFactory:
    """Makes servers for one test and stops all of them afterwards, whatever happened."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[ServerProcess] = []

    async def start(self, db: str, *args: str, port: int = 0) -> ServerProcess:
        server = ServerProcess(db, self.tmp_path / f"server{len(self.servers)}.log", *args, port=port)
        self.servers.append(server)
        await server.start()
        return server

    async def close(self) -> None:
        """SIGTERM (so that coverage in the servers is written), then SIGKILL after 5 s."""
        for server in self.servers:
            server.signal(signal.SIGCONT)  # a stopped process cannot act on a signal until it runs
            server.signal(signal.SIGTERM)
        for server in self.servers:
            if server.proc is None:
                continue
            try:
                await server.wait(5)
            except asyncio.TimeoutError:
                server.kill()
                try:
                    await server.wait(10)
                except asyncio.TimeoutError:
                    pass

    def logs(self) -> str:
        return "\n".join(f"--- {s.log_path.name}\n{s.log_tail(60)}" for s in self.servers)


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll a condition that has no event to await (state in another process), with a bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)


async def next_event(queue: asyncio.Queue[Any], timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(queue.get(), timeout)
