"""Time that moves only when a test says so, for in-process rule tests of the scheduler.

:class:`FakeClock` is a :class:`fastjob.clock.Clock` whose ``timer_factory`` builds timers that
deliver their items when :meth:`FakeClock.advance` passes their deadlines: a rule that takes a
run lease of 30 s is checked in microseconds, and at exactly the instant it is due.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

#: An arbitrary, fixed starting instant (2027-01-15 08:00:00 UTC), so that runs are repeatable.
DEFAULT_START = 1_800_000_000.0


class FakeTimer:
    """The scheduler's timer (call_at/call_later/cancel/close) on a FakeClock."""

    def __init__(self, clock: FakeClock, on_due: Callable[[list[Any]], None]) -> None:
        self._clock = clock
        self._on_due = on_due
        self._heap: list[tuple[float, int]] = []
        self._items: dict[int, Any] = {}  # handle -> item, while armed
        self._handles = itertools.count(1)
        self.closed = False

    def call_at(self, when: float, item: object) -> int:
        handle = next(self._handles)
        self._items[handle] = item
        heapq.heappush(self._heap, (when, handle))
        return handle

    def call_later(self, delay: float, item: object) -> int:
        return self.call_at(self._clock.monotonic() + max(0.0, delay), item)

    def cancel(self, handle: int) -> bool:
        return self._items.pop(handle, None) is not None

    def close(self) -> None:
        self.closed = True
        self._items.clear()
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._items)

    def next_deadline(self) -> float | None:
        while self._heap and self._heap[0][1] not in self._items:
            heapq.heappop(self._heap)  # cancelled
        return self._heap[0][0] if self._heap else None

    def deliver(self, now: float) -> bool:
        """Hand every item due by ``now`` to on_due as one batch, in deadline order."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, handle = heapq.heappop(self._heap)
            item = self._items.pop(handle, None)
            if item is not None:
                due.append(item)
        if due:
            self._on_due(due)
        return bool(due)


class FakeClock:
    """Wall and monotonic clocks that move together, only in :meth:`advance`."""

    def __init__(self, start: float = DEFAULT_START) -> None:
        self._wall = start
        self._mono = 1000.0
        self._timers: list[FakeTimer] = []
        self._callbacks: FakeTimer | None = None  # for call_at

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def call_at(self, when: float, callback: Callable[[], None]) -> int:
        """Run ``callback`` when the monotonic clock reaches ``when`` (as ``loop.call_at`` does)."""
        if self._callbacks is None:
            self._callbacks = self.timer_factory(_run_each)
        return self._callbacks.call_at(when, callback)

    def timer_factory(self, on_due: Callable[[list[Any]], None]) -> FakeTimer:
        timer = FakeTimer(self, on_due)
        self._timers.append(timer)
        return timer

    def _next_deadline(self) -> float | None:
        deadlines = [d for t in self._timers if not t.closed and (d := t.next_deadline()) is not None]
        return min(deadlines, default=None)

    def _move_to(self, mono: float) -> None:
        self._wall += mono - self._mono
        self._mono = mono

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``; each deadline on the way is delivered at its own
        instant, and the loop runs what that started (callbacks, tasks on a memory store) before
        time moves on."""
        await settle()  # what the last step started arms its deadlines at the current instant
        target = self._mono + seconds
        while (deadline := self._next_deadline()) is not None and deadline <= target:
            self._move_to(max(self._mono, deadline))
            for timer in list(self._timers):
                timer.deliver(self._mono)
            await settle()
        self._move_to(target)
        await settle()


def _run_each(callbacks: list[Any]) -> None:
    for callback in callbacks:
        callback()


async def settle(rounds: int = 20) -> None:
    """Let the loop run what is ready: call_soon callbacks and tasks that await nothing slow."""
    for _ in range(rounds):
        await asyncio.sleep(0)
