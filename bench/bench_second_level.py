"""Many second-level jobs on one worker process: the fire rate it sustains and each fire's lateness.

    python bench/bench_second_level.py [--jobs 10000] [--period 1.0] [--seconds 10] [--quick]

A real fastjob-server process (temporary SQLite) hands ``--jobs`` fixed-rate jobs down to one
worker in this process (uvloop when installed). Lateness is the handler's start time minus the
fire's planned time. Baseline, in the same run and on the same loop: the same number of jobs,
each driven by its own ``loop.call_at`` chain (one asyncio TimerHandle per job, re-armed at
every fire), which is what a worker without a wheel would do.

Target (issue 6): p99 lateness <= 5 ms at 10,000 fires/s per worker process.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastjob import Worker  # noqa: E402


def summarize(name: str, lateness: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(lateness)
    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    row = {"fires/s": len(ordered) / seconds, "p50 ms": pick(0.5), "p99 ms": pick(0.99),
           "max ms": ordered[-1] * 1000 if ordered else float("nan")}
    print(f"{name:<34} {row['fires/s']:>10.0f} {row['p50 ms']:>9.3f} {row['p99 ms']:>9.3f} {row['max ms']:>9.3f}")
    return row


async def measure_fastjob(address: str, jobs: int, period: float, warmup: float, seconds: float) -> list[float]:
    worker = Worker(app="bench-sl", servers=[address], max_concurrency=jobs)
    lateness: list[float] = []
    window = {"on": False}

    @worker.handler("tick")
    async def tick(ctx):
        if window["on"]:
            lateness.append(time.time() - ctx.scheduled_at)

    for i in range(jobs):
        worker.schedule(f"tick-{i}", handler="tick", interval=period)
    started = time.perf_counter()
    await worker.start(timeout=600)  # registration is one upsert per job: slow for 10,000
    try:
        print(f"  registered {jobs} jobs in {time.perf_counter() - started:.1f}s; waiting for hand-down")
        runner = worker.second_level
        deadline = time.monotonic() + 60
        while len(runner.jobs) < jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if len(runner.jobs) < jobs:
            raise SystemExit(f"only {len(runner.jobs)} of {jobs} jobs were handed down")
        await asyncio.sleep(warmup + period)  # every job has fired at least once
        window["on"] = True
        await asyncio.sleep(seconds)
        window["on"] = False
    finally:
        await worker.stop()
    return lateness


async def measure_call_at(jobs: int, period: float, warmup: float, seconds: float) -> list[float]:
    """The baseline: one TimerHandle per job, re-armed each fire, each fire run as a task."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    window = {"on": False}
    offset = time.time() - loop.time()

    async def tick(planned: float) -> None:
        if window["on"]:
            lateness.append(time.time() - planned)

    def fire(job: int, planned_loop: float) -> None:
        loop.create_task(tick(planned_loop + offset))
        loop.call_at(planned_loop + period, fire, job, planned_loop + period)

    base = loop.time()
    for job in range(jobs):
        first = base + ((job * 0.6180339887498949) % 1.0) * period
        loop.call_at(first, fire, job, first)
    await asyncio.sleep(warmup + period)
    window["on"] = True
    await asyncio.sleep(seconds)
    window["on"] = False
    return lateness


def start_server(db_path: str) -> tuple[subprocess.Popen[bytes], str]:
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastjob.server", "--host", "127.0.0.1", "--port", "0", "--http-port", "-1",
         "--db", f"sqlite:///{db_path}", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("FASTJOB_READY"):
        proc.kill()
        raise SystemExit("server did not start")
    return proc, line.split()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--period", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="1,000 jobs for 3 s")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.seconds, args.warmup = 1000, 3.0, 1.0
    try:
        import uvloop

        run = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        run = asyncio.run
        loop_name = "asyncio"
    print(f"{args.jobs} second-level jobs every {args.period}s on one worker ({loop_name}), {args.seconds}s window")
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_server(os.path.join(tmp, "bench.db"))
        try:
            fastjob_lateness = run(measure_fastjob(address, args.jobs, args.period, args.warmup, args.seconds))
        finally:
            proc.terminate()
            proc.wait(10)
    baseline = run(measure_call_at(args.jobs, args.period, args.warmup, args.seconds))
    print(f"\n{'':<34} {'fires/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    ours = summarize("fastjob worker (wheel + handler)", fastjob_lateness, args.seconds)
    base = summarize(f"baseline: call_at per job ({loop_name})", baseline, args.seconds)
    expected = args.jobs / args.period
    print(f"\nexpected fires/s {expected:.0f}; fastjob delivered {ours['fires/s'] / expected:.1%}; "
          f"p99 lateness ratio fastjob/baseline {ours['p99 ms'] / base['p99 ms']:.2f}")
    verdict = "MET" if ours["p99 ms"] <= 5.0 and ours["fires/s"] >= 0.98 * expected else "NOT MET"
    print(f"target p99 <= 5 ms at {expected:.0f} fires/s: {verdict}")


if __name__ == "__main__":
    main()
