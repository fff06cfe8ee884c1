"""The admin API under load: does a polling client slow the scheduler, and how fast are single reads?

    python bench/bench_api.py [--jobs 20000] [--rows 100000] [--rounds 3]
                              [--mysql-dsn mysql://root@127.0.0.1:3306/test] [--quick]

Each run is bench_e2e's burst (``--jobs`` one-shot jobs due at one instant T, a real
fastjob-server process, one worker in this process running a no-op handler) on a fresh
database that already holds ``--rows`` finished instance rows of the same app (spread over
HISTORY_JOBS api-triggered jobs, planned in the past), followed by TAIL seconds of nothing
else. Runs alternate between two modes, ``--rounds`` times: no client, then polling:

* no client: nobody calls the HTTP admin API (it is served all the same);
* polling: a client process polls ``GET /api/v1/apps/{app}/instances?limit=1000`` on a fixed
  10-per-second schedule (a tick whose previous request is still running is skipped, and
  counted), and concurrently makes single-object reads at about 20 per second, each
  ``GET /api/v1/instances/{id}`` (a random seeded row) or ``GET /api/v1/apps/{app}/jobs/{name}``
  (a random job of the app) at random, at a random moment of its 50 ms tick. The clients run
  from CLIENT_EARLY seconds before T to the end of the tail, in a process of their own, so that
  their work does not run on the worker's event loop (the dispatch rate is computed from its
  handler start times).

Reported per run: the dispatch rate as bench_e2e computes it (fires / time from T to the last
handler start), the server's CPU time over the dispatch and its CPU load in the tail, and in
polling runs the latency of each kind of request (send to last byte of the body, as the client
sees it), split into those that overlapped the burst (T until every row is final) and the
others ("steady": the server only serves the API and keeps its heartbeats). At the end, one
table: per store and mode, the median dispatch rate (and each run's), the ratio of the medians,
and the latencies of all polling runs together, checked against the targets:

* dispatch rate while polling within 10% of the rate with no client (ratio of medians >= 0.90);
* single-object reads p99 < 20 ms (each kind) with ``--rows`` rows stored, under that polling
  (judged on the steady requests; those during the burst are shown as well).

The machine may be shared and noisy: that is why the modes are interleaved and medians taken.
bench_e2e.py's functions are reused where they fit (seed_jobs, percentile, fresh_mysql_database);
its measure_fastjob is not (it takes the server's first stdout line for its address, and this
bench needs the admin token and HTTP address too: fastjob.testing.ServerProcess reads them).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_e2e
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_e2e import BurstWorker, fresh_mysql_database, percentile, seed_jobs

from fastjob.models import JobSpec, ScheduleType
from fastjob.store import create_store
from fastjob.testing import ServerProcess

APP = "bench-e2e"  # the app bench_e2e.seed_jobs writes its burst into
HISTORY_JOBS = 100  # api-triggered jobs the seeded instance rows belong to
LIST_PATH = f"/api/v1/apps/{APP}/instances?limit=1000"
LIST_PERIOD = 0.1  # the poller: 10 requests a second
READ_PERIOD = 0.05  # single-object reads: 20 a second
CLIENT_EARLY = 3.0  # seconds before the due instant the clients start
TAIL = 3.0  # seconds every run goes on after the burst's rows are final (the clients poll on, if any)
# Server flags of bench_e2e.measure_fastjob (ServerProcess adds --host 127.0.0.1 --port 0 --http-port 0).
SERVER_ARGS = ["--log-level", "WARNING", "--scan-horizon", "5", "--second-level-threshold", "0"]
# Time from the end of seeding to the due instant: the server starts, claims the fires (scan
# horizon 5 s) and the worker registers.
AFTER_SEED = 8.0


# ---- the database, without the store ---------------------------------------------------------------
class RawDB:
    """Plain sqlite3 / pymysql on the bench's database: bulk inserts and counts (SQL written with ?)."""

    def __init__(self, url: str) -> None:
        self.mysql = not url.startswith("sqlite:")
        if self.mysql:
            import pymysql

            parts = urlsplit(url)
            self.conn: Any = pymysql.connect(host=parts.hostname, port=parts.port or 3306,
                                             user=parts.username or "root", password=parts.password or "",
                                             database=parts.path.lstrip("/"), autocommit=True)
        else:
            self.conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None, timeout=30)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.mysql else sql

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        try:
            cur.execute(self._sql(sql), params)
            return list(cur.fetchall()) if cur.description is not None else []
        finally:
            cur.close()

    def insert_many(self, table: str, cols: tuple[str, ...], rows: list[tuple[Any, ...]], chunk: int) -> None:
        """Multi-row INSERTs of ``chunk`` rows, in one transaction."""
        one = "(" + ",".join("?" * len(cols)) + ")"
        self.execute("BEGIN")
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            params = [value for r in part for value in r]
            self.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES " + ",".join([one] * len(part)), params)
        self.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


INSTANCE_COLS = ("job_id", "app", "planned_ms", "attempt", "status", "trigger_kind", "params", "server", "epoch",
                 "worker", "created_at", "dispatched_at", "started_at", "finished_at", "result", "error", "reruns")


async def seed_history(url: str, rows: int) -> tuple[int, int, float]:
    """HISTORY_JOBS api jobs and ``rows`` finished (succeeded) instance rows of theirs, planned one a
    second back from now. Opening the store creates the schema. Returns the seeded ids' range and
    the seconds one job upsert took (to plan how long bench_e2e.seed_jobs will take)."""
    store = create_store(url)
    await store.open()
    try:
        started = time.perf_counter()
        job_ids = []
        for k in range(HISTORY_JOBS):
            spec = JobSpec(app=APP, name=f"hist-{k}", handler="noop", schedule_type=ScheduleType.API)
            job_ids.append((await store.upsert_job(spec, None, time.time())).id)
        per_job = (time.perf_counter() - started) / HISTORY_JOBS
    finally:
        await store.close()
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    values = []
    for i in range(rows):
        planned_ms = now_ms - 60_000 - i * 1000
        t = planned_ms / 1000
        values.append((job_ids[i % HISTORY_JOBS], APP, planned_ms, 1, "succeeded", "api", None, "bench-seed", 1,
                       "seed-worker", t - 0.01, t + 0.001, t + 0.002, t + 0.005, None, None, 0))
    db = RawDB(url)
    try:
        db.insert_many("instances", INSTANCE_COLS, values, 1000 if db.mysql else 500)
        low, high = db.execute("SELECT MIN(id), MAX(id) FROM instances WHERE app = ?", (APP,))[0]
    finally:
        db.close()
    print(f"  seeded {rows} instance rows in {time.perf_counter() - started:.1f}s")
    return int(low), int(high), per_job


def count_succeeded(url: str, planned_ms: int) -> int:
    """Instances of the burst (planned at the due instant) that succeeded. bench_e2e.count_final
    counts every succeeded row of the app, which here includes the seeded ones."""
    db = RawDB(url)
    try:
        return int(db.execute("SELECT COUNT(*) FROM instances WHERE app = ? AND planned_ms = ? AND status = ?",
                              (APP, planned_ms, "succeeded"))[0][0])
    finally:
        db.close()


# ---- the client process -------------------------------------------------------------------------------
async def client_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """Poll the instance list on a fixed schedule and make single reads, until a line on stdin."""
    import aiohttp

    rng = random.Random(cfg["seed"])
    base = f"http://{cfg['http']}"
    samples: dict[str, list[tuple[float, float]]] = {"list": [], "instance": [], "job": []}
    out: dict[str, Any] = {"samples": samples, "errors": [], "list_skipped": 0, "list_late": 0,
                           "read_skipped": 0, "read_late": 0, "page_instances": None, "page_bytes": None}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.run_in_executor(None, sys.stdin.readline).add_done_callback(lambda _: loop.call_soon_threadsafe(stop.set))
    names = [f"hist-{k}" for k in range(HISTORY_JOBS)] + [f"job-{i}" for i in range(cfg["jobs"])]

    async def request(session: aiohttp.ClientSession, kind: str, path: str) -> None:
        sent = time.time()
        t0 = time.perf_counter()
        try:
            async with session.get(base + path) as response:
                body = await response.read()
                elapsed = time.perf_counter() - t0
                if response.status != 200:
                    out["errors"].append(f"{kind} {path}: HTTP {response.status} {body[:200]!r}")
                    return
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            out["errors"].append(f"{kind} {path}: {exc!r}")
            return
        samples[kind].append((sent, elapsed))
        if kind == "list" and out["page_instances"] is None:
            out["page_instances"] = len(json.loads(body)["instances"])
            out["page_bytes"] = len(body)

    def next_read() -> tuple[str, str]:
        """An instance (a random seeded row) or a job (any of the app's), at random."""
        if rng.random() < 0.5:
            return "instance", f"/api/v1/instances/{rng.randint(cfg['low_id'], cfg['high_id'])}"
        return "job", f"/api/v1/apps/{APP}/jobs/{rng.choice(names)}"

    async def ticker(session: aiohttp.ClientSession, period: float, what: str, jitter: bool) -> None:
        """One request per tick of ``period``: skipped if the previous one still runs (``_skipped``);
        ticks this process woke up too late for are counted as ``_late`` (the client was starved).
        With ``jitter`` each request goes at a random moment within its tick: the single reads then
        meet the poller's requests at random phases, as an independent client's would (on a common
        grid they would always, or never, arrive while the server is encoding a list page)."""
        start = time.monotonic()
        tick = 0
        inflight: asyncio.Task[None] | None = None
        while not stop.is_set():
            delay = start + (tick + (rng.random() if jitter else 0.0)) * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                if stop.is_set():
                    break
            behind = int((time.monotonic() - (start + tick * period)) / period)
            if behind > 0:
                out[what + "_late"] += behind
                tick += behind
            if inflight is not None and not inflight.done():
                out[what + "_skipped"] += 1
            else:
                kind, path = ("list", LIST_PATH) if what == "list" else next_read()
                inflight = asyncio.create_task(request(session, kind, path))
            tick += 1
        if inflight is not None:
            await asyncio.wait({inflight}, timeout=10)

    headers = {"Authorization": f"Bearer {cfg['token']}"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as session:
        delay = cfg["start_at"] - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(ticker(session, LIST_PERIOD, "list", False),
                             ticker(session, READ_PERIOD, "read", True))
    return out


def client_entry(raw: str) -> None:
    run, _ = event_loop_runner()
    result = run(client_main(json.loads(raw)))
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()


class ClientProcess:
    """This script with --client-config: started before the burst, stopped (and read) after it."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--client-config", json.dumps(self.cfg),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        raw = await asyncio.wait_for(self.proc.stdout.read(), 60)
        await asyncio.wait_for(self.proc.wait(), 10)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the API client exited with status {self.proc.returncode}")
        return dict(json.loads(raw))

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


# ---- one run ------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, tmp: str, jobs: int, rows: int, lead: float | None, polling: bool,
                  run_no: int) -> dict[str, Any]:
    """bench_e2e.measure_fastjob's burst on a database seeded with ``rows`` instance rows, then TAIL
    seconds of nothing else; with ``polling``, the API clients run from CLIENT_EARLY before the due
    instant to the end of the tail. The server's CPU time is taken over the dispatch (T to the last
    handler start) and over the tail."""
    low_id, high_id, per_job = await seed_history(url, rows)
    if lead is None:  # seed_jobs runs before the server starts: give it twice its expected time
        lead = 2 * per_job * jobs + AFTER_SEED
    due = time.time() + lead
    await seed_jobs(url, jobs, int(due * 1000))
    due_ms = int(due * 1000)
    due = due_ms / 1000
    if time.time() > due - AFTER_SEED / 2:
        raise SystemExit(f"seeding the jobs took too long: raise --lead (was {lead:.1f}s)")
    server = ServerProcess(url, Path(tmp) / f"server-{run_no}.log", *SERVER_ARGS)
    client: ClientProcess | None = None
    try:
        address = await server.start()
        if server.admin_token is None:
            raise SystemExit("the server printed no FASTJOB_ADMIN_TOKEN: is the database fresh?")
        assert server.proc is not None
        pid = server.proc.pid
        burst = BurstWorker(address, APP, jobs)
        async with burst.worker:
            if time.time() > due:
                raise SystemExit("the jobs came due before the worker registered: raise --lead")
            if polling:
                client = ClientProcess({"http": server.http_address, "token": server.admin_token, "jobs": jobs,
                                        "low_id": low_id, "high_id": high_id, "seed": run_no,
                                        "start_at": due - CLIENT_EARLY})
                await client.start()
            await asyncio.sleep(max(0.0, due - time.time()))
            cpu_at_due = cpu_seconds(pid)
            await asyncio.wait_for(burst.done.wait(), due - time.time() + 120)
            cpu_dispatch = cpu_seconds(pid) - cpu_at_due
            dispatch_span = burst.last_start - due
            while await asyncio.to_thread(count_succeeded, url, due_ms) < jobs:
                if time.time() - due > 300:
                    raise SystemExit("instances did not all become final")
                await asyncio.sleep(0.2)
            final_after = time.time() - due
            cpu_before, tail_started = cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(TAIL)
            tail_cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - tail_started)
            api = await client.stop() if client is not None else None
            client = None
        return {"polling": polling, "rate": jobs / dispatch_span, "span": dispatch_span, "final_after": final_after,
                "lateness": sorted(burst.lateness), "api": api, "due": due, "cpu_dispatch": cpu_dispatch,
                "tail_cpu": tail_cpu}
    finally:
        if client is not None:
            await client.kill()
        with contextlib.suppress(ProcessLookupError):
            await server.terminate()


# ---- report -------------------------------------------------------------------------------------------
def ms(ordered: list[float], q: float) -> str:
    return f"{percentile(ordered, q) * 1e3:.1f}" if ordered else "-"


def latency(ordered: list[float], with_max: bool = True) -> str:
    """p50/p99(/max) in ms."""
    if not ordered:
        return "-"
    return f"{ms(ordered, .5)}/{ms(ordered, .99)}" + (f"/{ordered[-1] * 1e3:.1f}" if with_max else "")


def api_samples(runs: list[dict[str, Any]], kinds: tuple[str, ...], burst: bool | None = None) -> list[float]:
    """Latencies of these kinds of request; ``burst`` True: only those that overlapped the burst (from
    T until every row was final), False: only the others (steady polling), None: all."""
    out = []
    for r in runs:
        if not r["api"]:
            continue
        start, end = r["due"], r["due"] + r["final_after"]
        for kind in kinds:
            for sent, elapsed in r["api"]["samples"][kind]:
                if burst is None or burst == (sent < end and sent + elapsed > start):
                    out.append(elapsed)
    return sorted(out)


READS = ("instance", "job")


def print_run(store: str, r: dict[str, Any]) -> None:
    late = r["lateness"]
    print(f"  {store} {'polling' if r['polling'] else 'no client'}: {r['rate']:,.0f} fires/s "
          f"(last start {r['span']:.2f}s after T; lateness p50 {ms(late, .5)} ms, p99 {ms(late, .99)} ms);"
          f" every row final {r['final_after']:.2f}s after T; server CPU {r['cpu_dispatch']:.2f}s in the dispatch,"
          f" {r['tail_cpu'] * 100:.0f}% of a core in the {TAIL:.0f}s tail")
    api = r["api"]
    if api:
        print(f"    list ms p50/p99/max: steady {latency(api_samples([r], ('list',), False))}, burst"
              f" {latency(api_samples([r], ('list',), True))}; {len(api['samples']['list'])} requests,"
              f" {api['list_skipped']} ticks skipped, {api['list_late']} late; page of {api['page_instances']}"
              f" instances, {api['page_bytes'] or 0:,} bytes")
        for kind in READS:
            print(f"    {kind} ms p50/p99/max: steady {latency(api_samples([r], (kind,), False))}, burst"
                  f" {latency(api_samples([r], (kind,), True))}; {len(api['samples'][kind])} requests")
        print(f"    reads: {api['read_skipped']} ticks skipped, {api['read_late']} late; {len(api['errors'])} errors")
        for error in api["errors"][:5]:
            print(f"    error: {error}")


def each_run(runs: list[dict[str, Any]], polling: bool) -> str:
    return " ".join(f"{r['rate']:,.0f}" for r in runs if r["polling"] == polling)


def report(results: dict[str, list[dict[str, Any]]], jobs: int, rows: int) -> None:
    print(f"\n{jobs:,} one-shot jobs due at one instant T over {rows:,} stored instance rows. Latencies: ms"
          " p50/p99 of all polling runs together, 'steady' = requests that did not overlap the burst (from"
          f" {CLIENT_EARLY:.0f}s before T, and in the {TAIL:.0f}s after every row was final), 'burst' = those that"
          " did; server CPU: seconds used from T to the last handler start, and % of a core in the tail")
    width = max([len(each_run(runs, polling)) for runs in results.values() for polling in (False, True)] + [8])
    head = (f"{'store':<7} {'mode':<9} {'fires/s med':>11}  {'each run':<{width}} {'ratio':>5}  {'cpu disp':>8}"
            f" {'cpu tail':>8}  {'list steady':>11} {'list burst':>11}  {'read steady':>11} {'read burst':>11}"
            f"  {'skipped':>7}")
    print(head)
    print("-" * len(head))
    verdicts = []
    for store, runs in results.items():
        medians = {}
        for polling in (False, True):
            mine = [r for r in runs if r["polling"] == polling]
            if not mine:
                continue
            medians[polling] = statistics.median(r["rate"] for r in mine)
            each = each_run(runs, polling)
            ratio = f"{medians[True] / medians[False]:.3f}" if polling and False in medians else ""
            cpu = statistics.median(r["cpu_dispatch"] for r in mine)
            tail = statistics.median(r["tail_cpu"] for r in mine) * 100
            cols = [latency(api_samples(mine, kinds, burst), False) if polling else "-"
                    for kinds in (("list",), READS) for burst in (False, True)]
            skipped = (f"{sum(r['api']['list_skipped'] for r in mine)}+{sum(r['api']['read_skipped'] for r in mine)}"
                       if polling else "-")
            print(f"{store:<7} {'polling' if polling else 'no client':<9} {medians[polling]:>11,.0f}  {each:<{width}}"
                  f" {ratio:>5}  {cpu:>7.2f}s {tail:>7.0f}%  {cols[0]:>11} {cols[1]:>11}  {cols[2]:>11} {cols[3]:>11}"
                  f"  {skipped:>7}")
        if True not in medians or False not in medians:
            continue
        ratio_value = medians[True] / medians[False]
        verdicts.append(f"{store}: dispatch rate while polling {ratio_value:.3f}x the rate with no client"
                        f" (target >= 0.90): {'PASS' if ratio_value >= 0.9 else 'MISS'}")
        polled = [r for r in runs if r["polling"]]
        for burst, when in ((False, "steady polling"), (True, "during the burst")):
            p99 = {kind: api_samples(polled, (kind,), burst) for kind in READS}
            text = ", ".join(f"{kind} {ms(p99[kind], .99)} ms (n={len(p99[kind])})" for kind in READS)
            if all(p99.values()):
                verdict = "PASS" if max(percentile(v, .99) for v in p99.values()) < 0.020 else "MISS"
            else:
                verdict = "no verdict (a kind has no request)"
            verdicts.append(f"{store}: single-object read p99, {when}: {text} (target < 20 ms each): {verdict}")
        errors = sum(len(r["api"]["errors"]) for r in polled)
        late = sum(r["api"]["list_late"] + r["api"]["read_late"] for r in polled)
        if errors or late:
            verdicts.append(f"{store}: {errors} failed requests, {late} ticks the client process woke too"
                            " late for (it was starved of CPU)")
    print("(skipped: poller ticks + single-read ticks skipped because the previous request was still running)\n")
    for verdict in verdicts:
        print(verdict)


# ---- main ---------------------------------------------------------------------------------------------
def event_loop_runner() -> tuple[Any, str]:
    try:
        import uvloop

        return uvloop.run, "uvloop"
    except ImportError:
        return asyncio.run, "asyncio"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=100_000, help="finished instance rows stored before each run")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (no client, then polling)")
    parser.add_argument("--mysql-dsn", default=None, help="also run against this MySQL/MariaDB database")
    parser.add_argument("--lead", type=float, default=None,
                        help="seconds from the start of seeding the jobs to the due instant (default: from the"
                             " measured speed of the store)")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, 10,000 rows, 1 round")
    parser.add_argument("--client-config", default=None, help=argparse.SUPPRESS)  # the API client process
    args = parser.parse_args()
    if args.client_config is not None:
        client_entry(args.client_config)
        return
    if args.quick:
        args.jobs, args.rows, args.rounds = 2000, 10_000, 1
    run, loop_name = event_loop_runner()
    print(f"{args.jobs} one-shot jobs due at one instant, one worker ({loop_name}), {args.rows} instance rows"
          f" stored; {args.rounds} rounds of (no client, polling)")
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fastjob-bench-api-") as tmp:
        stores = [("sqlite", None)]
        if args.mysql_dsn:
            stores.append(("mysql", args.mysql_dsn))
        run_no = 0
        for store, dsn in stores:
            results[store] = []
            for _round in range(args.rounds):
                for polling in (False, True):
                    run_no += 1
                    if dsn is None:
                        path = os.path.join(tmp, f"api-{run_no}.db")
                        db_cm: Any = contextlib.nullcontext(f"sqlite:///{path}")
                    else:
                        db_cm = fresh_mysql_database(dsn)
                    with db_cm as db:
                        r = run(measure(db, tmp, args.jobs, args.rows, args.lead, polling, run_no))
                    if dsn is None:
                        for suffix in ("", "-wal", "-shm"):
                            with contextlib.suppress(FileNotFoundError):
                                os.remove(path + suffix)
                    print_run(store, r)
                    results[store].append(r)
    report(results, args.jobs, args.rows)


if __name__ == "__main__":
    main()
