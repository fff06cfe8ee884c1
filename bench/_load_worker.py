"""The worker of the sustained cron load (bench/cron_load.py): N per-second cron jobs.

Usage: ``python _load_worker.py SERVER N OUT [OVERLAP]``. Each run records (job index, planned
second, start time) in memory; on SIGTERM the worker stops and writes them to OUT as doubles.
OVERLAP (the jobs' overlap policy; default: the library's, queue) ``allow`` lets a job's fires
run independently of each other, like a stream of one-shot jobs (bench_throughput.py).
"""
from __future__ import annotations

import array
import asyncio
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastjob import Worker  # noqa: E402


async def main(server: str, jobs: int, out: str, overlap: str | None = None) -> None:
    worker = Worker(app="load", servers=[server], max_concurrency=max(1024, jobs), reconnect_max=0.5)
    runs = array.array("d")
    index = {f"j{i:06d}": float(i) for i in range(jobs)}
    clock = time.time

    @worker.handler("tick")
    async def tick(ctx) -> None:  # noqa: ANN001
        runs.extend((index[ctx.job], float(int(ctx.scheduled_at)), clock()))

    for name in index:
        worker.schedule(name, handler="tick", cron="* * * * * *", overlap=overlap)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start(timeout=600)
    print("READY", flush=True)
    await stop.wait()
    await worker.stop(grace=1.0)
    with open(out, "wb") as f:
        runs.tofile(f)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None))
