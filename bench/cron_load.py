"""Sustained cron load: N jobs with ``* * * * * *`` on one server and one worker (bench_cron.py).

Three figures for the same N, measured the same way (lateness = the handler's start minus its
planned second):

* FastJob: a real ``fastjob-server`` process (SQLite, or MariaDB on a database of its own) and
  one worker process (bench/_load_worker.py) declaring the N jobs. Over a window of planned
  seconds after a warm-up: fires delivered per second, fires lost (planned in the window, never
  run), lateness p50/p99/max, and on MariaDB the statements per fire (``Questions``, global:
  run it on a quiet server).
* APScheduler 3 in process (uvloop, no network, no database): AsyncIOScheduler, AsyncIOExecutor,
  ``misfire_grace_time=30``, ``coalesce=False``, ``max_instances=1``; each start is paired with
  the scheduled time of the submission it came from (EVENT_JOB_SUBMITTED, in order per job).
* The floor: ``loop.call_at`` at each whole second plus one task per fire, in one process: what
  any worker starting N async handlers at one instant pays.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoadResult:
    system: str
    jobs: int
    backend: str
    window_s: float
    delivered_per_s: float
    lost: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    statements_per_fire: float | None = None
    notes: list[str] = field(default_factory=list)
    add_s: float | None = None  # putting the N jobs in: a worker's registration, or N add_job calls
    cpu_per_s: float | None = None  # CPU seconds per second over the window, every process of the system
    lateness_ms: list[float] = field(default_factory=list, repr=False)  # sorted, the window's fires

    def row(self) -> str:
        spf = "-" if self.statements_per_fire is None else f"{self.statements_per_fire:.3f}"
        return (f"{self.system:12} {self.backend:7} {self.jobs:7,d} {self.delivered_per_s:10,.0f} "
                f"{self.lost:7,d} {self.p50_ms:9.1f} {self.p99_ms:9.1f} {self.max_ms:9.1f} {spf:>9}")


HEADER = (f"{'system':12} {'store':7} {'jobs':>7} {'fires/s':>10} {'lost':>7} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'max ms':>9} {'stmt/fire':>9}")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarise(system: str, backend: str, jobs: int, starts: list[tuple[int, int, float]], first_s: int,
              window: int) -> LoadResult:
    """``starts``: (job index, planned second, start time) of every run seen."""
    seen = {(j, p) for j, p, _ in starts if first_s <= p < first_s + window}
    late = sorted((t - p) * 1000.0 for j, p, t in starts if first_s <= p < first_s + window)
    return LoadResult(system, jobs, backend, window, len(seen) / window, jobs * window - len(seen),
                      percentile(late, 0.5), percentile(late, 0.99), late[-1] if late else float("nan"),
                      lateness_ms=late)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- FastJob: a server process and a worker process ---------------------------------------------------
def _admin(base: str, sql: str) -> tuple[Any, ...] | None:
    """Run one statement on the server of ``base`` (no database selected); its first row, if any."""
    import pymysql

    parts = urlsplit(base)
    conn = pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()
    finally:
        conn.close()


def _mysql_database(base: str) -> tuple[str, str]:
    name = f"fastjob_load_{uuid.uuid4().hex[:8]}"
    _admin(base, f"CREATE DATABASE `{name}`")
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, "", "")), name


def _mysql_drop(base: str, name: str) -> None:
    _admin(base, f"DROP DATABASE IF EXISTS `{name}`")


def _questions(base: str) -> int:
    row = _admin(base, "SHOW GLOBAL STATUS LIKE 'Questions'")
    assert row is not None
    return int(row[1])


def _read_line(proc: subprocess.Popen[bytes], prefix: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line
    raise RuntimeError(f"no {prefix!r} within {timeout}s")


def run_fastjob(jobs: int, backend: str, mysql_dsn: str, warmup: float, window: int,
                server_args: list[str], tail: float = 5.0) -> LoadResult:
    tmp = Path(tempfile.mkdtemp(prefix="fastjob-load-"))
    dropped: tuple[str, str] | None = None
    if backend == "sqlite":
        db = f"sqlite:///{tmp / 'load.db'}"
    else:
        db, name = _mysql_database(mysql_dsn)
        dropped = (mysql_dsn, name)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp / "server.log", "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", "0",
                                       "--http-port", "-1", "--db", db, "--log-level", "WARNING", *server_args],
                                      stdout=subprocess.PIPE, stderr=log, env=env)
        procs.append(server)
        address = _read_line(server, b"FASTJOB_READY ", 60).split()[1].decode()
        out = tmp / "runs.bin"
        with open(tmp / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_load_worker.py"), address, str(jobs),
                                       str(out)], stdout=subprocess.PIPE, stderr=log, env=env)
        procs.append(worker)
        spawned = time.perf_counter()
        _read_line(worker, b"READY", 600)
        registered = time.perf_counter() - spawned
        first_s = int(time.time() + warmup) + 1
        q0 = None
        while time.time() < first_s:
            time.sleep(0.05)
        if backend == "mysql":
            q0 = _questions(mysql_dsn)
        cpu0 = sum(_cpu_seconds(p.pid) for p in procs)
        while time.time() < first_s + window:
            time.sleep(0.05)
        cpu = (sum(_cpu_seconds(p.pid) for p in procs) - cpu0) / window
        q1 = _questions(mysql_dsn) if backend == "mysql" else None
        time.sleep(tail)  # the last second's fires finish (and late ones come in)
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        starts = _load_runs(out)
        result = summarise("fastjob", backend, jobs, starts, first_s, window)
        result.add_s, result.cpu_per_s = registered, cpu
        if q0 is not None and q1 is not None:
            fires = max(1, sum(1 for _, p, _ in starts if first_s <= p < first_s + window))
            result.statements_per_fire = (q1 - q0) / fires
        shutil.rmtree(tmp, ignore_errors=True)  # kept only when the run failed: its logs are there
        return result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if dropped is not None:
            _mysql_drop(*dropped)


def _load_runs(path: Path) -> list[tuple[int, int, float]]:
    import array

    raw = array.array("d")
    with open(path, "rb") as f:
        raw.frombytes(f.read())
    return [(int(raw[i]), int(raw[i + 1]), raw[i + 2]) for i in range(0, len(raw), 3)]


# ---- APScheduler 3 in process ----------------------------------------------------------------------------
def run_apscheduler(jobs: int, warmup: float, window: int, loop: str = "uvloop", tail: float = 5.0) -> LoadResult:
    """``loop``: uvloop or asyncio, the event loop APScheduler's AsyncIOScheduler runs on."""
    import uvloop
    from apscheduler.events import EVENT_JOB_SUBMITTED
    from apscheduler.executors.asyncio import AsyncIOExecutor
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger

    starts: list[tuple[int, int, float]] = []
    submitted: dict[int, list[int]] = {}
    costs: dict[str, float] = {}

    async def main() -> None:
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(),
                                     executors={"default": AsyncIOExecutor()},
                                     job_defaults={"misfire_grace_time": 30, "coalesce": False, "max_instances": 1})

        def on_submitted(event: Any) -> None:
            submitted.setdefault(int(event.job_id), []).extend(
                int(t.timestamp()) for t in event.scheduled_run_times)

        scheduler.add_listener(on_submitted, EVENT_JOB_SUBMITTED)
        seen: dict[int, int] = {}

        async def job(index: int) -> None:
            started = time.time()
            k = seen.get(index, 0)
            seen[index] = k + 1
            planned = submitted.get(index, [])
            if k < len(planned):
                starts.append((index, planned[k], started))

        began = time.perf_counter()
        for i in range(jobs):
            scheduler.add_job(job, CronTrigger(second="*", timezone="UTC"), args=[i], id=str(i))
        scheduler.start()
        costs["add"] = time.perf_counter() - began
        first_s = int(time.time() + warmup) + 1
        await asyncio.sleep(first_s - time.time())
        cpu0 = time.process_time()
        await asyncio.sleep(first_s + window - time.time())
        costs["cpu"] = (time.process_time() - cpu0) / window
        await asyncio.sleep(first_s + window + tail - time.time())
        # pause, and let the jobs in flight finish: the executor's shutdown cancels them and
        # APScheduler logs a traceback for each
        scheduler.pause()
        in_flight = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if in_flight:
            await asyncio.wait(in_flight, timeout=10)
        scheduler.shutdown(wait=False)
        main.first_s = first_s  # type: ignore[attr-defined]

    (uvloop.run if loop == "uvloop" else asyncio.run)(main())
    system = "apscheduler3" if loop == "uvloop" else "aps3 asyncio"
    result = summarise(system, "memory", jobs, starts, main.first_s, window)  # type: ignore[attr-defined]
    result.notes.append(f"AsyncIOScheduler + AsyncIOExecutor on {loop}, misfire_grace_time=30, coalesce=False,"
                        " max_instances=1")
    result.add_s, result.cpu_per_s = costs["add"], costs["cpu"]
    return result


# ---- the floor: loop.call_at + one task per fire --------------------------------------------------------
def run_floor(jobs: int, window: int) -> LoadResult:
    import uvloop

    starts: list[tuple[int, int, float]] = []

    async def main() -> int:
        loop = asyncio.get_running_loop()
        first_s = int(time.time()) + 2

        async def handler(index: int, planned: int) -> None:
            starts.append((index, planned, time.time()))

        def burst(planned: int) -> None:
            for i in range(jobs):
                loop.create_task(handler(i, planned))

        offset = loop.time() - time.time()
        for s in range(first_s, first_s + window):
            loop.call_at(s + offset, burst, s)
        await asyncio.sleep(first_s - time.time())
        cpu0 = time.process_time()
        await asyncio.sleep(first_s + window - time.time())
        cpu.append((time.process_time() - cpu0) / window)
        await asyncio.sleep(first_s + window + 2.0 - time.time())
        return first_s

    cpu: list[float] = []
    first_s = uvloop.run(main())
    result = summarise("call_at", "memory", jobs, starts, first_s, window)
    result.cpu_per_s = cpu[0]
    return result


def report(results: list[LoadResult]) -> str:
    lines = [HEADER] + [r.row() for r in results]
    for r in results:
        lines += [f"  {r.system}/{r.jobs}: {note}" for note in r.notes]
    return "\n".join(lines)


def stdev(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":  # python bench/cron_load.py 1000 sqlite
    n, store = int(sys.argv[1]), sys.argv[2]
    print(HEADER)
    print(run_fastjob(n, store, "mysql://root@127.0.0.1:3306/test", 8.0, 10, []).row(), flush=True)
    print(json.dumps({"done": True}))
