"""Failover benchmark: repeated faults on a real cluster, checked against the fire contract.

    python bench/bench_failover.py [--trials 20] [--faults kill9,sigstop,sigterm,join,worker,outage]
        [--mysql-dsn mysql://root@127.0.0.1:3306/test] [--interval 0.5] [--timeout 2] [--outage 10]
        [--out bench/results/failover-<timestamp>.json] [--keep] [--quick] [--seed N]

Every trial builds a fresh cluster: real ``python -m fastjob.server`` processes (tests/harness.py)
on a database of its own (``fastjob_bench_<random>_<fault>_<n>``, created on the ``--mysql-dsn``
server and dropped after the trial; the shared MariaDB is never stopped or restarted). The servers
reach MariaDB through a TCP proxy (tests/tcp_proxy.py, run in a thread of its own) so that the
``outage`` fault can cut the line. Server flags: ``--heartbeat-interval/--heartbeat-timeout``
from ``--interval/--timeout``, ``--second-level-threshold 1`` (so ``sl`` below is a second-level
job) and ``--misfire-threshold 30`` (above the outage: no fire planned during it is a misfire,
the WAL must keep every one); ``--server-args "..."`` appends more.

Two apps, each with worker processes running tests/worker_proc.py: ``alpha`` (workers a1, a2) and
``beta`` (worker b1). Every worker declares the same four jobs:

- ``tick``     per-second cron, default policies (``* * * * * *``);
- ``catchup``  per-second cron with ``misfire="fire_all"``;
- ``slow``     cron every 2 s whose handler holds 2.5 s (default overlap ``queue``);
- ``sl``       fixed rate 0.5 s: a second-level job, run by one worker from its own wheel.

The faults (one per trial; the moment is put at a random phase within a second):

- ``kill9``    kill -9 of the owner of ``alpha``;
- ``sigstop``  SIGSTOP of the owner of ``alpha``, SIGCONT once another server took it over and at
               least ``timeout + 1`` s later (stopped past the heartbeat timeout);
- ``sigterm``  SIGTERM of the owner of ``alpha`` (clean hand-over);
- ``join``     2 servers, a third joins; the apps are then split 1 + 1, so balancing usually moves
               nothing (what it moves is recorded), then the owner of ``alpha`` is drained
               (``fastjob.server.cli.request_drain``), which hands ``alpha`` to the least loaded
               server, the joiner: the time to first fire is that hand-over's, from the request;
- ``worker``   kill -9 of the worker of ``alpha`` that is running ``slow`` (mid-run);
- ``outage``   the proxy refuses every connection for ``--outage`` seconds (default 10).

What is measured, from the handlers' own ledger (tests/ledger.py), never from the scheduler's rows:

- ttff: time from the fault to the app's first fire on its new owner: the first run of a regular
  job of the app that a server other than the old owner sent (a run is attributed to the server
  its worker had registered with last before it started: the ``workers`` table, polled, records
  each registration, made before any DISPATCH on that connection); for ``join`` from the drain
  request; for ``worker`` the time from the kill to the next run of ``tick``, for ``outage`` from
  the end of the outage to the next ``tick`` (per app);
- lost: planned per-second fires (``tick``, ``catchup``; ``per_second`` grid) in the trial window
  (from ``--pre`` seconds before the fault to ``--post`` seconds after recovery) that never ran;
- dup: extra runs of one planned fire of ``tick``, ``catchup`` or ``slow`` (anywhere in the
  trial). A later attempt that started after the previous run stopped (its end, or the death
  of its worker) is an allowed re-run (at least once across a worker's death) and is counted
  apart, as ``reruns``; ``(alive)`` counts those whose previous run was cut short by a worker
  that did not die (its run lease ran out: the handler started twice with no death); for
  ``outage`` the JSON lists in ``cut_after_outage`` the runs that started after the database was
  back and were interrupted at once;
- late: the worst lateness (first start - planned) over every per-second fire in the window;
- overlaps: runs of ``slow`` (per app) going on at the same time;
- sl gap: the longest gap between two runs of ``sl`` in the window (and ``sl_double_s`` in the
  JSON: seconds two workers ran it at once).

Output: a table per fault (p50/max over trials) with the targets next to the figures: lost 0,
dup 0 (re-runs apart), overlaps 0, worst lateness <= timeout + interval + 1 s after kill9 and
sigstop, <= interval + 0.5 s after sigterm and join (drain). Figures that miss a target are
marked with ``!``. The raw per-trial results go to ``--out`` as JSON (rewritten after each
trial). Progress goes to stderr. Every wait is bounded: a trial that hangs is recorded as failed
with its reason and the benchmark goes on; every process started is killed at the end of its
trial, on errors and on Ctrl-C. Logs (servers, workers, ledger) live in a temporary directory,
deleted at the end unless ``--keep``; the directories of trials that failed, broke the contract or
re-ran a fire without a worker's death are always kept and named on stderr. Each trial directory
also gets ``db_dump.json``, the scheduler's rows at the end of the trial: evidence for the lost or
repeated fires (the JSON attaches each one's rows), never used to count them.

A trial takes about 15 s (outage: about 15 s + the outage); the default run (20 trials of each
of the 6 faults) about 40 minutes.

``--quick``: 2 trials per fault (unless ``--trials`` is given) and shorter windows.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(ROOT))

import pymysql
from harness import ProcWorker, ServerFactory, ServerProcess
from ledger import Ledger, Run, per_second
from tcp_proxy import TcpProxy

from fastjob.server.cli import request_drain

FAULTS = ("kill9", "sigstop", "sigterm", "join", "worker", "outage")
APPS = ("alpha", "beta")
WORKERS = {"a1": "alpha", "a2": "alpha", "b1": "beta"}
TICK = {"name": "tick", "cron": "* * * * * *"}
CATCHUP = {"name": "catchup", "cron": "* * * * * *", "misfire": "fire_all"}
SLOW = {"name": "slow", "cron": "*/2 * * * * *", "hold": 2.5}
SL = {"name": "sl", "interval": 0.5}
JOBS = [TICK, CATCHUP, SLOW, SL]
PER_SECOND = ("tick", "catchup")
REGULAR = ("tick", "catchup", "slow")
SL_PERIOD = 0.5


class TrialError(Exception):
    """A trial could not go on (a bounded wait ran out, a process did not start)."""


# ---- every child process, for the last-resort cleanup ---------------------------------------------
_CHILDREN: list[Any] = []  # ServerProcess / ProcWorker objects


def _kill_children_now() -> None:
    """atexit: SIGCONT + SIGKILL whatever is still alive (the event loop may be gone)."""
    for child in _CHILDREN:
        proc = getattr(child, "proc", None)
        if proc is None or proc.returncode is not None:
            continue
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break


atexit.register(_kill_children_now)


# ---- the database -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dsn:
    host: str
    port: int
    user: str
    password: str

    @classmethod
    def parse(cls, url: str) -> Dsn:
        parts = urlsplit(url)
        if parts.scheme not in ("mysql", "mariadb"):
            raise SystemExit(f"--mysql-dsn wants mysql://user:pass@host:port/db, got {url!r}")
        return cls(parts.hostname or "127.0.0.1", parts.port or 3306, unquote(parts.username or "root"),
                   unquote(parts.password or ""))

    def connect(self, db: str | None = None) -> Any:
        return pymysql.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               database=db, autocommit=True, connect_timeout=5, read_timeout=30, write_timeout=30)

    def url(self, db: str, host: str | None = None, port: int | None = None, query: str = "") -> str:
        auth = quote(self.user, safe="") + (":" + quote(self.password, safe="") if self.password else "")
        return f"mysql://{auth}@{host or self.host}:{port or self.port}/{db}" + (f"?{query}" if query else "")


def create_database(dsn: Dsn, name: str) -> None:
    conn = dsn.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()


def drop_database(dsn: Dsn, name: str) -> None:
    conn = dsn.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 20")
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


def dump_database(dsn: Dsn, name: str) -> dict[str, list[dict[str, Any]]]:
    """The scheduler's rows, kept next to the logs as evidence (never used to count anything)."""
    conn = dsn.connect(name)
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        with conn.cursor(pymysql.cursors.DictCursor) as cur:
            for table, sql in (
                ("instances", "SELECT j.app AS app_name, j.name AS job_name, i.* FROM instances i"
                              " JOIN jobs j ON j.id = i.job_id ORDER BY j.app, j.name, i.planned_ms, i.attempt"),
                ("apps", "SELECT * FROM apps"), ("servers", "SELECT * FROM servers"),
                ("workers", "SELECT * FROM workers"),
            ):
                try:
                    cur.execute(sql)
                    out[table] = list(cur.fetchall())
                except pymysql.err.MySQLError as exc:
                    out[table] = [{"error": str(exc)}]
    finally:
        conn.close()
    return out


class OwnerMonitor(threading.Thread):
    """Polls the ``apps`` and ``workers`` tables (directly, not through the proxy).

    Keeps every ownership state it saw as segments [first query start, last query start, last
    query end, state], and every worker registration (worker, server, connected_at). A server
    registers a worker before its WELCOME, so before any DISPATCH on that connection: a run
    started by a worker was sent by the server the worker had registered with last before the
    run started (``server_at``). That is how a run is attributed to the old or the new owner."""

    def __init__(self, dsn: Dsn, db: str, period: float = 0.025) -> None:
        super().__init__(name="owner-monitor", daemon=True)
        self.dsn, self.db, self.period = dsn, db, period
        self.segments: list[list[Any]] = []
        self.registrations: dict[str, set[tuple[float, str]]] = collections.defaultdict(set)
        self.errors = 0
        self.last_error = ""
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def run(self) -> None:
        conn = None
        while not self._stop_event.is_set():
            try:
                if conn is None:
                    conn = self.dsn.connect(self.db)
                t0 = time.time()
                with conn.cursor() as cur:
                    cur.execute("SELECT name, owner, epoch FROM apps")
                    rows = cur.fetchall()
                t1 = time.time()
                with conn.cursor() as cur:
                    cur.execute("SELECT worker_id, server, connected_at FROM workers")
                    workers = cur.fetchall()
                state = tuple(sorted((name, owner, int(epoch)) for name, owner, epoch in rows))
                with self._lock:
                    for worker_id, server, connected_at in workers:
                        self.registrations[worker_id].add((float(connected_at), server))
                    if self.segments and self.segments[-1][3] == state:
                        self.segments[-1][1], self.segments[-1][2] = t0, t1
                    else:
                        self.segments.append([t0, t0, t1, state])
                self._stop_event.wait(self.period)
            except Exception as exc:  # the table may not exist yet; the connection may drop
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if not (isinstance(exc, pymysql.err.ProgrammingError) and exc.args and exc.args[0] == 1146):
                    try:
                        if conn is not None:
                            conn.close()
                    except Exception:
                        pass
                    conn = None
                self._stop_event.wait(0.2)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def stop(self) -> None:
        self._stop_event.set()

    def current(self) -> dict[str, tuple[str | None, int]]:
        with self._lock:
            state = self.segments[-1][3] if self.segments else ()
        return {name: (owner, epoch) for name, owner, epoch in state}

    def server_at(self, worker: str, t: float) -> str | None:
        """The server the worker had registered with last before ``t`` (None: none seen)."""
        with self._lock:
            seen = [r for r in self.registrations.get(worker, ()) if r[0] <= t]
        return max(seen)[1] if seen else None

    def moved(self, app: str, old_owner: str, since: float) -> dict[str, Any] | None:
        """The first state seen after ``since`` with the app owned by someone other than
        ``old_owner``: {new_owner, epoch, lo (the CAS happened after this), hi (and before this)}."""
        with self._lock:
            segments = [list(s) for s in self.segments]
        prev_last_start = since
        for first, last_start, last_end, state in segments:
            if last_end < since:
                prev_last_start = max(since, last_start)
                continue
            owners = {name: (owner, epoch) for name, owner, epoch in state}
            owner, epoch = owners.get(app, (None, 0))
            if owner is not None and owner != old_owner:
                return {"new_owner": owner, "epoch": epoch, "lo": max(prev_last_start, since),
                        "hi": first + (last_end - last_start)}
            prev_last_start = last_start
        return None

    def changes(self, since: float, until: float) -> list[dict[str, Any]]:
        """The states (owner, epoch of each app) seen between two times, in order."""
        with self._lock:
            segments = [list(s) for s in self.segments]
        out = []
        for first, last_start, _, state in segments:
            if last_start >= since and first <= until:
                out.append({"from": round(first, 3), "apps": {n: [o, e] for n, o, e in state}})
        return out


# ---- the ledger ------------------------------------------------------------------------------------
def app_of(run: Run) -> str:
    return WORKERS.get(run.worker.split("#")[0], "?")


def runs_of(ledger: Ledger, app: str, *jobs: str) -> list[Run]:
    """The app's runs so far (of these jobs, if named), in start order."""
    return [r for r in ledger.runs() if app_of(r) == app and (not jobs or r.job in jobs)]


# ---- the proxy, on a loop of its own ----------------------------------------------------------------
class ProxyThread:
    """Runs TcpProxy instances on an event loop in a thread: the benchmark's own work (spawning
    processes, reading the ledger) never delays the servers' database traffic."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="db-proxy", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()

    async def call(self, factory: Callable[[], Any], timeout: float = 15.0) -> Any:
        future = asyncio.run_coroutine_threadsafe(factory(), self.loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise TrialError("the database proxy did not answer") from None

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


# ---- helpers ----------------------------------------------------------------------------------------
async def until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TrialError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(poll)


async def sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def describe(kind: str, item: dict[str, Any]) -> str:
    """One line about a lost, repeated or overlapping fire (times relative to the fault)."""
    def span(start: float | None, end: float | None) -> str:
        return f"{start:+.3f}..{'?' if end is None else format(end, '+.3f')}"

    if kind == "overlaps":
        first, second = item["first"], item["second"]
        return (f"overlap {item['app']}/slow: {first['planned']} on {first['worker']} "
                f"{span(first['start_rel'], first['stop_rel'])} and {second['planned']} on {second['worker']} "
                f"from {second['start_rel']:+.3f}")
    rows = "; ".join(f"attempt {r['attempt']} {r['status']}" + (f" ({short(r['error'], 80)})" if r.get("error") else "")
                     for r in item.get("rows", []))
    head = f"{kind.removesuffix('s')} {item['app']}/{item['job']} planned {item['planned']}" \
           f" ({item['planned_rel']:+.3f}s)"
    if kind == "lost":
        return f"{head}: never ran; rows: {rows or 'none'}"
    runs = ", ".join(f"attempt {r['attempt']} on {r['worker']} {span(r['start_rel'], r['end_rel'])}"
                     for r in item["runs"])
    return f"{head}: ran {runs}; rows: {rows or 'none'}"


def short(text: str | None, limit: int = 160) -> str:
    """The first line of a reason (a server's usage text or log tail stays in the JSON)."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def iso_ms(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


# ---- analysis (pure: the ledger's runs and the trial's times) ---------------------------------------
def analyze(runs: list[Run], window: tuple[float, float], deaths: dict[str, float], t0: float) -> dict[str, Any]:
    """The contract's figures for one trial. ``deaths``: worker -> when it was killed (a run with
    no recorded end stopped then). ``t0``: the fault, times in details are relative to it."""
    ws, we = window
    grid = per_second(int(ws * 1000), int(we * 1000))
    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 3)

    def stop(run: Run) -> float:
        if run.end is not None:
            return run.end
        return deaths.get(run.worker.split("#")[0], math.inf)

    out: dict[str, Any] = {"window": [round(ws, 3), round(we, 3)], "planned_per_job": len(grid),
                           "lost": [], "dups": [], "reruns": [], "overlaps": [], "lateness": {}, "sl": {}}
    worst = (-math.inf, None)
    for app in APPS:
        app_runs = [r for r in runs if app_of(r) == app]
        by_fire: dict[tuple[str, int], list[Run]] = collections.defaultdict(list)
        for r in app_runs:
            if r.job in REGULAR:
                by_fire[(r.job, r.planned_ms)].append(r)
        # lost fires and lateness of the per-second jobs over the planned grid
        for job in PER_SECOND:
            job_worst = (-math.inf, None)
            for t in grid:
                fire_runs = by_fire.get((job, t))
                if not fire_runs:
                    out["lost"].append({"app": app, "job": job, "planned_ms": t, "planned": iso_ms(t),
                                        "planned_rel": rel(t / 1000)})
                    continue
                late = min(r.start for r in fire_runs) - t / 1000
                if late > job_worst[0]:
                    job_worst = (late, t)
            if job_worst[1] is not None:
                out["lateness"][f"{app}/{job}"] = {"worst_s": round(job_worst[0], 4), "planned": iso_ms(job_worst[1]),
                                                   "planned_rel": rel(job_worst[1] / 1000)}
                if job_worst[0] > worst[0]:
                    worst = (job_worst[0], f"{app}/{job}@{iso_ms(job_worst[1])}")
        # fires run more than once: an allowed re-run, or a duplicate
        for (job, planned), fire_runs in sorted(by_fire.items()):
            if len(fire_runs) < 2:
                continue
            fire_runs.sort(key=lambda r: r.start)
            for i in range(1, len(fire_runs)):
                r, earlier = fire_runs[i], fire_runs[:i]
                allowed = (r.attempt > max(e.attempt for e in earlier)
                           and r.start >= max(stop(e) for e in earlier) - 1e-3)
                detail = {"app": app, "job": job, "planned_ms": planned, "planned": iso_ms(planned),
                          "planned_rel": rel(planned / 1000),
                          # a run with no end record stopped because its worker died; one with an end
                          # was cut short by a worker that lived on (its handler returned or was interrupted)
                          "cause": "worker died" if any(e.end is None for e in earlier) else "worker alive",
                          "runs": [{"attempt": x.attempt, "instance": x.instance_id, "worker": x.worker,
                                    "start_rel": rel(x.start), "end_rel": rel(x.end)} for x in fire_runs]}
                (out["reruns"] if allowed else out["dups"]).append(detail)
        # slow: runs going on at the same time
        slow = sorted((r for r in app_runs if r.job == "slow"), key=lambda r: r.start)
        latest: Run | None = None
        for r in slow:
            if latest is not None and r.start < stop(latest) - 1e-3:
                first = {"planned": iso_ms(latest.planned_ms), "worker": latest.worker,
                         "start_rel": rel(latest.start), "stop_rel": rel(stop(latest))}
                out["overlaps"].append({"app": app, "first": first,
                                        "second": {"planned": iso_ms(r.planned_ms), "worker": r.worker,
                                                   "start_rel": rel(r.start)}})
            if latest is None or stop(r) > stop(latest):
                latest = r
        # sl: the longest gap between runs in the window, and two runners at once
        sl = sorted((r for r in app_runs if r.job == "sl"), key=lambda r: r.start)
        starts = [r.start for r in sl if ws - 2 * SL_PERIOD <= r.start <= we]
        gaps = [(b - a, a) for a, b in zip(starts, starts[1:], strict=False)]
        if starts:
            gaps.append((we - starts[-1], starts[-1]))
        max_gap = max(gaps) if gaps else (we - ws, ws)
        out["sl"][app] = {"runs": len(starts), "max_gap_s": round(max_gap[0], 3), "gap_from_rel": rel(max_gap[1]),
                          "double_s": round(_sl_double(sl), 3), "workers": sorted({r.worker for r in sl})}
    out["worst_lateness_s"] = None if worst[1] is None else round(worst[0], 4)
    out["worst_lateness_fire"] = worst[1]
    out["lost_total"] = len(out["lost"])
    out["dup_total"] = len(out["dups"])
    out["rerun_total"] = len(out["reruns"])
    out["rerun_alive_total"] = sum(1 for d in out["reruns"] if d["cause"] == "worker alive")
    out["overlap_total"] = len(out["overlaps"])
    out["sl_max_gap_s"] = max((v["max_gap_s"] for v in out["sl"].values()), default=None)
    out["sl_double_s"] = round(sum(v["double_s"] for v in out["sl"].values()), 3)
    return out


def _sl_double(sl: list[Run]) -> float:
    """Seconds during which two workers ran the second-level job (each worker's runs split into
    stretches at gaps above 1.5 periods; stretches of different workers must not overlap)."""
    stretches: list[tuple[float, float, str]] = []
    by_worker: dict[str, list[float]] = collections.defaultdict(list)
    for r in sl:
        by_worker[r.worker].append(r.start)
    for worker, starts in by_worker.items():
        first = prev = starts[0]
        for s in starts[1:]:
            if s - prev > 1.5 * SL_PERIOD:
                stretches.append((first, prev, worker))
                first = s
            prev = s
        stretches.append((first, prev, worker))
    total = 0.0
    for i, (a1, b1, w1) in enumerate(stretches):
        for a2, b2, w2 in stretches[i + 1:]:
            if w1 != w2:
                total += max(0.0, min(b1, b2) - max(a1, a2))
    return total


# ---- one trial ----------------------------------------------------------------------------------------
class Trial:
    def __init__(self, bench: Bench, fault: str, index: int) -> None:
        self.bench = bench
        self.cfg = bench.cfg
        self.fault = fault
        self.index = index
        self.dir = bench.tmp_root / f"{fault}-{index:02d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_name = f"{bench.db_prefix}_{fault}_{index}"
        self.factory = ServerFactory(self.dir)
        self.workers: dict[str, ProcWorker] = {}
        self.ledger = Ledger(self.dir / "ledger.jsonl")
        self.monitor: OwnerMonitor | None = None
        self.proxy: TcpProxy | None = None
        self.db_created = False
        self.db_dump: dict[str, list[dict[str, Any]]] = {}
        self.deaths: dict[str, float] = {}
        self.res: dict[str, Any] = {"fault": fault, "trial": index, "ok": False, "reason": None,
                                    "dir": str(self.dir), "database": self.db_name}
        self.fault_at: float | None = None
        self.window_start: float | None = None
        self.window_end: float | None = None

    # -- setup ------------------------------------------------------------------------------------
    def by_address(self) -> dict[str, ServerProcess]:
        return {s.address: s for s in self.factory.servers if s.address}

    async def start_server(self) -> ServerProcess:
        args = ["--heartbeat-interval", str(self.cfg.interval), "--heartbeat-timeout", str(self.cfg.timeout),
                "--second-level-threshold", "1", "--misfire-threshold", "30", *self.cfg.server_args]
        server = ServerProcess(self.server_url, self.dir / f"server{len(self.factory.servers)}.log", *args)
        self.factory.servers.append(server)
        _CHILDREN.append(server)
        await server.start(timeout=30)
        return server

    async def start_worker(self, worker_id: str) -> ProcWorker:
        conf = {"app": WORKERS[worker_id], "servers": list(self.by_address()), "worker_id": worker_id,
                "ledger": str(self.ledger.path), "jobs": JOBS, "grace": 1.0}
        worker = ProcWorker(conf, self.dir / f"{worker_id}.log")
        self.workers[worker_id] = worker
        _CHILDREN.append(worker)
        return await worker.start(timeout=30)

    async def setup(self, servers: int) -> None:
        dsn = self.bench.dsn
        await asyncio.to_thread(create_database, dsn, self.db_name)
        self.db_created = True
        self.direct_url = dsn.url(self.db_name)
        self.monitor = OwnerMonitor(dsn, self.db_name)
        self.monitor.start()
        self.proxy = TcpProxy(dsn.host, dsn.port)
        port = await self.bench.proxy.call(self.proxy.start)
        # retry_total=2: a store call gives up after ~2 s of refused connections (as in the tests)
        self.server_url = dsn.url(self.db_name, "127.0.0.1", port, "retry_total=2")
        for _ in range(servers):
            await self.start_server()
        await asyncio.gather(*(self.start_worker(w) for w in WORKERS))
        self.res["servers"] = list(self.by_address())

    async def warm_up(self) -> None:
        def ready() -> bool:
            owners = self.monitor.current()
            if any(owners.get(app, (None, 0))[0] not in self.by_address() for app in APPS):
                return False
            for app in APPS:
                count = collections.Counter(r.job for r in runs_of(self.ledger, app))
                if count["tick"] < 2 or count["catchup"] < 2 or count["sl"] < 2 or count["slow"] < 1:
                    return False
            return True

        await until(ready, 45, "both apps owned and running tick, catchup, slow and sl")
        self.res["owners_before"] = {a: list(v) for a, v in self.monitor.current().items()}
        await asyncio.sleep(self.cfg.pre)

    async def at_random_phase(self) -> float:
        """Sleep to a random phase within the next second (faults do not always hit the same moment)."""
        now = time.time()
        target = math.floor(now) + 1 + self.bench.rng.uniform(0.02, 0.98)
        await sleep_until(target)
        return target

    # -- waits used by the faults -----------------------------------------------------------------------
    async def new_owner(self, app: str, old: str, since: float, timeout: float) -> dict[str, Any]:
        return await until(lambda: self.monitor.moved(app, old, since), timeout, f"a new owner of {app}")

    async def first_run(self, app: str, jobs: tuple[str, ...], after: float, timeout: float, what: str) -> Run:
        return await until(lambda: next((r for r in sorted(runs_of(self.ledger, app, *jobs), key=lambda r: r.start)
                                         if r.start > after), None), timeout, what)

    def first_on_new_owner(self, app: str, victim: str, after: float) -> Run | None:
        """The app's first regular run after ``after`` sent by a server other than the victim (by the
        worker's registration; the new owner claimed the app after ``after``, so none before counts)."""
        for r in sorted(runs_of(self.ledger, app, *REGULAR), key=lambda r: r.start):
            if r.start > after:
                server = self.monitor.server_at(r.worker, r.start)
                if server is not None and server != victim:
                    return r
        return None

    async def owner_moves(self, victim: str, fault_at: float, moved_apps: list[str]) -> float:
        """Wait for each app the victim owned to fire on its new owner; return the last such start."""
        recovered = fault_at
        self.res["moves"] = {}
        for app in moved_apps:
            move = await self.new_owner(app, victim, fault_at, 5 * self.cfg.timeout + 15)
            after = max(fault_at, move["lo"])
            first = await until(lambda app=app, after=after: self.first_on_new_owner(app, victim, after), 20,
                                f"{app}'s first fire on its new owner")
            self.res["ttff"][app] = round(first.start - fault_at, 4)
            self.res["moves"][app] = {"to": move["new_owner"], "epoch": move["epoch"],
                                      "seen_rel": [round(move["lo"] - fault_at, 3), round(move["hi"] - fault_at, 3)],
                                      "first_fire": {"job": first.job, "planned": iso_ms(first.planned_ms),
                                                     "worker": first.worker,
                                                     "late_s": round(first.start - first.planned_ms / 1000, 4),
                                                     "server": self.monitor.server_at(first.worker, first.start)}}
            recovered = max(recovered, first.start)
        return recovered

    # -- the faults -----------------------------------------------------------------------------------
    async def fault_owner(self) -> float:
        owners = self.monitor.current()
        victim_addr = owners["alpha"][0]
        victim = self.by_address()[victim_addr]
        moved_apps = [app for app in APPS if owners[app][0] == victim_addr]
        self.res["victim"] = victim_addr
        t = await self.at_random_phase()
        self.fault_at = self.window_start = time.time()
        if self.fault == "kill9":
            victim.kill()
        elif self.fault == "sigstop":
            victim.signal(signal.SIGSTOP)
        else:
            victim.signal(signal.SIGTERM)
        self.res["fault_phase"] = round(t % 1, 3)
        if self.fault == "sigstop":
            await until(lambda: all(self.monitor.moved(a, victim_addr, self.fault_at) for a in moved_apps),
                        5 * self.cfg.timeout + 15, "a takeover of the stopped owner's apps")
            await sleep_until(self.fault_at + self.cfg.timeout + 1.0)
            victim.signal(signal.SIGCONT)
            self.res["resumed_rel"] = round(time.time() - self.fault_at, 3)
        recovered = await self.owner_moves(victim_addr, self.fault_at, moved_apps)
        if self.fault == "sigterm":
            try:
                self.res["victim_exit"] = await victim.wait(15)
            except asyncio.TimeoutError:
                self.res["victim_exit"] = "still running 15 s after SIGTERM"
        return recovered

    async def fault_join(self) -> float:
        self.window_start = time.time()
        joiner = await self.start_server()
        self.res["joiner"] = joiner.address
        joined_at = time.time()
        await asyncio.sleep(max(3.0, 6 * self.cfg.interval))
        before = self.res["owners_before"]
        now = self.monitor.current()
        self.res["moved_by_join"] = {a: now[a][0] for a in APPS if now[a][0] != before[a][0]}
        self.res["join_rel"] = round(joined_at - self.window_start, 3)
        victim_addr = now["alpha"][0]
        moved_apps = [app for app in APPS if now[app][0] == victim_addr]
        self.res["victim"] = victim_addr
        t = await self.at_random_phase()
        self.fault_at = time.time()
        self.res["fault_phase"] = round(t % 1, 3)
        if not await request_drain(self.direct_url, victim_addr, True):
            raise TrialError(f"drain: no server {victim_addr}")
        return await self.owner_moves(victim_addr, self.fault_at, moved_apps)

    async def fault_worker(self) -> float:
        def slow_in_progress() -> Run | None:
            now = time.time()
            for r in runs_of(self.ledger, "alpha", "slow"):
                if r.end is None and now - 1.5 < r.start < now - 0.3 and r.worker in self.workers:
                    return r
            return None

        await asyncio.sleep(self.bench.rng.uniform(0, 1))
        run = await until(slow_in_progress, 15, "a run of alpha's slow job in progress", poll=0.02)
        victim = self.workers[run.worker]
        self.fault_at = self.window_start = time.time()
        victim.kill()
        self.deaths[run.worker] = self.fault_at
        self.res["victim"] = run.worker
        self.res["killed_run"] = {"planned": iso_ms(run.planned_ms), "attempt": run.attempt,
                                  "instance": run.instance_id, "start_rel": round(run.start - self.fault_at, 3)}
        tick = await self.first_run("alpha", ("tick",), self.fault_at, 15, "alpha's next tick after the kill")
        self.res["ttff"]["alpha"] = round(tick.start - self.fault_at, 4)
        rerun = await until(lambda: next((r for r in runs_of(self.ledger, "alpha", "slow")
                                          if r.planned_ms == run.planned_ms
                                          and r.start > self.fault_at), None),
                            30, "the killed worker's slow run to run again")
        self.res["slow_rerun"] = {"after_s": round(rerun.start - self.fault_at, 3), "attempt": rerun.attempt,
                                  "worker": rerun.worker}
        recovered = max(tick.start, rerun.start)
        other = next(w for w in WORKERS if WORKERS[w] == "alpha" and w != run.worker)
        sl_before = [r for r in runs_of(self.ledger, "alpha", "sl") if self.fault_at - 2 < r.start < self.fault_at]
        if sl_before and sl_before[-1].worker == run.worker:  # it ran sl too: wait for sl to move
            moved = await until(lambda: next((r for r in runs_of(self.ledger, "alpha", "sl")
                                              if r.worker == other and r.start > self.fault_at), None),
                                20, "the second-level job to move to the other worker")
            self.res["sl_moved_after_s"] = round(moved.start - self.fault_at, 3)
            recovered = max(recovered, moved.start)
        return recovered

    async def fault_outage(self) -> float:
        await self.at_random_phase()
        self.fault_at = self.window_start = time.time()
        await self.bench.proxy.call(lambda: self.proxy.cut("refuse"))
        try:
            await asyncio.sleep(self.cfg.outage)
        finally:
            await self.bench.proxy.call(self.proxy.restore)
        end = time.time()
        self.res["outage_end_rel"] = round(end - self.fault_at, 3)
        recovered = end
        for app in APPS:
            tick = await self.first_run(app, ("tick",), end, 30, f"{app}'s next tick after the outage")
            self.res["ttff"][app] = round(tick.start - end, 4)
            recovered = max(recovered, tick.start)
        return recovered

    # -- the whole trial ---------------------------------------------------------------------------
    async def execute(self) -> None:
        self.res["ttff"] = {}
        await self.setup(2 if self.fault == "join" else 3)
        await self.warm_up()
        handler = {"kill9": self.fault_owner, "sigstop": self.fault_owner, "sigterm": self.fault_owner,
                   "join": self.fault_join, "worker": self.fault_worker, "outage": self.fault_outage}[self.fault]
        recovered = await handler()
        self.res["recovered_rel"] = round(recovered - self.fault_at, 3)
        self.window_start = self.window_start - self.cfg.pre
        self.window_end = recovered + self.cfg.post
        await sleep_until(self.window_end)
        grid = per_second(int(self.window_start * 1000), int(self.window_end * 1000))

        def settled() -> bool:
            for app in APPS:
                ran = {(r.job, r.planned_ms) for r in runs_of(self.ledger, app, *PER_SECOND)}
                if any((job, t) not in ran for job in PER_SECOND for t in grid):
                    return False
            return True

        try:
            await until(settled, self.cfg.settle, "every planned per-second fire of the window to run")
        except TrialError:
            pass  # what has not run by now is counted lost
        await asyncio.sleep(self.cfg.dup_grace)  # a late second copy of a fire still counts
        owners_after = self.monitor.current()
        self.res["owners_after"] = {a: list(v) for a, v in owners_after.items()}
        self.res["ownership_seen"] = self.monitor.changes(self.window_start, time.time())
        if self.fault == "outage":
            before = {a: tuple(v) for a, v in self.res["owners_before"].items()}
            self.res["apps_moved_by_outage"] = {a: [list(before[a]), list(owners_after[a])] for a in APPS
                                                if tuple(owners_after[a]) != before[a]}
        if self.fault == "sigstop":
            victim = self.res["victim"]
            self.res["woken_took_back"] = [a for a in APPS if owners_after[a][0] == victim]

    async def teardown(self) -> None:
        """Kill everything this trial started (SIGCONT first: a stopped process cannot die), drop its database."""
        now = time.time()
        procs = [*self.workers.values(), *self.factory.servers]
        for child in procs:
            child.signal(signal.SIGCONT)
            child.signal(signal.SIGKILL)
        for worker_id in self.workers:
            self.deaths.setdefault(worker_id, now)
        for child in procs:
            if child.proc is not None:
                try:
                    await asyncio.wait_for(child.proc.wait(), 10)
                except (asyncio.TimeoutError, ProcessLookupError):
                    self.res.setdefault("cleanup_errors", []).append(f"pid {child.proc.pid} did not exit")
        if self.monitor is not None:
            self.monitor.stop()
            await asyncio.to_thread(self.monitor.join, 3)
            self.res["monitor_errors"] = self.monitor.errors
        if self.proxy is not None:
            try:
                await self.bench.proxy.call(self.proxy.close, timeout=10)
            except Exception as exc:
                self.res.setdefault("cleanup_errors", []).append(f"proxy close: {exc}")
        if self.db_created:
            try:
                self.db_dump = await asyncio.wait_for(
                    asyncio.to_thread(dump_database, self.bench.dsn, self.db_name), 30)
                (self.dir / "db_dump.json").write_text(json.dumps(self.db_dump, indent=1, default=str))
            except Exception as exc:
                self.res.setdefault("cleanup_errors", []).append(f"dump database: {exc}")
            try:
                await asyncio.wait_for(asyncio.to_thread(drop_database, self.bench.dsn, self.db_name), 60)
                self.db_created = False
            except Exception as exc:
                self.bench.undropped.append(self.db_name)
                self.res.setdefault("cleanup_errors", []).append(f"drop database: {exc}")

    def attach_rows(self, analysis: dict[str, Any]) -> None:
        """Evidence for each lost or repeated fire: what the scheduler's rows said at the end."""
        rows = collections.defaultdict(list)
        for row in self.db_dump.get("instances", []):
            if "planned_ms" in row:
                rows[(row.get("app_name"), row.get("job_name"), int(row["planned_ms"]))].append(
                    {k: row.get(k) for k in ("id", "attempt", "status", "trigger_kind", "server", "epoch", "worker",
                                             "error", "reruns")})
        for kind in ("lost", "dups", "reruns"):
            for item in analysis[kind]:
                item["rows"] = rows.get((item["app"], item["job"], item["planned_ms"]), [])

    async def run(self) -> dict[str, Any]:
        started = time.time()
        try:
            await asyncio.wait_for(self.execute(), self.cfg.trial_timeout)
        except asyncio.TimeoutError:
            self.res["reason"] = f"trial timed out after {self.cfg.trial_timeout:.0f}s"
        except TrialError as exc:
            self.res["reason"] = str(exc)
        except Exception as exc:
            self.res["reason"] = f"{type(exc).__name__}: {exc}"
            self.res["traceback"] = traceback.format_exc()
        finally:
            await self.teardown()  # also when cancelled (Ctrl-C, SIGTERM): the cancellation is delivered once
        self.res["ok"] = self.res["reason"] is None
        if self.fault_at is not None:
            end = self.window_end if self.window_end is not None and self.res["ok"] else time.time() - 3
            start = self.window_start if self.window_start is not None else self.fault_at - self.cfg.pre
            if self.window_end is None:  # failed before the window was set: up to the failure
                start = min(start, self.fault_at - self.cfg.pre)
            self.res["fault_at"] = round(self.fault_at, 3)
            self.res["analysis"] = analyze(self.ledger.runs(), (start, end), self.deaths, self.fault_at)
            self.attach_rows(self.res["analysis"])
            if "outage_end_rel" in self.res:  # runs started once the database was back, cut short by a live worker
                end = self.res["outage_end_rel"]
                self.res["cut_after_outage"] = sorted({
                    (d["app"], d["job"], d["planned"], x["attempt"], x["worker"], x["start_rel"], x["end_rel"])
                    for d in self.res["analysis"]["reruns"] if d["cause"] == "worker alive"
                    for x in d["runs"][:-1] if x["start_rel"] is not None and x["start_rel"] > end})
            self.res["deaths_rel"] = {w: round(t - self.fault_at, 3) for w, t in self.deaths.items()}
        self.res["seconds"] = round(time.time() - started, 1)
        return self.res


# ---- the benchmark ------------------------------------------------------------------------------------
@dataclass
class Config:
    trials: int
    faults: list[str]
    interval: float
    timeout: float
    outage: float
    pre: float
    post: float
    settle: float
    dup_grace: float
    trial_timeout: float
    server_args: list[str]


class Bench:
    def __init__(self, cfg: Config, dsn: Dsn, out: Path, keep: bool, seed: int) -> None:
        self.cfg = cfg
        self.dsn = dsn
        self.out = out
        self.keep = keep
        self.rng = random.Random(seed)
        self.seed = seed
        self.tmp_root = Path(tempfile.mkdtemp(prefix="fastjob-bench-failover-"))
        self.db_prefix = f"fastjob_bench_{uuid.uuid4().hex[:8]}"
        self.proxy = ProxyThread()
        self.results: list[dict[str, Any]] = []
        self.undropped: list[str] = []
        self.meta: dict[str, Any] = {}

    def targets(self, fault: str) -> float | None:
        if fault in ("kill9", "sigstop"):
            return self.cfg.timeout + self.cfg.interval + 1.0
        if fault in ("sigterm", "join"):
            return self.cfg.interval + 0.5
        return None

    async def main(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # like Ctrl-C
        self.proxy.start()
        self.meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:], "seed": self.seed,
                     "config": {k: v for k, v in vars(self.cfg).items()}, "git": _git_rev(),
                     "python": sys.version.split()[0], "tmp": str(self.tmp_root), "database_prefix": self.db_prefix}
        try:
            total = len(self.cfg.faults) * self.cfg.trials
            n = 0
            for fault in self.cfg.faults:
                for i in range(1, self.cfg.trials + 1):
                    n += 1
                    trial = Trial(self, fault, i)
                    res = await trial.run()
                    self.results.append(res)
                    self.progress(res, n, total)
                    self.write_json()
        finally:
            self.proxy.stop()
            for name in self.undropped:
                try:
                    drop_database(self.dsn, name)
                except Exception as exc:
                    print(f"could not drop database {name}: {exc}", file=sys.stderr)
            self.write_json()

    def bad(self, res: dict[str, Any]) -> bool:
        a = res.get("analysis") or {}
        return (not res["ok"]) or any(a.get(k) for k in ("lost_total", "dup_total", "overlap_total",
                                                          "rerun_alive_total")) \
            or bool(res.get("apps_moved_by_outage")) or bool(res.get("woken_took_back")) or bool(a.get("sl_double_s"))

    def progress(self, res: dict[str, Any], n: int, total: int) -> None:
        head = f"[{n}/{total}] {res['fault']:<7} trial {res['trial']:>2}"
        a = res.get("analysis")
        figures = ""
        if a:
            ttff = ",".join(f"{k}={v:.2f}s" for k, v in res.get("ttff", {}).items()) or "-"
            late = a["worst_lateness_s"]
            figures = (f"ttff {ttff}  lost {a['lost_total']}  dup {a['dup_total']}  reruns {a['rerun_total']}"
                       f" ({a['rerun_alive_total']} alive)  "
                       f"late {'-' if late is None else f'{late:.2f}s'}  overlaps {a['overlap_total']}  "
                       f"sl gap {a['sl_max_gap_s']}s")
        state = "ok" if res["ok"] else f"FAILED: {short(res['reason'])}"
        print(f"{head}  {state}  {figures}  ({res['seconds']}s)", file=sys.stderr, flush=True)
        if a:
            for kind in ("lost", "dups", "overlaps", "reruns"):
                items = [d for d in a[kind] if kind != "reruns" or d["cause"] == "worker alive"]
                lines = list(dict.fromkeys(describe(kind, item) for item in items))  # one line per fire
                for line in lines[:8]:
                    print(f"    {line}", file=sys.stderr, flush=True)
                if len(lines) > 8:
                    print(f"    ... {len(lines) - 8} more {kind} (see the JSON)", file=sys.stderr, flush=True)
        if res.get("apps_moved_by_outage"):
            print(f"    apps moved by the outage: {res['apps_moved_by_outage']}", file=sys.stderr, flush=True)
        if res.get("woken_took_back"):
            print(f"    the woken server took back: {res['woken_took_back']}", file=sys.stderr, flush=True)
        if self.bad(res):
            print(f"    logs kept: {res['dir']}", file=sys.stderr, flush=True)

    def write_json(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "summary": self.summary(), "trials": self.results}
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.out)

    def summary(self) -> dict[str, Any]:
        out = {}
        for fault in self.cfg.faults:
            rs = [r for r in self.results if r["fault"] == fault]
            ok = [r for r in rs if r["ok"]]
            ttff = [v for r in ok for v in r.get("ttff", {}).values()]
            late = [r["analysis"]["worst_lateness_s"] for r in ok if r["analysis"]["worst_lateness_s"] is not None]
            gaps = [r["analysis"]["sl_max_gap_s"] for r in ok if r["analysis"]["sl_max_gap_s"] is not None]
            out[fault] = {
                "trials": len(rs), "ok": len(ok), "failed": [(r["trial"], r["reason"]) for r in rs if not r["ok"]],
                "ttff_p50": pct(ttff, 0.5), "ttff_max": max(ttff, default=None),
                "lost": sum(r["analysis"]["lost_total"] for r in ok),
                "dup": sum(r["analysis"]["dup_total"] for r in ok),
                "reruns": sum(r["analysis"]["rerun_total"] for r in ok),
                "reruns_alive": sum(r["analysis"].get("rerun_alive_total", 0) for r in ok),
                "late_p50": pct(late, 0.5), "late_max": max(late, default=None), "late_target": self.targets(fault),
                "overlaps": sum(r["analysis"]["overlap_total"] for r in ok),
                "sl_gap_max": max(gaps, default=None),
                "sl_double_s": round(sum(r["analysis"]["sl_double_s"] for r in ok), 3),
            }
        return out

    def table(self) -> str:
        s = self.summary()
        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        lines = [f"{'fault':<8} {'trials':>7} {'ttff p50':>9} {'ttff max':>9} {'lost':>5} {'dup':>5} {'reruns':>6} "
                 f"{'(alive)':>7} "
                 f"{'late p50':>9} {'late max':>9} {'late target':>11} {'overlaps':>8} {'sl gap max':>10}"]
        for fault, f in s.items():
            target = f["late_target"]
            late_max = sec(f["late_max"]) + ("!" if target is not None and f["late_max"] is not None
                                             and f["late_max"] > target else "")
            def mark(v: int) -> str:
                return f"{v}!" if v else str(v)

            trials = f"{f['ok']}/{f['trials']}"
            target_text = ("<= " + sec(target)) if target is not None else "-"
            lines.append(
                f"{fault:<8} {trials:>7} {sec(f['ttff_p50']):>9} {sec(f['ttff_max']):>9} "
                f"{mark(f['lost']):>5} {mark(f['dup']):>5} {f['reruns']:>6} {f['reruns_alive']:>7} "
                f"{sec(f['late_p50']):>9} {late_max:>9} "
                f"{target_text:>11} {mark(f['overlaps']):>8} "
                f"{sec(f['sl_gap_max']):>10}")
        lines.append(f"{'target':<8} {'':>7} {'':>9} {'':>9} {'0':>5} {'0':>5} {'apart':>6} {'':>7} {'':>9} {'':>9} "
                     f"{'':>11} {'0':>8}")
        notes = [
            "",
            f"targets: lost 0; dup 0 (re-runs after a worker's death counted apart); overlaps of slow 0; worst lateness"
            f" <= timeout + interval + 1 s = {self.cfg.timeout + self.cfg.interval + 1:.2f}s after kill9/sigstop,"
            f" <= interval + 0.5 s = {self.cfg.interval + 0.5:.2f}s after sigterm/join (drain).",
            "reruns: a later attempt of a fire that started after the previous run stopped (allowed, counted apart"
            " from dup); (alive): those whose previous run was cut short by a worker that did not die.",
            "ttff: kill9/sigstop/sigterm: fault -> the app's first fire on its new owner; join: drain request ->"
            " first fire on the new owner; worker: kill -> next tick; outage: end of the outage -> next tick.",
            "late: worst (first start - planned) over every tick/catchup fire planned in the window"
            f" ({self.cfg.pre:g}s before the fault to {self.cfg.post:g}s after recovery).",
        ]
        extra = []
        for fault, f in s.items():
            rs = [r for r in self.results if r["fault"] == fault and r["ok"]]
            if fault == "worker" and rs:
                reruns = [r["slow_rerun"]["after_s"] for r in rs if "slow_rerun" in r]
                extra.append(f"worker: the killed run of slow ran again {sec(pct(reruns, 0.5))} (p50),"
                             f" {sec(max(reruns, default=None))} (max) after the kill")
            if fault == "outage" and rs:
                moved = sum(1 for r in rs if r.get("apps_moved_by_outage"))
                extra.append(f"outage: trials where an app changed owner or epoch: {moved} (target 0)")
                cut = [c for r in rs for c in r.get("cut_after_outage", [])]
                if cut:
                    extra.append(f"outage: {len(cut)} run(s) started after the database was back and were interrupted"
                                 f" by their (live) worker at once (JSON: cut_after_outage), in"
                                 f" {sum(1 for r in rs if r.get('cut_after_outage'))} of {len(rs)} trials")
            if fault == "sigstop" and rs:
                back = sum(1 for r in rs if r.get("woken_took_back"))
                extra.append(f"sigstop: trials where the woken server took an app back: {back}")
            if fault == "join" and rs:
                moved = sum(1 for r in rs if r.get("moved_by_join"))
                extra.append(f"join: trials where the join alone moved an app: {moved}")
            if f["reruns_alive"]:
                extra.append(f"{fault}: {f['reruns_alive']} re-run(s) whose previous run was cut short by a worker that"
                             " did not die (JSON: reruns with cause 'worker alive'): the handler started twice")
            if f["sl_double_s"]:
                extra.append(f"{fault}: the second-level job ran on two workers at once"
                             f" for {f['sl_double_s']}s in total!")
            for trial, reason in f["failed"]:
                extra.append(f"{fault} trial {trial} FAILED: {short(reason)}")
        return "\n".join(lines + notes + ([""] + extra if extra else []))


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return None


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=None, help="trials per fault (default 20; 2 with --quick)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"a subset of {','.join(FAULTS)}")
    p.add_argument("--mysql-dsn", default=os.environ.get("FASTJOB_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306/test"),
                   help="a MySQL/MariaDB server: a database of our own is created on it per trial and dropped")
    p.add_argument("--interval", type=float, default=0.5, help="--heartbeat-interval of the servers")
    p.add_argument("--timeout", type=float, default=2.0, help="--heartbeat-timeout of the servers")
    p.add_argument("--outage", type=float, default=10.0, help="seconds the database is unreachable (outage fault)")
    p.add_argument("--pre", type=float, default=None, help="seconds of the window before the fault (default 3)")
    p.add_argument("--post", type=float, default=None, help="seconds of the window after recovery (default 4)")
    p.add_argument("--server-args", default="", help="more server flags, e.g. \"--scan-horizon 3\"")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default bench/results/failover-<timestamp>.json)")
    p.add_argument("--keep", action="store_true", help="keep every trial's logs and ledger")
    p.add_argument("--quick", action="store_true", help="2 trials per fault and shorter windows")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault phases")
    args = p.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or not faults:
        p.error(f"unknown fault(s) {unknown}; choose from {','.join(FAULTS)}")
    if args.timeout <= args.interval:
        p.error("--timeout must be longer than --interval")
    trials = args.trials if args.trials is not None else (2 if args.quick else 20)
    if trials < 1:
        p.error("--trials must be at least 1")
    pre = args.pre if args.pre is not None else (2.0 if args.quick else 3.0)
    post = args.post if args.post is not None else (2.5 if args.quick else 4.0)
    cfg = Config(trials=trials, faults=faults, interval=args.interval, timeout=args.timeout, outage=args.outage,
                 pre=pre, post=post, settle=10.0 if args.quick else 15.0, dup_grace=1.0 if args.quick else 2.0,
                 trial_timeout=150.0 + args.outage + 10 * args.timeout, server_args=shlex.split(args.server_args))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    dsn = Dsn.parse(args.mysql_dsn)
    out = args.out or ROOT / "bench" / "results" / f"failover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    try:
        dsn.connect().close()
    except Exception as exc:
        raise SystemExit(f"cannot reach MySQL at {args.mysql_dsn}: {exc}") from None
    bench = Bench(cfg, dsn, out, args.keep, seed)
    print(f"failover bench: {cfg.trials} trial(s) of {','.join(cfg.faults)}; interval {cfg.interval}s, timeout"
          f" {cfg.timeout}s, outage {cfg.outage}s; logs in {bench.tmp_root}; seed {seed}", file=sys.stderr, flush=True)

    interrupted = False
    try:
        asyncio.run(bench.main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
        print("interrupted: processes killed, partial results written", file=sys.stderr)
    finally:
        _kill_children_now()
        for name in bench.undropped:
            try:
                drop_database(dsn, name)
            except Exception:
                pass
        bad = [r["dir"] for r in bench.results if bench.bad(r)]
        if args.keep:
            print(f"logs kept in {bench.tmp_root}", file=sys.stderr)
        else:
            for child in bench.tmp_root.iterdir():
                if str(child) not in bad:
                    shutil.rmtree(child, ignore_errors=True)
            if not any(bench.tmp_root.iterdir()):
                bench.tmp_root.rmdir()
            elif bad:
                print(f"logs of failed or contract-breaking trials kept: {', '.join(bad)}", file=sys.stderr)
    args = argv if argv is not None else sys.argv[1:]
    cmd = "python bench/bench_failover.py " + " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {cmd.strip()}\n")
    print(bench.table())
    print(f"\nraw results: {out}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
