"""Server memory and CPU with a million fires claimed into the WAL and the wheel, and no worker.

    python bench/bench_pending.py [--jobs 100000] [--fires 10] [--hold 5] [--quick] [--json PATH]

How the million is reached: ``--jobs`` cron jobs (UTC) each firing every second for ``--fires``
seconds, ``S0-S9 M H D Mo *``: seconds 0-9 of one minute that starts at least LEAD_S seconds
from now (and next a year later). They are written into a fresh SQLite database in bulk
(``Store.declare_jobs``), then one fastjob-server process starts with a scan horizon reaching
past the last of those seconds and a short scan interval, so it claims every fire at once
(100,000 x 10 = 1,000,000 instance rows) and puts each into its wheel; no worker connects, and
the measurement ends before the first fire is due, so nothing is dispatched.

Measured (psutil on the server process; the wheel's size from its /metrics gauge
``fastjob_wheel_pending_fires``):

* RSS at the peak and once every fire is in the wheel, against the target (<= 300 MB), and
  against the baseline: the same server binary on an empty database, measured in this run;
* the claim: seconds and CPU seconds from the server's start until every fire is in the wheel
  (fires claimed per CPU second);
* holding them: the server's CPU use (CPU seconds per second) over ``--hold`` seconds with every
  fire pending: what a million armed timers cost while nothing is due.

``--quick``: 10,000 jobs (100,000 fires).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from _figures import Figure, add_json_option, figure, write

from fastjob.models import JobSpec, ScheduleType
from fastjob.store import create_store

APP = "bench-pending"
LEAD_S = 90.0  # the first fire is at least this far off: room for the claim on a slow machine
TARGET_MB = 300.0
MB = 1024 * 1024


@dataclass
class Result:
    jobs: int
    fires: int
    baseline_mb: float
    peak_mb: float
    loaded_mb: float
    claim_s: float
    claim_cpu_s: float
    hold_cpu: float  # CPU seconds per second while holding


def first_minute(lead: float) -> dt.datetime:
    """The first whole UTC minute at least ``lead`` seconds away."""
    t = dt.datetime.fromtimestamp(time.time() + lead + 60, dt.timezone.utc)
    return t.replace(second=0, microsecond=0)


async def seed(url: str, jobs: int, fires: int, minute: dt.datetime) -> None:
    """``jobs`` code-declared cron jobs, each firing at seconds 0..fires-1 of ``minute``."""
    expr = f"0-{fires - 1} {minute.minute} {minute.hour} {minute.day} {minute.month} *"
    first_ms = int(minute.timestamp() * 1000)
    store = create_store(url)
    await store.open()
    try:
        began = time.perf_counter()
        await store.ensure_app(APP)  # a server scans the apps it owns, and owns those in the apps table
        for lo in range(0, jobs, 10_000):
            specs = [JobSpec(app=APP, name=f"job-{i:06d}", handler="noop", schedule_type=ScheduleType.CRON,
                             schedule_expr=expr) for i in range(lo, min(jobs, lo + 10_000))]
            await store.declare_jobs(APP, specs, lambda spec: first_ms, time.time())
        print(f"  seeded {jobs:,} jobs '{expr}' (UTC) in {time.perf_counter() - began:.1f}s", flush=True)
    finally:
        await store.close()


def start_server(url: str, horizon: float, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A server with an admin port (for /metrics) that scans often; returns it and its HTTP address."""
    cmd = [sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
           "--db", url, "--log-level", "WARNING", "--scan-horizon", f"{horizon:.0f}", "--scan-interval", "0.2",
           "--lead-time", "0", "--undeclared-grace", "0"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                env=dict(os.environ, PYTHONPATH=str(BENCH.parent), PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    http = ""
    for _ in range(10):
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server exited; see {log}")
        if line.startswith(b"FASTJOB_HTTP "):
            http = line.split()[1].decode()
        if line.startswith(b"FASTJOB_READY "):
            return proc, http
    raise RuntimeError("no FASTJOB_READY line")


def wheel_pending(http: str) -> int:
    """The server's own count of fires in its wheel (loopback /metrics needs no token)."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("fastjob_wheel_pending_fires"):
                return int(float(line.split()[-1]))
    return 0


def idle_rss_mb(tmp: Path) -> float:
    """The baseline: the same server on an empty database, after it settled."""
    proc, _ = start_server(f"sqlite:///{tmp / 'empty.db'}", 10, tmp / "empty.log")
    try:
        time.sleep(2.0)
        return float(psutil.Process(proc.pid).memory_info().rss) / MB
    finally:
        proc.terminate()
        proc.wait(30)


def wait_loaded(proc: psutil.Process, http: str, want: int, deadline: float) -> tuple[float, int]:
    """Poll until ``want`` fires are in the wheel (or the deadline); (peak RSS in MB, pending)."""
    peak, pending, next_poll = 0.0, 0, 0.0
    give_up = time.time() + 30  # nothing claimed by then: the server is not scanning this app at all
    while time.time() < deadline and (pending or time.time() < give_up):
        peak = max(peak, proc.memory_info().rss / MB)
        if time.monotonic() >= next_poll:
            pending, next_poll = wheel_pending(http), time.monotonic() + 0.5
            if pending >= want:
                return peak, pending
        time.sleep(0.1)
    return peak, pending


def measure(jobs: int, fires: int, hold: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="fastjob-pending-") as tmpdir:
        tmp = Path(tmpdir)
        baseline = idle_rss_mb(tmp)
        url = f"sqlite:///{tmp / 'pending.db'}"
        minute = first_minute(LEAD_S)
        asyncio.run(seed(url, jobs, fires, minute))
        first_due = minute.timestamp()
        horizon = first_due + fires + 5 - time.time()
        print(f"  server --scan-horizon {horizon:.0f} --scan-interval 0.2 --lead-time 0, no worker; first fire "
              f"due in {first_due - time.time():.0f}s", flush=True)
        began = time.time()
        server, http = start_server(url, horizon, tmp / "server.log")
        try:
            proc = psutil.Process(server.pid)
            peak, pending = wait_loaded(proc, http, jobs * fires, first_due - 3)
            claim_s, claim_cpu = time.time() - began, sum(proc.cpu_times()[:2])
            if pending < jobs * fires:
                raise SystemExit(f"only {pending:,} of {jobs * fires:,} fires in the wheel before the first was due")
            hold = min(hold, first_due - time.time() - 1)
            time.sleep(max(0.0, hold))
            hold_cpu = (sum(proc.cpu_times()[:2]) - claim_cpu) / hold if hold > 0 else float("nan")
            loaded = proc.memory_info().rss / MB
            peak = max(peak, loaded)
        finally:
            server.terminate()
            server.wait(60)
    return Result(jobs, jobs * fires, baseline, peak, loaded, claim_s, claim_cpu, hold_cpu)


def figures(r: Result) -> list[Figure]:
    case = f"pending {r.fires:,} fires"
    judged = r.fires >= 1_000_000  # the target is for a million pending fires
    return [figure(case, "server RSS peak", r.peak_mb, "MB", baseline=r.baseline_mb,
                   value_max=TARGET_MB if judged else None,
                   note="baseline: the same server on an empty database" + ("" if judged else "; fewer than 1e6 "
                                                                             "fires: not judged")),
            figure(case, "server RSS, all fires in the wheel", r.loaded_mb, "MB", baseline=r.baseline_mb),
            figure(case, "claim: fires per server CPU second", r.fires / r.claim_cpu_s, "fires/CPU-s"),
            figure(case, "claim: wall time until all in the wheel", r.claim_s, "s"),
            figure(case, "holding: server CPU", r.hold_cpu, "CPU-s/s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--fires", type=int, default=10, help="fires per job (one a second)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds to watch the CPU with every fire pending")
    parser.add_argument("--quick", action="store_true", help="10,000 jobs")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.jobs = 10_000
    print(f"{args.jobs:,} jobs x {args.fires} fires claimed ahead (no worker), SQLite")
    r = measure(args.jobs, args.fires, args.hold)
    print(f"\n{'fires pending':>14} {'RSS peak MB':>12} {'RSS loaded MB':>14} {'empty MB':>9} {'B/fire':>7} "
          f"{'claim s':>8} {'claim CPU s':>12} {'fires/CPU-s':>12} {'hold CPU/s':>11}")
    per_fire = (r.loaded_mb - r.baseline_mb) * MB / r.fires
    print(f"{r.fires:14,d} {r.peak_mb:12.1f} {r.loaded_mb:14.1f} {r.baseline_mb:9.1f} {per_fire:7.0f} "
          f"{r.claim_s:8.1f} {r.claim_cpu_s:12.1f} {r.fires / r.claim_cpu_s:12,.0f} {r.hold_cpu:11.3f}")
    print(f"target: server RSS <= {TARGET_MB:.0f} MB: {'met' if r.peak_mb <= TARGET_MB else 'MISSED'} "
          f"(B/fire: RSS above the empty server per pending fire, the jobs' cache included)")
    write(args.json, figures(r))


if __name__ == "__main__":
    main()
