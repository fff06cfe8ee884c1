"""The two clocks the scheduler reads, behind one small interface so that tests can drive them.

``wall()`` is seconds since the epoch: planned fire times, stored timestamps. ``monotonic()`` is
the timer's clock (``time.monotonic()``, which the timing wheel's deadlines are in). Production
code uses :data:`SYSTEM_CLOCK`; ``fastjob.testing.FakeClock`` moves both by hand.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol


class Clock(Protocol):
    def wall(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The machine's clocks."""

    wall = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)


SYSTEM_CLOCK: Clock = SystemClock()


class Timer(Protocol):
    """What the scheduler needs of its timer (``fastjob.timer.WheelTimer``): deadlines on the
    monotonic clock, each handing its item back through the ``on_due`` given at creation."""

    def call_at(self, when: float, item: object) -> int: ...

    def call_later(self, delay: float, item: object) -> int: ...

    def cancel(self, handle: int) -> bool: ...

    def close(self) -> None: ...


#: Builds the timer that hands due items (in batches) to ``on_due``.
TimerFactory = Callable[[Callable[[list[Any]], None]], Timer]


def wall_ms(clock: Clock) -> int:
    """Now, in the integer milliseconds planned fire times are kept in."""
    return int(clock.wall() * 1000)


def timer_time(clock: Clock, wall: float) -> float:
    """A wall-clock instant (seconds since the epoch) on the timer's monotonic clock."""
    return clock.monotonic() + (wall - clock.wall())
