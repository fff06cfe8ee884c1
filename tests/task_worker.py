"""A worker in its own process for the sub-task tests (tests/test_subtasks.py), to be killed.

Usage: ``python task_worker.py CONFIG_JSON``. Config: app, servers, worker_id, ``dir`` (where each
handler appends what it did: one file per worker, one line per item run, so that runs can be
counted across processes), ``item_sleep`` (seconds an item takes), ``jobs`` (``worker.schedule``
keywords) and ``workflows`` ({name: steps, plus ``__schedule`` keywords}). Prints READY once
registered; SIGTERM stops it.

Handlers:
- ``item``: records the item, sleeps ``item_sleep``, returns the item times two;
- ``mapper``: maps ``params["n"]`` items over ``item`` (batch ``params["batch"]``) and returns
  their count and sum;
- ``shard``: a broadcast sub-run: returns [worker id, shard index, shard total]; fails on the
  workers named in ``params["fail_on"]``;
- ``step``: a workflow step: records its name and upstream, sleeps ``params["sleep"]`` (default
  ``item_sleep``; a cancellation is recorded), fails while the file ``<dir>/fail-<step>`` exists,
  returns the step's name.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fastjob import Worker


def record(path: Path, entry: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


async def main(config: dict[str, Any]) -> None:
    worker_id = config["worker_id"]
    out = Path(config["dir"])
    runs = out / f"runs-{worker_id}.jsonl"
    sleep = float(config.get("item_sleep", 0.0))
    worker = Worker(app=config["app"], servers=config["servers"], worker_id=worker_id, reconnect_min=0.1,
                    reconnect_max=0.3, max_concurrency=config.get("max_concurrency", 4), tags=config.get("tags", ()))

    @worker.handler("item")
    async def item(ctx: Any) -> int:
        record(runs, {"item": ctx.params, "w": worker_id})
        if sleep:
            await asyncio.sleep(sleep)
        return int(ctx.params) * 2

    @worker.handler("mapper")
    async def mapper(ctx: Any) -> dict[str, int]:
        params = ctx.params or {}
        results = await ctx.map(range(params["n"]), "item", batch_size=params.get("batch", 100))
        assert results == [i * 2 for i in range(params["n"])]
        return {"count": len(results), "sum": sum(results)}

    @worker.handler("shard")
    async def shard(ctx: Any) -> list[Any]:
        record(runs, {"shard": ctx.shard_index, "of": ctx.shard_total, "w": worker_id})
        if worker_id in ((ctx.params or {}).get("fail_on") or ()):
            raise RuntimeError(f"shard on {worker_id} fails")
        return [worker_id, ctx.shard_index, ctx.shard_total]

    @worker.handler("step")
    async def step(ctx: Any) -> str:
        name = (ctx.params or {}).get("name", "?")
        record(runs, {"step": name, "upstream": ctx.upstream, "w": worker_id, "t": time.time()})
        try:
            await asyncio.sleep(float((ctx.params or {}).get("sleep", sleep)))
        except asyncio.CancelledError:
            record(runs, {"step_cancelled": name, "w": worker_id})
            raise
        if (out / f"fail-{name}").exists():
            raise RuntimeError(f"step {name} fails")
        record(runs, {"step_end": name, "w": worker_id, "t": time.time()})
        return name

    for job in config.get("jobs", ()):
        job = dict(job)
        worker.schedule(job.pop("name"), **job)
    for name, spec in (config.get("workflows") or {}).items():
        spec = dict(spec)
        worker.workflow(name, spec.pop("steps"), **spec)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start(timeout=60)
    print("READY", flush=True)
    await stop.wait()
    await worker.stop(grace=config.get("grace", 2.0))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
