"""Retention under sustained load: does the instance table stay bounded, and does pruning slow the fires?

    python bench/bench_retention.py [--minutes 10] [--retain 120] [--rate 1000]
                                    [--mysql-dsn mysql://root@127.0.0.1:3306/test] [--quick]

A real fastjob-server process (SQLite in a temporary directory; with ``--mysql-dsn`` also MariaDB/MySQL
on a temporary database created and dropped here) runs with ``--retain-instances {retain}s
--retain-logs {retain}s``. One worker in this process declares ``--rate`` jobs, each
``cron="* * * * * *"`` (one fire per second each, through the WAL), with a no-op async handler
that notes (planned time, start time) of every call.

Every 5 s (at a phase within the second that varies) the bench reads the database directly
(sqlite3 on the file, pymysql on MySQL): ``COUNT(*)`` of ``instances``, the oldest
``planned_ms``, and how the rows split into rows claimed ahead (planned after now: the scan
horizon), rows older than the retention cutoff (pruning lag) and unfinished rows.

Reported per store:

* rows: the largest row count seen after the first ``retain`` seconds of fires (when pruning
  starts), against the target's bound ``retain x achieved fire rate + 500`` (one pruning batch),
  PASS/MISS; the same for rows planned up to now (the count without the fires claimed ahead);
  the largest pruning lag; the server's prune batches (count, mean and p99 time, from /metrics).
* fires: the achieved fire rate (handler calls per second: succeeded rows cannot be counted
  because they are pruned), fires missing against rate x seconds, and the lateness of handler
  starts (``time.time()`` at start minus ``ctx.scheduled_at``) p50/p99/max, in the first
  ``retain`` seconds (nothing to prune yet) and afterwards (pruning every second); the server's
  own lateness p99 (its histogram, read from /metrics: a bucket bound) for the same two phases.

``--quick``: 1 minute, retain 20 s, rate 200.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_e2e import fresh_mysql_database, percentile

from fastjob import Worker
from fastjob.server.retention import BATCH  # rows one prune statement deletes
from fastjob.store.codecs import SQL_FINAL

APP = "bench-retention"
SAMPLE_EVERY = 5.0




# ---- the database, read directly ------------------------------------------------------------------------
SAMPLE_SQL = ("SELECT COUNT(*), MIN(planned_ms), COALESCE(SUM(CASE WHEN planned_ms > %(now)s THEN 1 ELSE 0 END), 0),"
              " COALESCE(SUM(CASE WHEN planned_ms < %(cutoff)s THEN 1 ELSE 0 END), 0),"
              f" COALESCE(SUM(CASE WHEN status IN {SQL_FINAL} THEN 0 ELSE 1 END), 0) FROM instances")


@dataclass
class Sample:
    t: float  # wall time of the read
    rows: int
    oldest_ms: int | None
    ahead: int  # planned after now: claimed ahead by the scan
    overdue: int  # planned before now - retain: prunable but not pruned yet (or unfinished)
    unfinished: int
    calls: int  # handler calls so far


def sqlite_reader(path: str) -> tuple[Callable[[int, int], tuple[Any, ...]], Callable[[], None]]:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    sql = SAMPLE_SQL.replace("%(now)s", ":now").replace("%(cutoff)s", ":cutoff")

    def read(now_ms: int, cutoff_ms: int) -> tuple[Any, ...]:
        return tuple(conn.execute(sql, {"now": now_ms, "cutoff": cutoff_ms}).fetchone())

    return read, conn.close


def mysql_reader(url: str) -> tuple[Callable[[int, int], tuple[Any, ...]], Callable[[], None]]:
    import pymysql

    parts = urlsplit(url)
    conn = pymysql.connect(host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
                           user=parts.username or "root", password=parts.password or "",
                           database=parts.path.lstrip("/"), autocommit=True)

    def read(now_ms: int, cutoff_ms: int) -> tuple[Any, ...]:
        with conn.cursor() as cur:
            cur.execute(SAMPLE_SQL, {"now": now_ms, "cutoff": cutoff_ms})
            row = cur.fetchone()
            assert row is not None
            return tuple(row)

    return read, conn.close


# ---- the server's /metrics ------------------------------------------------------------------------------
Histogram = dict[float, float]  # cumulative count by upper bound (inf: the total)


def scrape(http: str | None) -> dict[str, Any]:
    """The server's lateness histogram and prune_instances timings (empty when it cannot be read)."""
    if http is None:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, Any] = {"lateness": {}, "prune": {}, "prune_sum": 0.0, "writer_queue": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == "fastjob_fire_lateness_seconds" and s.name.endswith("_bucket") \
                    and s.labels.get("app") == APP:
                out["lateness"][float(s.labels["le"])] = s.value
            elif family.name == "fastjob_store_operation_seconds" and s.labels.get("operation") == "prune_instances":
                if s.name.endswith("_bucket"):
                    out["prune"][float(s.labels["le"])] = s.value
                elif s.name.endswith("_sum"):
                    out["prune_sum"] = s.value
            elif family.name == "fastjob_status_writer_queue":
                out["writer_queue"] = s.value
    return out


def hist_delta(later: Histogram, earlier: Histogram) -> Histogram:
    return {le: n - earlier.get(le, 0.0) for le, n in later.items()}


def hist_quantile(h: Histogram, q: float) -> str:
    """The upper bound of the bucket holding quantile ``q``, as text (``>X`` past the last bound)."""
    total = h.get(float("inf"), 0.0)
    if total <= 0:
        return "-"
    bounds = sorted(h)
    for i, le in enumerate(bounds):
        if h[le] >= q * total:
            if le == float("inf"):
                return f">{bounds[i - 1] * 1e3:.0f}" if i else "inf"
            return f"<={le * 1e3:g}"
    return "-"


# ---- one run --------------------------------------------------------------------------------------------
@dataclass
class Result:
    store: str
    samples: list[Sample] = field(default_factory=list)
    planned: array.array[float] = field(default_factory=lambda: array.array("d"))
    started: array.array[float] = field(default_factory=lambda: array.array("d"))
    first_s: int = 0
    pruning_from: float = 0.0
    end_s: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)  # at the first fire, pruning start, end
    log_lines: list[str] = field(default_factory=list)


def start_server(db: str, retain: int, log_path: Path) -> tuple[subprocess.Popen[bytes], str, str | None]:
    cmd = [sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
           "--http-host", "127.0.0.1", "--db", db, "--log-level", "WARNING",
           "--retain-instances", f"{retain}s", "--retain-logs", f"{retain}s"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert server.stdout is not None
    http = None
    deadline = time.monotonic() + 60
    while True:
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"the server exited before it was ready; its log:\n{log_path.read_text()[-3000:]}")
        if line.startswith(b"FASTJOB_HTTP "):
            http = line.split()[1].decode()
        elif line.startswith(b"FASTJOB_READY "):
            address = line.split()[1].decode()
            break
        if time.monotonic() > deadline:
            raise SystemExit("no FASTJOB_READY within 60 s")
    # whatever it prints later must not fill the pipe and block it
    threading.Thread(target=server.stdout.read, daemon=True).start()
    return server, address, http


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


async def run_store(store: str, db: str, reader: Callable[[str], tuple[Callable[[int, int], tuple[Any, ...]],
                                                                       Callable[[], None]]],
                    args: argparse.Namespace, tmp: Path) -> Result:
    res = Result(store)
    log_path = tmp / f"server-{store}.log"
    server, address, http = start_server(db, args.retain, log_path)
    read, close = reader(db)
    try:
        worker = Worker(app=APP, servers=[address], max_concurrency=max(1024, args.rate), reconnect_max=0.5)
        planned, started, clock = res.planned, res.started, time.time
        first = asyncio.Event()

        @worker.handler("tick")
        async def tick(ctx: Any) -> None:
            started.append(clock())
            planned.append(ctx.scheduled_at)
            first.set()

        for i in range(args.rate):
            worker.schedule(f"j{i:05d}", handler="tick", cron="* * * * * *")
        await worker.start(timeout=600)
        try:
            await asyncio.wait_for(first.wait(), 60)
            res.first_s = int(min(planned))
            res.pruning_from = res.first_s + args.retain
            res.end_s = res.first_s + int(args.minutes * 60)
            res.metrics.append(await asyncio.to_thread(scrape, http))
            print(f"  [{store}] first fire planned at {res.first_s}; pruning from +{args.retain}s;"
                  f" end at +{res.end_s - res.first_s}s", flush=True)
            print(f"  [{store}] {'t s':>6} {'rows':>8} {'ahead':>6} {'overdue':>7} {'unfin':>6} "
                  f"{'oldest age s':>12} {'calls/s':>8}", flush=True)
            scraped_mid = False
            shown: Sample | None = None
            slot = time.time()
            while True:
                now = time.time()
                now_ms = int(now * 1000)
                row = await asyncio.to_thread(read, now_ms, now_ms - args.retain * 1000)
                s = Sample(now, int(row[0]), None if row[1] is None else int(row[1]), int(row[2]), int(row[3]),
                           int(row[4]), len(started))
                res.samples.append(s)
                if shown is None or len(res.samples) % 6 == 0 or now >= res.end_s:
                    # handler calls per second since the last line printed (fires come in 1 s bursts)
                    rate = (s.calls - shown.calls) / (s.t - shown.t) if shown and s.t > shown.t else float("nan")
                    shown = s
                    age = now - s.oldest_ms / 1000 if s.oldest_ms is not None else float("nan")
                    print(f"  [{store}] {now - res.first_s:6.0f} {s.rows:8d} {s.ahead:6d} {s.overdue:7d} "
                          f"{s.unfinished:6d} {age:12.1f} {rate:8.0f}", flush=True)
                if not scraped_mid and now >= res.pruning_from:
                    res.metrics.append(await asyncio.to_thread(scrape, http))
                    scraped_mid = True
                if now >= res.end_s:
                    break
                if server.poll() is not None:
                    raise SystemExit(f"the server exited ({server.returncode}); its log:\n"
                                     f"{log_path.read_text()[-3000:]}")
                # one read per 5 s slot, at a phase that sweeps the second (golden-ratio steps): the
                # fires and the prune passes are both on a 1 s beat, so a fixed phase would see one
                # point of it only
                slot += SAMPLE_EVERY
                phase = (len(res.samples) * 0.618034) % 1.0
                await asyncio.sleep(max(0.0, min(slot + phase, res.end_s) - time.time()))
            await asyncio.sleep(3.0)  # the last planned second's fires start
            if not scraped_mid:
                res.metrics.append(res.metrics[-1])
            res.metrics.append(await asyncio.to_thread(scrape, http))
        finally:
            await worker.stop(grace=2.0)
    finally:
        close()
        stop_server(server)
        res.log_lines = log_path.read_text(errors="replace").splitlines()
    return res


# ---- the report -----------------------------------------------------------------------------------------
def phase_stats(res: Result, lo: float, hi: float) -> tuple[int, float, list[float]]:
    """Calls planned in [lo, hi), their rate, and their lateness (seconds), sorted."""
    late = sorted(s - p for p, s in zip(res.planned, res.started, strict=True) if lo <= p < hi)
    return len(late), len(late) / (hi - lo) if hi > lo else float("nan"), late


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(f"\nrows: retention {args.retain}s, {args.rate} cron jobs at 1 fire/s each, {args.minutes:g} min per store")
    print(f"{'store':7} {'fires/s':>8} {'max rows':>9} {'bound':>9} {'verdict':>7} {'over by':>8} "
          f"{'max past':>9} {'verdict':>7} {'max ahead':>9} {'max overdue':>11} "
          f"{'prunes':>7} {'mean ms':>8} {'p99 ms':>8}")
    for res in results:
        n, rate, _ = phase_stats(res, res.first_s + 1, res.end_s)
        bound = args.retain * rate + BATCH
        after = [s for s in res.samples if s.t >= res.pruning_from]
        if not after:
            print(f"{res.store:7} no sample after the first {args.retain}s")
            continue
        top = max(after, key=lambda s: s.rows)
        past = max(s.rows - s.ahead for s in after)
        m0, m2 = res.metrics[0], res.metrics[-1]
        prune = hist_delta(m2.get("prune", {}), m0.get("prune", {}))
        batches = prune.get(float("inf"), 0.0)
        mean_ms = (m2.get("prune_sum", 0.0) - m0.get("prune_sum", 0.0)) / batches * 1e3 if batches else float("nan")
        print(f"{res.store:7} {rate:8.1f} {top.rows:9d} {bound:9.0f} {'PASS' if top.rows <= bound else 'MISS':>7} "
              f"{max(0, top.rows - bound):8.0f} {past:9d} {'PASS' if past <= bound else 'MISS':>7} "
              f"{max(s.ahead for s in after):9d} {max(s.overdue for s in after):11d} "
              f"{batches:7.0f} {mean_ms:8.1f} {hist_quantile(prune, .99):>8}")
        print(f"        (max rows at +{top.t - res.first_s:.0f}s: {top.ahead} claimed ahead, {top.overdue} older than"
              f" the cutoff, {top.unfinished} unfinished)")
        lag = max(after, key=lambda s: s.overdue)
        print(f"        (max overdue at +{lag.t - res.first_s:.1f}s: {lag.rows} rows, oldest planned"
              f" {lag.t - (lag.oldest_ms or 0) / 1000:.2f}s ago)")
    print("  max rows: largest COUNT(*) after the first retain seconds; bound: retain x fires/s + 500 (one batch);")
    print("  max past: the same without rows planned after now (claimed ahead by the scan horizon);")
    print("  max overdue: rows planned before now - retain still present; prunes: prune_instances batches run")

    print(f"\nfires: handler start minus ctx.scheduled_at, ms; phase 1 = planned in the first {args.retain}s "
          "(nothing to prune), phase 2 = afterwards (pruning)")
    print(f"{'store':7} {'phase':>7} {'fires':>8} {'fires/s':>8} {'missing':>8} {'p50':>8} {'p99':>8} {'max':>8} "
          f"{'server p99':>11}")
    for res in results:
        phases = [("1", res.first_s + 1, res.pruning_from, 0, 1), ("2", res.pruning_from, res.end_s, 1, 2)]
        for name, lo, hi, a, b in phases:
            n, rate, late = phase_stats(res, lo, hi)
            expected = args.rate * (hi - lo)
            ms = [percentile(late, q) * 1e3 for q in (.5, .99)] + [late[-1] * 1e3 if late else float("nan")]
            srv = hist_quantile(hist_delta(res.metrics[b].get("lateness", {}), res.metrics[a].get("lateness", {})),
                                .99)
            print(f"{res.store:7} {name:>7} {n:8d} {rate:8.1f} {expected - n:8.0f} {ms[0]:8.1f} {ms[1]:8.1f} "
                  f"{ms[2]:8.1f} {srv:>11}")
    for res in results:
        warnings = [line for line in res.log_lines if "WARNING" in line or "ERROR" in line or "Traceback" in line]
        print(f"\n[{res.store}] server log: {len(res.log_lines)} lines, {len(warnings)} warnings/errors")
        for line in warnings[:8]:
            print("   ", line[:300])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--retain", type=int, default=120, help="seconds of --retain-instances and --retain-logs")
    parser.add_argument("--rate", type=int, default=1000, help="fires per second (that many per-second cron jobs)")
    parser.add_argument("--mysql-dsn", default=None, help="also run against this MySQL/MariaDB server")
    parser.add_argument("--no-sqlite", action="store_true", help="only the MySQL run")
    parser.add_argument("--quick", action="store_true", help="1 minute, retain 20 s, rate 200")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.retain, args.rate = 1.0, 20, 200
    if args.minutes * 60 <= args.retain + 10:
        raise SystemExit("--minutes must leave time after the first --retain seconds")
    try:
        import uvloop

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:
        run = asyncio.run
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fastjob-retention-") as tmp:
        stores: list[str] = [] if args.no_sqlite else ["sqlite"]
        if args.mysql_dsn:
            stores.append("mysql")
        for store in stores:
            print(f"{store}: {args.rate} fires/s, retain {args.retain}s, {args.minutes:g} min", flush=True)
            if store == "sqlite":
                path = os.path.join(tmp, "retention.db")
                results.append(run(run_store(store, f"sqlite:///{path}",
                                             lambda url: sqlite_reader(url.removeprefix("sqlite:///")),
                                             args, Path(tmp))))
            else:
                with fresh_mysql_database(args.mysql_dsn, "fastjob_bench_retention") as db:
                    results.append(run(run_store(store, db, mysql_reader, args, Path(tmp))))
    report(results, args)


if __name__ == "__main__":
    main()
