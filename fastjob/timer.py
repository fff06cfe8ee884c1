"""Asyncio driver for the timing wheel: one loop timer for any number of pending fires.

The loop sees a single ``call_at`` wake-up, armed at the wheel's ``next_deadline()``.  It is
re-armed when an earlier deadline is scheduled, and after every wake-up.  A wake-up advances
the wheel to ``loop.time()`` and hands the due items to ``on_due`` as one list, so a burst of
a million fires costs a few thousand loop callbacks instead of a million.

Early wake-ups: nothing is ever delivered before its deadline, so a wake-up that comes early
is wasted.  The loop timer is armed a hair after the deadline so that it does not come early:
asyncio runs a timer up to ``loop._clock_resolution`` early, uvloop rounds delays to whole
milliseconds (half a millisecond early at worst).  Should a wake-up still find nothing due
twice at the same ``loop.time()`` (a coarse clock), the timer re-arms ``_MIN_SLEEP`` later
instead of spinning on zero-delay timers.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .timewheel import TimingWheel

__all__ = ["WheelTimer"]

log = logging.getLogger("fastjob.timer")

# Re-arm delay after repeated early wake-ups at one clock reading: the loops' granularity.
_MIN_SLEEP = 0.001
# uvloop (and loops without asyncio's _clock_resolution): delays are rounded to milliseconds.
_ROUNDING_SLACK = 0.0005
# How often call_at() asks the wheel whether it wants an earlier wake-up (its batch size).
_WAKEUP_CHECK = 256


class WheelTimer:
    """Deliver items to ``on_due(list)`` when their ``loop.time()`` deadline passes."""

    __slots__ = (
        "_on_due", "_loop", "_wheel", "_handle", "_armed_at", "_closed", "_firing", "_slack",
        "_early_at", "_since_check",
    )

    def __init__(
        self,
        on_due: Callable[[list], None],
        *,
        tick: float = 0.001,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._on_due = on_due
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._wheel = TimingWheel(tick, self._loop.time())
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self._closed = False
        self._firing = False  # inside _fire: it re-arms once at the end
        res = getattr(self._loop, "_clock_resolution", None)
        self._slack = float(res) if isinstance(res, (int, float)) else _ROUNDING_SLACK
        self._early_at: float | None = None  # loop.time() of the last wake-up that was early
        self._since_check = 0  # schedules since the wake-up was last compared with next_wakeup()

    def call_at(self, when: float, item: object) -> int:
        """Deliver item at loop time ``when``; returns a handle for cancel()."""
        if self._closed:
            raise RuntimeError("WheelTimer is closed")
        handle = self._wheel.schedule(when, item)
        if not self._firing:
            if self._armed_at is None or when < self._armed_at:
                self._arm(when)
            else:
                # A burst of schedules into one far slot makes the wheel want an earlier
                # wake-up (to spread that slot's cascade); it can only change after
                # _WAKEUP_CHECK schedules, so looking every _WAKEUP_CHECK calls suffices.
                self._since_check += 1
                if self._since_check >= _WAKEUP_CHECK:
                    self._since_check = 0
                    w = self._wheel.next_wakeup()
                    if w is not None and w < self._armed_at:
                        self._arm(w)
        return handle

    def call_later(self, delay: float, item: object) -> int:
        """Deliver item ``delay`` seconds from now."""
        return self.call_at(self._loop.time() + delay, item)

    def cancel(self, handle: int) -> bool:
        """Forget a pending item; False if it already fired, was cancelled or is unknown.

        The wake-up is left armed: a wake-up with nothing due just re-arms.
        """
        return self._wheel.cancel(handle)

    def __len__(self) -> int:
        return len(self._wheel)

    def close(self) -> None:
        """Cancel the wake-up and drop every pending item; idempotent."""
        self._closed = True
        self._disarm()
        self._wheel.clear()

    # ---- internals ----

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._loop.call_at(when + self._slack, self._fire)

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._armed_at = None

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = None
        now = self._loop.time()
        batch = self._wheel.advance(now)
        self._firing = True
        try:
            if batch:
                try:
                    self._on_due(batch)
                except Exception:
                    log.exception("fastjob.timer: on_due failed for a batch of %d items", len(batch))
        finally:
            self._firing = False
            if not self._closed:
                self._rearm(now, bool(batch))

    def _rearm(self, now: float, delivered: bool) -> None:
        # next_wakeup() is the earliest deadline, or earlier when the wheel wants to spread a
        # large cascade over the ticks before it (a wake-up that then delivers nothing).
        nd = self._wheel.next_wakeup()
        if nd is None:
            self._disarm()
            return
        if delivered or nd <= now:
            self._early_at = None
        elif self._early_at == now:
            # Early again at the same clock reading: wait one granule rather than spin.
            nd = max(nd, now + _MIN_SLEEP)
        else:
            self._early_at = now
        if self._armed_at != nd:
            self._arm(nd)
