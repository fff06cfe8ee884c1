"""Sub-tasks: map throughput, a long map_stream's memory, and a workflow step's start delay.

    python bench/bench_map.py [--items 100000] [--stream 1000000] [--chain 30] [--batch 256]
                              [--db sqlite|mysql] [--mysql-dsn DSN] [--quick] [--json PATH]

One real fastjob-server process on a fresh database (SQLite by default) and two worker processes
(bench/_map_worker.py, uvloop), app ``maps``:

- **map**: a handler on worker 1 maps ``--items`` trivial items (``return ctx.params``) with
  ``ctx.map``; each batch is written to the store, sent to a worker, answered, its results
  written and sent back. Items per second = items / the map's own wall time (measured inside the
  handler). Target: >= 20,000 items/s on SQLite. Baseline in the same run: the same number of
  API-triggered one-shot instances can not be a fair baseline (one row per item), so the figure
  stands beside the sustained throughput of bench_throughput.py in the suite's table.
- **stream**: a handler maps ``--stream`` items through ``ctx.map_stream`` from a generator and
  samples its process's RSS; target: < 200 MB (the worker holds at most a window of batches).
  Baseline: the same worker process's RSS before the stream.
- **workflow**: a chain of ``--chain`` steps (each a trivial handler returning when it ran); the
  delay from one step's end to the next one's start, p50 and max; target: <= 50 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from _figures import Figure, add_json_option, figure, write  # noqa: E402
from bench_e2e import fresh_mysql_database  # noqa: E402

from fastjob.client import Client  # noqa: E402
from fastjob.testing import ServerProcess  # noqa: E402

FINAL = {"succeeded", "failed", "timed_out", "interrupted", "killed", "skipped", "cancelled"}


class Proc:
    def __init__(self, config: dict[str, Any], log: Path) -> None:
        self.config, self.log = config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Proc:
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH / "_map_worker.py"), json.dumps(self.config),
                stdout=asyncio.subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if line.strip() != b"READY":
            raise RuntimeError(f"worker did not start: {self.log.read_text()[-2000:]}")
        return self

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def run_job(api: Client, name: str, params: Any, timeout: float) -> dict[str, Any]:
    await api.create_job("maps", name=name, handler=name.split("-")[0], params=params)
    instance_id = await api.trigger("maps", name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = await api.get_instance(instance_id)
        if answer["instance"]["status"] in FINAL:
            if answer["instance"]["status"] != "succeeded":
                raise RuntimeError(f"{name}: {answer['instance']['status']}: {answer['instance']['error']}")
            return answer
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{name} did not end within {timeout}s")


async def main(args: argparse.Namespace) -> list[Figure]:
    tmp = Path(tempfile.mkdtemp(prefix="fastjob-bench-map-"))
    if args.db == "sqlite":
        return await run(args, f"sqlite:///{tmp / 'bench.db'}", tmp)
    with fresh_mysql_database(args.mysql_dsn, "fastjob_bench_map") as db:
        return await run(args, db, tmp)  # a fresh database: its first server prints the admin token


async def run(args: argparse.Namespace, db: str, tmp: Path) -> list[Figure]:
    server = ServerProcess(db, tmp / "server.log", "--second-level-threshold", "0")
    await server.start()
    chain = {f"s{i:03d}": ({"after": [f"s{i - 1:03d}"]} if i else {}) | {"handler": "hop"}
             for i in range(args.chain)}
    workers = [await Proc({"server": server.address, "worker_id": f"w{i}", "capacity": args.capacity,
                           "workflows": {"chain": chain} if i == 0 else {}}, tmp / f"w{i}.log").start()
               for i in range(2)]
    figures: list[Figure] = []
    try:
        async with Client(server.http_address, server.admin_token) as api:
            done = await run_job(api, "parent-map", {"n": args.items, "batch": args.batch}, 600)
            seconds = float(done["instance"]["result"])
            rate = args.items / seconds
            print(f"map: {args.items:,} items over 2 worker processes in {seconds:.2f}s: {rate:,.0f} items/s"
                  f" ({args.db})")
            figures.append(figure("map", f"items/s, {args.items:,} items, 2 workers ({args.db})", rate, "items/s",
                                  value_min=20_000.0 if args.db == "sqlite" else None))

            done = await run_job(api, "streamer-big", {"n": args.stream, "batch": args.batch}, 3600)
            result = done["instance"]["result"]
            print(f"map_stream: {args.stream:,} items in {result['seconds']:.1f}s"
                  f" ({args.stream / result['seconds']:,.0f} items/s); the parent worker's RSS peaked at"
                  f" {result['peak_rss_mb']:.0f} MB (maxrss {result['maxrss_mb']:.0f} MB)")
            figures.append(figure("map_stream", f"worker peak RSS, {args.stream:,}-item map_stream",
                                  result["peak_rss_mb"], "MB", value_max=200.0))

            instance_id = await api.trigger("maps", "chain")
            while True:
                answer = await api.get_instance(instance_id)
                if answer["instance"]["status"] in FINAL:
                    break
                await asyncio.sleep(0.05)
            steps = (await api.steps(instance_id))["steps"]
            ran = [s["result"][0] for s in steps]  # each hop returns at once: its start is its end
            gaps = [(ran[i + 1] - ran[i]) * 1000 for i in range(len(ran) - 1)]
            p50, worst = statistics.median(gaps), max(gaps)
            print(f"workflow: {args.chain}-step chain: a step started {p50:.1f} ms (p50), {worst:.1f} ms (max)"
                  " after the step before it (on the workers' clocks)")
            figures.append(figure("workflow", "step start after its upstream ended, max", worst, "ms",
                                  value_max=50.0, note=f"p50 {p50:.1f} ms over {len(gaps)} hops"))
    finally:
        for w in workers:
            await w.stop()
        await server.terminate()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--stream", type=int, default=1_000_000)
    parser.add_argument("--chain", type=int, default=30)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--db", choices=("sqlite", "mysql"), default="sqlite")
    parser.add_argument("--mysql-dsn", default=os.environ.get("FASTJOB_TEST_MYSQL_DSN", "mysql://root@127.0.0.1:3306/test"))
    parser.add_argument("--quick", action="store_true", help="10,000 items, 100,000 streamed, 10 steps")
    add_json_option(parser)
    ns = parser.parse_args()
    if ns.quick:
        ns.items, ns.stream, ns.chain = 10_000, 100_000, 10
    write(ns.json, asyncio.run(main(ns)))
