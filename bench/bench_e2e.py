"""End-to-end scheduling of regular jobs: a burst of fires through WAL, wheel, TCP and a worker.

    python bench/bench_e2e.py [--jobs 20000] [--mysql-dsn mysql://root@127.0.0.1:3306/test] [--quick]
                              [--lead-time 1] [--scan-horizon 5] [--apscheduler] [--samples PATH] [--json PATH]

``--jobs`` one-shot jobs are written into a fresh database, all due at the same instant T.
A real fastjob-server process claims them (instance rows first), loads them into its wheel,
and at T dispatches every one over TCP to one worker in this process, which runs a no-op
handler and reports the result; the server writes every status in batches.

Reported: the lateness of each fire (handler start minus planned time; p50/p99/max), the
dispatch rate (fires / time from T to the last handler start), and the time until every
instance row is final in the database. Baseline in the same run: the same number of fires
from ``loop.call_at`` in one process with no scheduler, no network and no database (the
floor an event loop alone sets).

``--lead-time`` and ``--scan-horizon`` are the server's (a big burst needs a longer lead time,
and a horizon of at least twice it; the values used are printed). ``--apscheduler`` runs the
same burst through APScheduler 3 in this process too (DateTrigger jobs, memory job store,
AsyncIOExecutor, on asyncio and on uvloop): time to add the jobs, lateness, CPU seconds.
``--samples`` writes every fire's (start - due, lateness) per system, for the suite's plots.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _figures import Figure, add_json_option, figure, write

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
        self.starts: list[float] = []
        self.done = asyncio.Event()
        self.last_start = 0.0
        self.worker = Worker(app=app, servers=[address], max_concurrency=jobs + 1)
        self.worker.handler("noop")(self._noop)

    async def _noop(self, ctx: Any) -> None:
        self.last_start = time.time()
        self.starts.append(self.last_start)
        self.lateness.append(self.last_start - ctx.scheduled_at)
        if len(self.lateness) == self.jobs:
            self.done.set()


@dataclass
class Burst:
    """One system's burst: every fire's start (wall time) and lateness, and what it cost."""

    lateness: list[float]
    starts: list[float]
    span: float  # from the due instant to the last handler start
    final_after: float = float("nan")  # FastJob: until every instance row is final
    cpu_s: float = float("nan")  # CPU seconds of every process that took part
    add_s: float = float("nan")  # putting the jobs in: seeding the store, or add_job calls


def server_command(url: str, lead_time: float, horizon: float, prefix: Sequence[str] = ()) -> list[str]:
    """The fastjob-server command line of a burst; ``prefix`` runs it under a profiler."""
    return [sys.executable, *prefix, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", "0",
            "--http-port", "-1", "--db", url, "--log-level", "WARNING", "--scan-horizon", f"{horizon:g}",
            "--lead-time", f"{lead_time:g}", "--second-level-threshold", "0"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): no psutil needed for a number."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_fastjob(url: str, jobs: int, lead: float, *, lead_time: float = 1.0, horizon: float = 5.0,
                          prefix: Sequence[str] = (),
                          on_server: Callable[[subprocess.Popen[bytes]], Any] | None = None) -> Burst:
    """The burst through a real server process and one worker in this process.

    ``on_server`` is called with the server process once it is ready (a profiler attaches there)."""
    due = time.time() + lead
    seeded = time.perf_counter()
    await seed_jobs(url, jobs, int(due * 1000))
    seed_s = time.perf_counter() - seeded
    due = int(due * 1000) / 1000
    repo = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(server_command(url, lead_time, horizon, prefix), stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        assert server.stdout is not None
        line = await asyncio.to_thread(server.stdout.readline)
        address = line.decode().split()[1]
        if on_server is not None:
            on_server(server)
        cpu0 = cpu_seconds(server.pid) + time.process_time()
        burst = BurstWorker(address, "bench-e2e", jobs)
        async with burst.worker:
            if time.time() > due:
                raise SystemExit("the jobs came due before the worker registered: raise --lead")
            await asyncio.wait_for(burst.done.wait(), lead + 120)
            dispatch_span = burst.last_start - due
            while await count_final(url) < jobs:
                if time.time() - due > lead + 300:
                    raise SystemExit("instances did not all become final")
                await asyncio.sleep(0.2)
            final_after = time.time() - due
        cpu = cpu_seconds(server.pid) + time.process_time() - cpu0
        return Burst(burst.lateness, burst.starts, dispatch_span, final_after, cpu, seed_s)
    finally:
        server.terminate()
        server.wait(30)


async def measure_call_at(jobs: int) -> Burst:
    """The floor: ``jobs`` loop.call_at fires at one instant, each running a no-op task."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    starts: list[float] = []
    done = asyncio.Event()
    cpu0 = time.process_time()
    due_wall = time.time() + 0.5
    due_loop = loop.time() + (due_wall - time.time())
    last_start = 0.0

    async def noop() -> None:
        nonlocal last_start
        last_start = time.time()
        starts.append(last_start)
        lateness.append(last_start - due_wall)
        if len(lateness) == jobs:
            done.set()

    for _ in range(jobs):
        loop.call_at(due_loop, lambda: loop.create_task(noop()))
    await asyncio.wait_for(done.wait(), 60)
    return Burst(lateness, starts, last_start - due_wall, cpu_s=time.process_time() - cpu0)


async def measure_apscheduler(jobs: int) -> Burst:
    """The same burst through APScheduler 3 in this process: ``jobs`` DateTrigger jobs due at one
    instant, AsyncIOScheduler + AsyncIOExecutor, memory job store, the scheduler already running
    while the jobs are added (as an application adds them)."""
    from apscheduler.executors.asyncio import AsyncIOExecutor
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.date import DateTrigger

    lateness: list[float] = []
    starts: list[float] = []
    done = asyncio.Event()
    scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), executors={"default": AsyncIOExecutor()},
                                 job_defaults={"misfire_grace_time": 3600, "coalesce": False, "max_instances": 1},
                                 timezone="UTC")
    due = time.time() + 2.0 + jobs * 100e-6  # room for the adds (about 30 us each here)

    async def noop() -> None:
        started = time.time()
        starts.append(started)
        lateness.append(started - due)
        if len(lateness) == jobs:
            done.set()

    cpu0 = time.process_time()
    scheduler.start()
    added = time.perf_counter()
    trigger = DateTrigger(run_date=dt.datetime.fromtimestamp(due, dt.timezone.utc))
    for i in range(jobs):
        scheduler.add_job(noop, trigger, id=str(i))
    add_s = time.perf_counter() - added
    if time.time() > due:
        print(f"  (apscheduler3: adding took {add_s:.1f}s, past the due instant: its lateness includes that)")
    try:
        await asyncio.wait_for(done.wait(), due - time.time() + 60 + jobs / 1000)
    finally:
        scheduler.shutdown(wait=False)
    span = max(starts) - due if starts else float("nan")
    return Burst(lateness, starts, span, cpu_s=time.process_time() - cpu0, add_s=add_s)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--mysql-dsn", default=None, help="also run against this MySQL/MariaDB database")
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds from seeding to the due instant (default: 12, more for big bursts)")
    parser.add_argument("--lead-time", type=float, default=1.0,
                        help="the server's --lead-time: fires go to the worker this long before they are due")
    parser.add_argument("--scan-horizon", type=float, default=5.0, help="the server's --scan-horizon (>= 2x lead time)")
    parser.add_argument("--apscheduler", action="store_true",
                        help="also run the burst through APScheduler 3 in process (asyncio and uvloop)")
    parser.add_argument("--samples", default=None, metavar="PATH",
                        help="write every fire's (start time - due, lateness) per system as JSON, for plots")
    parser.add_argument("--target-ratio", type=float, default=1.5, help="target: FastJob p99 <= this x the floor's")
    add_json_option(parser)
    parser.add_argument("--quick", action="store_true", help="2,000 jobs")
    args = parser.parse_args()
    if args.quick:
        args.jobs = 2000
    if args.lead is None:  # seeding runs at about 5,000 jobs/s here, and the fires go out lead-time early
        args.lead = max(12.0, 8.0 + args.jobs / 4000 + 2 * args.lead_time)
    return args


def loop_runner() -> tuple[Callable[[Any], Any], str]:
    try:
        import uvloop

        return uvloop.run, "uvloop"
    except ImportError:
        return asyncio.run, "asyncio"


def run_apscheduler(jobs: int) -> dict[str, Burst]:
    """APScheduler 3 on both event loops; APScheduler 4 is not on this machine's package index."""
    out = {}
    run, loop_name = loop_runner()
    for name, runner in (("asyncio", asyncio.run), (loop_name, run)):
        if name not in out:
            out[name] = runner(measure_apscheduler(jobs))
    return out


def summary(burst: Burst) -> dict[str, float]:
    ordered = sorted(burst.lateness)
    rate = len(ordered) / burst.span if burst.span > 0 else float("inf")
    return {"p50": percentile(ordered, .5), "p99": percentile(ordered, .99),
            "max": ordered[-1] if ordered else float("nan"), "rate": rate}


def burst_figures(jobs: int, fastjob: dict[str, Burst], floor: Burst, aps: dict[str, Burst],
                  target: float, settings: str = "") -> list[Figure]:
    """The headline figures: every system's lateness beside the floor's, on the same burst."""
    case = f"burst {jobs:,}"
    base = summary(floor)
    figs: list[Figure] = []
    for store, burst in fastjob.items():
        got = summary(burst)
        who = f"fastjob {store}"
        figs += [figure(case, f"{who} p50 lateness", got["p50"] * 1e3, "ms", baseline=base["p50"] * 1e3),
                 figure(case, f"{who} p99 lateness", got["p99"] * 1e3, "ms", baseline=base["p99"] * 1e3,
                        ratio_max=target, note=settings),
                 figure(case, f"{who} max lateness", got["max"] * 1e3, "ms", baseline=base["max"] * 1e3),
                 figure(case, f"{who} dispatch rate", got["rate"], "fires/s", baseline=base["rate"]),
                 figure(case, f"{who} rows final after due", burst.final_after, "s"),
                 figure(case, f"{who} CPU (server+worker)", burst.cpu_s, "s", baseline=floor.cpu_s)]
    for loop_name, burst in aps.items():
        got, who = summary(burst), f"apscheduler3 {loop_name}"
        figs += [figure(case, f"{who} add {jobs:,} jobs", burst.add_s, "s"),
                 figure(case, f"{who} p50 lateness", got["p50"] * 1e3, "ms", baseline=base["p50"] * 1e3),
                 figure(case, f"{who} p99 lateness", got["p99"] * 1e3, "ms", baseline=base["p99"] * 1e3),
                 figure(case, f"{who} CPU", burst.cpu_s, "s", baseline=floor.cpu_s)]
    if aps:
        figs.append(figure(case, "apscheduler4", None, "", note=APS4_NOTE))
    return figs


def write_samples(path: str, jobs: int, systems: dict[str, Burst]) -> None:
    """Every fire's (start - due, lateness) in seconds per system: the suite's plots read them."""
    series = {}
    for name, burst in systems.items():
        due = [s - late for s, late in zip(burst.starts, burst.lateness, strict=True)]
        base = min(due) if due else 0.0
        series[name] = {"start": [round(s - base, 6) for s in burst.starts],
                        "lateness": [round(x, 6) for x in burst.lateness]}
    Path(path).write_text(json.dumps({"jobs": jobs, "series": series}))


APS4_NOTE = "APScheduler 4: not available on this machine (only 3.x on its package index); not measured"


def main() -> None:
    args = parse_args()
    run, loop_name = loop_runner()
    print(f"{args.jobs} one-shot jobs due at one instant, one worker ({loop_name})")
    print(f"  server --lead-time {args.lead_time:g} --scan-horizon {args.scan_horizon:g}; worker max_concurrency "
          f"{args.jobs + 1}; seeding starts {args.lead:g}s before the due instant")
    fastjob: dict[str, Burst] = {}
    with tempfile.TemporaryDirectory() as tmp:
        urls = [("sqlite", f"sqlite:///{os.path.join(tmp, 'e2e.db')}")]
        if args.mysql_dsn:
            urls.append(("mysql", args.mysql_dsn))
        for name, url in urls:
            with (fresh_mysql_database(url) if name == "mysql" else contextlib.nullcontext(url)) as db:
                fastjob[name] = run(measure_fastjob(db, args.jobs, args.lead, lead_time=args.lead_time,
                                                    horizon=args.scan_horizon))
    floor = run(measure_call_at(args.jobs))
    aps = run_apscheduler(args.jobs) if args.apscheduler else {}
    print(f"\n{'':<40} {'fires':>8} {'fires/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name, burst in fastjob.items():
        row(f"fastjob e2e ({name})", burst.lateness, burst.span)
    row(f"baseline: call_at in one process ({loop_name})", floor.lateness, floor.span)
    for name, burst in aps.items():
        row(f"apscheduler3 in process ({name})", burst.lateness, burst.span)
    for name, burst in fastjob.items():
        print(f"fastjob e2e ({name}): every instance row final {burst.final_after:.2f}s after the due instant; "
              f"dispatch rate {len(burst.lateness) / burst.span / (len(floor.lateness) / floor.span):.3f}x the "
              "baseline's")
    print_costs(fastjob, floor, aps)
    settings = (f"server --lead-time {args.lead_time:g} --scan-horizon {args.scan_horizon:g}; worker "
                f"max_concurrency {args.jobs + 1}; floor: call_at + one task per fire ({loop_name})")
    figs = burst_figures(args.jobs, fastjob, floor, aps, args.target_ratio, settings)
    write(args.json, figs)
    if args.samples:
        systems = {f"fastjob ({k})": v for k, v in fastjob.items()}
        systems["floor: call_at"] = floor
        systems.update({f"apscheduler3 ({k})": v for k, v in aps.items()})
        write_samples(args.samples, args.jobs, systems)


def print_costs(fastjob: dict[str, Burst], floor: Burst, aps: dict[str, Burst]) -> None:
    """What each system spent: putting the jobs in, and CPU seconds for the whole burst."""
    for name, burst in fastjob.items():
        print(f"fastjob e2e ({name}): jobs seeded into the store in {burst.add_s:.2f}s; CPU {burst.cpu_s:.2f}s "
              "(server + worker, server start to every row final)")
    print(f"baseline: CPU {floor.cpu_s:.2f}s")
    for name, burst in aps.items():
        print(f"apscheduler3 ({name}): add_job x{len(burst.lateness)} in {burst.add_s:.2f}s; CPU {burst.cpu_s:.2f}s "
              "(start to last fire); memory job store, AsyncIOExecutor, misfire_grace_time=3600")
    if aps:
        print(APS4_NOTE)


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
