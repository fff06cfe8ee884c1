"""The seed design's three test cases against a running server.

    fastjob-server --port 7700 &
    python examples/seed_jobs.py --server 127.0.0.1:7700 --seconds 45

task1 runs every 10 seconds, task2 once, task3 fails and is retried 3 times. Each run
prints one JSON log line, as the seed shows.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys

from fastjob import Worker


def say(message: str) -> None:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    print(json.dumps({"level": "info", "msg": message, "time": now}), flush=True)


def build(servers: str) -> Worker:
    worker = Worker(app="seed", servers=servers.split(","))

    @worker.handler("task1")
    async def task1(ctx):
        say("task1 running.....")
        ctx.log.info("task1 running.....")

    @worker.handler("task2")
    async def task2(ctx):
        say("task2 running.....")

    @worker.handler("task3")
    async def task3(ctx):
        say("task3 running.....")
        raise RuntimeError("mock job failed")

    worker.schedule("task1", interval=10)
    worker.schedule("task2", run_once=True)
    worker.schedule("task3", run_once=True, retries=3, retry_backoff=0.2)
    return worker


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="127.0.0.1:7700", help="host:port of a server (several: comma-separated)")
    parser.add_argument("--seconds", type=float, default=45.0, help="how long to run before stopping (0: until"
                                                                    " stopped)")
    args = parser.parse_args()
    async with build(args.server):
        await asyncio.sleep(args.seconds or float("inf"))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
