"""A worker process for second-level tests: its 'tick' handler appends "<worker_id> <time> <planned>" to a file."""
from __future__ import annotations

import asyncio
import os
import sys
import time

from fastjob import Worker


async def main(server: str, worker_id: str, out_path: str, period: float) -> None:
    worker = Worker(app="sl", servers=[server], worker_id=worker_id, reconnect_max=0.3)
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @worker.handler("tick")
    async def tick(ctx):
        os.write(fd, f"{worker_id} {time.time():.6f} {ctx.scheduled_at:.6f}\n".encode())

    worker.schedule("tick", interval=period)
    await worker.start()
    print("READY", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
