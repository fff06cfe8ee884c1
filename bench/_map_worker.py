"""A worker process of bench/bench_map.py. Usage: ``python _map_worker.py CONFIG_JSON``.

Handlers: ``item`` (returns its item), ``parent`` (maps ``params["n"]`` items with ``ctx.map``
and returns the seconds it took), ``streamer`` (streams ``params["n"]`` items through
``ctx.map_stream`` and returns the seconds and this process's peak RSS in MB, sampled while it
runs), ``hop`` (a workflow step: returns when it started and ended). Prints READY once
registered; SIGTERM stops it.
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastjob import Worker  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def main(config: dict[str, Any]) -> None:
    worker = Worker(app="maps", servers=[config["server"]], worker_id=config["worker_id"],
                    max_concurrency=config.get("capacity", 8), reconnect_max=0.5)

    @worker.handler("item")
    async def item(ctx: Any) -> Any:
        return ctx.params

    @worker.handler("parent")
    async def parent(ctx: Any) -> float:
        n, batch = ctx.params["n"], ctx.params.get("batch")
        t0 = time.perf_counter()
        results = await ctx.map(range(n), "item", batch_size=batch)
        took = time.perf_counter() - t0
        assert len(results) == n and results[-1] == n - 1
        return took

    @worker.handler("streamer")
    async def streamer(ctx: Any) -> dict[str, float]:
        n, batch = ctx.params["n"], ctx.params.get("batch")
        peak, count, last, t0 = rss_mb(), 0, None, time.perf_counter()
        async for last in ctx.map_stream((i for i in range(n)), "item", batch_size=batch):  # noqa: B007
            count += 1
            if count % 50_000 == 0:
                peak = max(peak, rss_mb())
        assert count == n and last == n - 1
        return {"seconds": time.perf_counter() - t0, "peak_rss_mb": max(peak, rss_mb()),
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    @worker.handler("hop")
    async def hop(ctx: Any) -> list[float]:
        return [time.time()]

    for name, steps in (config.get("workflows") or {}).items():
        worker.workflow(name, steps)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start(timeout=120)
    print("READY", flush=True)
    await stop.wait()
    await worker.stop(grace=1.0)


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(json.loads(sys.argv[1])))
