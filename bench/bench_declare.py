"""Registering a worker that declares many jobs: the bulk JOB_DECLARE against the per-job JOB_UPSERT.

    python bench/bench_declare.py [--jobs 100000] [--baseline-jobs 10000] [--mysql-dsn mysql://root@127.0.0.1:3306/test]

A real fastjob-server process (fresh database) and one worker in this process. Half the jobs
are cron jobs that fire once a year (so each new one has its first fire computed, and nothing
comes due during the run), half API-triggered. Reported, each on a fresh database:

* ``declare in code``: the worker's ``schedule()`` calls (each checks its declaration);
* ``first registration``: ``start()`` until registered, every job new (JOB_DECLARE batches);
* ``re-registration``: a restarted worker declaring the same jobs, nothing changed;
* baseline, in the same run: the per-job JOB_UPSERT path of protocol version 2 (what a worker
  did before), for ``--baseline-jobs`` jobs; its rate is compared with the bulk path's.

Target (issue 14): 100,000 declared jobs registered in at most 5 s here. The server's CPU time
is printed next to each registration: the server is CPU-bound (decoding, checking and writing
each job), so on a machine with few cores the wall time follows it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _figures import Figure, add_json_option, figure, write  # noqa: E402

import fastjob.worker_link  # noqa: E402
from fastjob import Worker  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def start_server(url: str) -> tuple[subprocess.Popen[bytes], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", "0", "--http-port", "-1", "--db", url,
         "--log-level", "WARNING"], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert server.stdout is not None
    line = server.stdout.readline().decode()
    return server, line.split()[1]


def declare(worker: Worker, jobs: int) -> float:
    worker.handler("noop")(lambda ctx: None)
    began = time.perf_counter()
    for i in range(jobs):
        if i % 2:
            worker.schedule(f"job-{i:06d}", handler="noop", cron=f"0 {i % 60} {i % 24} 1 1 *")
        else:
            worker.schedule(f"job-{i:06d}", handler="noop", params={"n": i})
    return time.perf_counter() - began


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def register(address: str, jobs: int, app: str, server_pid: int) -> tuple[float, float, float]:
    """(seconds in schedule(), seconds in start(), the server's CPU seconds meanwhile) for one
    worker declaring ``jobs`` jobs."""
    worker = Worker(app=app, servers=[address], worker_id=f"bench-{app}")
    in_code = declare(worker, jobs)
    cpu_before, began = cpu_seconds(server_pid), time.perf_counter()
    await worker.start(timeout=600)
    took, cpu = time.perf_counter() - began, cpu_seconds(server_pid) - cpu_before
    await worker.stop(grace=0)
    return in_code, took, cpu


def fresh_url(kind: str, mysql_dsn: str | None, tmp: str, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp}/{name}.db"
    assert mysql_dsn
    from urllib.parse import urlsplit

    import pymysql  # the bench's own scratch database, dropped and created again
    parts = urlsplit(mysql_dsn)
    conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                           password=parts.password or "")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS bench_declare_{name}")
        cur.execute(f"CREATE DATABASE bench_declare_{name}")
    conn.close()
    return mysql_dsn.rsplit("/", 1)[0] + f"/bench_declare_{name}"


async def run(kind: str, jobs: int, baseline_jobs: int, mysql_dsn: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server, address = start_server(fresh_url(kind, mysql_dsn, tmp, "bulk"))
        try:
            in_code, first, first_cpu = await register(address, jobs, "bulk", server.pid)
            _, again, again_cpu = await register(address, jobs, "bulk", server.pid)
        finally:
            server.terminate()
            server.wait(30)
        server, address = start_server(fresh_url(kind, mysql_dsn, tmp, "per_job"))
        saved = fastjob.worker_link.PROTOCOL_VERSION
        fastjob.worker_link.PROTOCOL_VERSION = 2  # type: ignore[misc]  # a worker of before JOB_DECLARE
        try:
            _, baseline, _ = await register(address, baseline_jobs, "per_job", server.pid)
        finally:
            fastjob.worker_link.PROTOCOL_VERSION = saved  # type: ignore[misc]
            server.terminate()
            server.wait(30)
    return {"in_code": in_code, "first": first, "again": again, "baseline": baseline, "first_cpu": first_cpu,
            "again_cpu": again_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--baseline-jobs", type=int, default=10_000)
    parser.add_argument("--mysql-dsn", default=None)
    add_json_option(parser)
    args = parser.parse_args()
    kinds = ["sqlite"] + (["mysql"] if args.mysql_dsn else [])
    figs: list[Figure] = []
    for kind in kinds:
        r = asyncio.run(run(kind, args.jobs, args.baseline_jobs, args.mysql_dsn))
        bulk_rate, base_rate = args.jobs / r["first"], args.baseline_jobs / r["baseline"]
        print(f"{kind}: {args.jobs} jobs: declare in code {r['in_code']:.2f}s, first registration {r['first']:.2f}s"
              f" ({bulk_rate:,.0f} jobs/s; server CPU {r['first_cpu']:.2f}s), re-registration {r['again']:.2f}s"
              f" (server CPU {r['again_cpu']:.2f}s);"
              f" baseline JOB_UPSERT per job: {args.baseline_jobs} jobs in {r['baseline']:.2f}s"
              f" ({base_rate:,.0f} jobs/s);"
              f" bulk/baseline rate {bulk_rate / base_rate:.1f}x; target first registration <= 5 s:"
              f" {'met' if r['first'] <= 5 else 'MISSED'}")
        figs += declare_figures(kind, args.jobs, args.baseline_jobs, r)
    write(args.json, figs)


def declare_figures(kind: str, jobs: int, baseline_jobs: int, r: dict[str, Any]) -> list[Figure]:
    """Registration time beside the per-job path's time for as many jobs (its rate, measured in this run)."""
    case = f"declare {jobs:,} jobs ({kind})"
    per_job = r["baseline"] / baseline_jobs * jobs
    note = f"baseline: JOB_UPSERT per job, {baseline_jobs:,} jobs timed, scaled to {jobs:,}"
    return [figure(case, "first registration", r["first"], "s", baseline=per_job, note=note,
                   value_max=5.0 if jobs >= 100_000 else None),
            figure(case, "re-registration (unchanged)", r["again"], "s", baseline=per_job, note=note),
            figure(case, "server CPU, first registration", r["first_cpu"], "s")]


if __name__ == "__main__":
    main()
