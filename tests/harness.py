"""Start real ``fastjob-server`` processes for tests, on 127.0.0.1 and free ports, and always stop them."""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

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
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.address = ""

    async def start(self, timeout: float = 30.0) -> str:
        log_file = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", str(self.port),
            "--db", self.db, "--log-level", "DEBUG", *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env)
        log_file.close()
        assert self.proc.stdout is not None
        try:
            while True:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
                if not line:
                    raise RuntimeError(f"server exited before it was ready; see {self.log_path}:\n{self.log_tail()}")
                if line.startswith(b"FASTJOB_READY "):
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
        if not self.running:
            return self.proc.returncode if self.proc else 0
        assert self.proc is not None
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
        for server in self.servers:
            server.kill()
            if server.proc is not None:
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


async def next_event(queue: "asyncio.Queue[Any]", timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(queue.get(), timeout)



class WorkerProcess:
    """A worker in its own process (tests/sl_worker.py), so it can be killed with -9."""

    def __init__(self, server: str, worker_id: str, out_path: Path, period: float, log_path: Path) -> None:
        self.argv = [sys.executable, str(Path(__file__).with_name("sl_worker.py")), server, worker_id,
                     str(out_path), str(period)]
        self.log_path = log_path
        self.proc: Optional[asyncio.subprocess.Process] = None

    async def start(self, timeout: float = 20.0) -> None:
        repo = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        with open(self.log_path, "ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if line.strip() != b"READY":
            self.kill()
            raise RuntimeError(f"worker did not start: {self.log_path.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def close(self) -> None:
        self.signal(signal.SIGCONT)  # a stopped process cannot die of SIGKILL until it runs
        self.kill()
        if self.proc is not None:
            await asyncio.wait_for(self.proc.wait(), 10)


MARIADBD = "/usr/sbin/mariadbd"


def restart_mariadb(timeout: float = 60.0) -> None:
    """Stop the local MariaDB, wait until it is gone, start it again, wait until it answers."""
    import subprocess
    import time

    def mariadb_running() -> bool:
        return subprocess.run(["start-stop-daemon", "--status", "--exec", MARIADBD]).returncode == 0

    def answers() -> bool:
        return subprocess.run(["mysqladmin", "-uroot", "-h127.0.0.1", "--connect-timeout=2", "ping"],
                              capture_output=True).returncode == 0

    def wait(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"MariaDB {what} within {timeout}s")
            time.sleep(0.05)

    try:
        subprocess.run(["mysqladmin", "-uroot", "-h127.0.0.1", "--connect-timeout=5", "shutdown"],
                       check=True, timeout=30, capture_output=True)
        wait(lambda: not mariadb_running(), "did not stop")
    finally:
        subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", MARIADBD], check=False)
        wait(answers, "did not come back")


def ticking_worker(addresses: list[str], executions: "collections.Counter[int]", *, app: str = "shop",
                   interval: float = 0.2) -> Any:
    """A worker whose fixed-rate job 'tick' counts how often each instance id runs."""
    from fastjob import Worker

    worker = Worker(app=app, servers=addresses, reconnect_max=0.3)

    @worker.handler("tick")
    async def tick(ctx: Any) -> None:
        executions[ctx.instance_id] += 1

    worker.schedule("tick", interval=interval)
    return worker


async def past_fires_final(worker: Any, job: str = "tick", settle: float = 2.0) -> Any:
    """All instance rows of ``job`` if every fire planned over ``settle`` s ago is final, else None."""
    import time

    rows = await worker.list_instances(job=job, limit=10_000)
    past = [r for r in rows if r["planned_ms"] / 1000 < time.time() - settle]
    unfinished = [r for r in past if r["status"] in ("waiting", "dispatched", "running")]
    return rows if past and not unfinished else None
