"""A worker in its own process, for tests that kill, freeze or stop workers.

Usage: ``python worker_proc.py CONFIG_JSON``. The config names the app, the servers, the worker
id, the ledger file and the jobs to declare (``worker.schedule`` keyword arguments plus
``hold``, seconds each run lasts). Every handler records its runs in the ledger. Prints READY
once registered; SIGTERM stops the worker the way ``Worker.run()`` does (``stop(grace)``).
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from ledger import Ledger

from fastjob import Worker


async def main(config: dict) -> None:
    worker = Worker(app=config["app"], servers=config["servers"], worker_id=config["worker_id"],
                    reconnect_min=config.get("reconnect_min", 0.1), reconnect_max=config.get("reconnect_max", 0.3),
                    max_concurrency=config.get("max_concurrency", 32), tags=config.get("tags", ()))
    ledger = Ledger(Path(config["ledger"]))
    for job in config["jobs"]:
        job = dict(job)
        name, hold = job.pop("name"), job.pop("hold", 0.0)
        worker.handler(name)(ledger.handler(config["worker_id"], hold))
        worker.schedule(name, **job)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start(timeout=60)
    print("READY", flush=True)
    await stop.wait()
    await worker.stop(grace=config.get("grace", 10.0))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
