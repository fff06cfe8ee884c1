"""Stopping never hangs: a cancellation is never swallowed, and every stop path is bounded.

Before Python 3.12, ``asyncio.wait_for(event.wait(), t)`` returns normally when the event is set
in the same loop turn as the waiting task is cancelled, and the cancellation is lost. The scan
loop waited that way, so a SIGTERM that came just as a scan was woken (an app gained, a job
changed) left ``Scheduler.stop()`` waiting forever.
"""
from __future__ import annotations

import asyncio

from fastjob.server.app import FastJobServer, ServerConfig
from fastjob.tasks import wait_until_set


async def test_a_cancel_in_the_same_turn_as_the_event_is_not_swallowed() -> None:
    event = asyncio.Event()
    rounds = 0

    async def loop_forever() -> None:
        nonlocal rounds
        while True:
            await wait_until_set(event, 30.0)
            event.clear()
            rounds += 1

    task = asyncio.create_task(loop_forever())
    await asyncio.sleep(0)  # the task is now waiting on the event
    event.set()
    task.cancel()  # in the same turn
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done and task.cancelled(), "the cancellation was swallowed: the loop goes on"
    assert rounds == 0


async def test_wait_until_set_times_out_and_sees_the_event() -> None:
    event = asyncio.Event()
    assert await wait_until_set(event, 0.01) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_until_set(event, 5.0) is True


async def test_stop_right_after_a_scan_wake_up_ends_the_scan_loop(tmp_path) -> None:
    """The shape of the reported hang: the scan is woken (as by a gained app) in the same turn as
    the scheduler is told to stop. The scan loop must end; its stop is bounded (10 s) but the
    loop must not need the bound."""
    server = FastJobServer(ServerConfig(host="127.0.0.1", port=0, http_port=0, db=f"sqlite:///{tmp_path / 's.db'}",
                                        heartbeat_interval=0.2, heartbeat_timeout=1.0))
    await server.start()
    scan_task = server.scheduler.scanner._task
    assert scan_task is not None
    try:
        for _ in range(10):  # a few loop turns: the scan loop reaches its wait
            await asyncio.sleep(0)
        server.scheduler.wake_scan()
        await asyncio.wait_for(server.scheduler.stop(), 20.0)
        assert scan_task.done(), "the scan loop outlived Scheduler.stop(): its cancellation was swallowed"
    finally:
        await asyncio.wait_for(server.stop(), 20.0)
