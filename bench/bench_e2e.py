"""End-to-end scheduling of regular jobs: a burst of fires through WAL, wheel, TCP and a worker.

    python bench/bench_e2e.py [--jobs 20000] [--mysql-dsn mysql://root@127.0.0.1:3306/test] [--quick]

``--jobs`` one-shot jobs are written into a fresh database, all due at the same instant T.
A real fastjob-server process claims them (instance rows first), loads them into its wheel,
and at T dispatches every one over TCP to one worker in this process, which runs a no-op
handler and reports the result; the server writes every status in batches.

Reported: the lateness of each fire (handler start minus planned time; p50/p99/max), the
dispatch rate (fires / time from T to the last handler start), and the time until every
instance row is final in the database. Baseline in the same run: the same number of fires
from ``loop.call_at`` in one process with no scheduler, no network and no database (the
floor an event loop alone sets).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastjob import Worker  # noqa: E402
from fastjob.models import JobSpec, ScheduleType
from fastjob.store import create_store


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def row(name: str, lateness: list[float], span: float) -> None:
    ordered = sorted(lateness)
    rate = len(ordered) / span if span > 0 else float("inf")
    print(f"  ({name}: first fire {ordered[0] * 1e3:.2f} ms late)")
    print(f"{name:<40} {len(ordered):>8} {rate:>12.0f} {percentile(ordered, .5) * 1e3:>9.2f} "
          f"{percentile(ordered, .99) * 1e3:>9.2f} {ordered[-1] * 1e3 if ordered else float('nan'):>9.2f}")


async def seed_jobs(url: str, jobs: int, due_ms: int) -> None:
    store = create_store(url)
    await store.open()
    try:
        started = time.perf_counter()
        for i in range(jobs):
            spec = JobSpec(app="bench-e2e", name=f"job-{i}", handler="noop", schedule_type=ScheduleType.ONCE,
                           schedule_expr=repr(due_ms / 1000))
            await store.upsert_job(spec, due_ms, time.time())
        print(f"  seeded {jobs} jobs in {time.perf_counter() - started:.1f}s")
    finally:
        await store.close()


async def count_final(url: str) -> int:
    store = create_store(url)
    await store.open()
    try:
        rows = await store.list_instances("bench-e2e", limit=10_000_000)
        return sum(1 for r in rows if r.status.value == "succeeded")
    finally:
        await store.close()


class BurstWorker:
    """One worker whose no-op handler notes each start's lateness; ``done`` is set at the last of ``jobs``."""

    def __init__(self, address: str, app: str, jobs: int) -> None:
        self.jobs = jobs
        self.lateness: list[float] = []
        self.done = asyncio.Event()
        self.last_start = 0.0
        self.worker = Worker(app=app, servers=[address], max_concurrency=jobs + 1)
        self.worker.handler("noop")(self._noop)

    async def _noop(self, ctx: Any) -> None:
        self.last_start = time.time()
        self.lateness.append(self.last_start - ctx.scheduled_at)
        if len(self.lateness) == self.jobs:
            self.done.set()


async def measure_fastjob(url: str, jobs: int, lead: float) -> tuple[list[float], float, float]:
    due = time.time() + lead
    await seed_jobs(url, jobs, int(due * 1000))
    due = int(due * 1000) / 1000
    repo = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(
        [sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", "0", "--http-port", "-1", "--db", url,
         "--log-level", "WARNING", "--scan-horizon", "5", "--second-level-threshold", "0"],
        stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        assert server.stdout is not None
        line = await asyncio.to_thread(server.stdout.readline)
        address = line.decode().split()[1]
        burst = BurstWorker(address, "bench-e2e", jobs)
        async with burst.worker:
            if time.time() > due:
                raise SystemExit("the jobs came due before the worker registered: raise --lead")
            await asyncio.wait_for(burst.done.wait(), lead + 120)
            dispatch_span = burst.last_start - due
            lateness = burst.lateness
            while await count_final(url) < jobs:
                if time.time() - due > lead + 300:
                    raise SystemExit("instances did not all become final")
                await asyncio.sleep(0.2)
            final_after = time.time() - due
        return lateness, dispatch_span, final_after
    finally:
        server.terminate()
        server.wait(10)


async def measure_call_at(jobs: int) -> tuple[list[float], float]:
    """The floor: ``jobs`` loop.call_at fires at one instant, each running a no-op task."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    done = asyncio.Event()
    due_wall = time.time() + 0.5
    due_loop = loop.time() + (due_wall - time.time())
    last_start = 0.0

    async def noop() -> None:
        nonlocal last_start
        last_start = time.time()
        lateness.append(last_start - due_wall)
        if len(lateness) == jobs:
            done.set()

    for _ in range(jobs):
        loop.call_at(due_loop, lambda: loop.create_task(noop()))
    await asyncio.wait_for(done.wait(), 60)
    return lateness, last_start - due_wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--mysql-dsn", default=None, help="also run against this MySQL/MariaDB database")
    parser.add_argument("--lead", type=float, default=12.0, help="seconds from seeding to the due instant")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs")
    args = parser.parse_args()
    if args.quick:
        args.jobs = 2000
    try:
        import uvloop

        run, loop_name = uvloop.run, "uvloop"
    except ImportError:
        run, loop_name = asyncio.run, "asyncio"
    print(f"{args.jobs} one-shot jobs due at one instant, one worker ({loop_name})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        urls = [("sqlite", f"sqlite:///{os.path.join(tmp, 'e2e.db')}")]
        if args.mysql_dsn:
            urls.append(("mysql", args.mysql_dsn))
        for name, url in urls:
            with (fresh_mysql_database(url) if name == "mysql" else contextlib.nullcontext(url)) as db:
                lateness, span, final_after = run(measure_fastjob(db, args.jobs, args.lead))
            results.append((f"fastjob e2e ({name})", lateness, span, final_after))
    base_lateness, base_span = run(measure_call_at(args.jobs))
    print(f"\n{'':<40} {'fires':>8} {'fires/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, lateness, span, _final_after in results:
        row(name, lateness, span)
    row(f"baseline: call_at in one process ({loop_name})", base_lateness, base_span)
    for name, lateness, span, final_after in results:
        print(f"{name}: every instance row final {final_after:.2f}s after the due instant; "
              f"dispatch rate {len(lateness) / span / (len(base_lateness) / base_span):.3f}x the baseline's")


@contextlib.contextmanager
def fresh_mysql_database(url: str, prefix: str = "fastjob_bench_e2e") -> Iterator[str]:
    """A new empty database on the server named by ``url``, dropped afterwards (bench data only)."""
    import pymysql

    parts = urlsplit(url)
    conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                           password=parts.password or "", autocommit=True)
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


if __name__ == "__main__":
    main()
