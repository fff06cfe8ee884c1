"""Asyncio driver for the timing wheel: one wake-up source for any number of pending fires.

Deadlines are ``time.monotonic()`` seconds (:meth:`WheelTimer.time`).  That is asyncio's
``loop.time()``; uvloop's ``loop.time()`` is the same clock rounded down to the millisecond (it
lags by up to 1 ms), so the driver never uses it.

The loop sees a single wake-up, armed at the wheel's ``next_wakeup()`` (its earliest deadline,
or a little earlier when a large cascade is to be spread over the ticks before it).  It is
re-armed when an earlier deadline is scheduled and after every wake-up.  A wake-up advances the
wheel to ``time.monotonic()`` and hands the due items to ``on_due`` as one list, so a burst of
a million fires costs a few thousand loop callbacks instead of a million.

Two wake-up sources:

* **timerfd** (Linux, the default): a timerfd registered as a loop reader and armed for the
  exact deadline.  It ends the loop's wait within tens of microseconds, where loop timers
  round to whole milliseconds (asyncio's selector rounds its sleep up, uvloop counts whole
  milliseconds).  Under a dense burst the driver waits ``_MIN_GAP`` (a quarter tick, at most
  250 us) after a delivery before it wakes again, so a tick's fires go out in a few batches
  and the loop gets a turn in between (both sources do this).
* **loop timer** (elsewhere, or ``wake="loop"``): ``loop.call_at`` armed a hair after the
  deadline, since loops may run a timer early by their clock resolution (asyncio) or by half a
  millisecond (uvloop's rounding).  A wake-up that still finds nothing due twice at the same
  clock reading re-arms ``_MIN_SLEEP`` later instead of spinning on zero-delay timers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .timewheel import TimingWheel

if TYPE_CHECKING:
    from ._timerfd import TimerFd

__all__ = ["WheelTimer"]

log = logging.getLogger("fastjob.timer")

# Loop-timer source: re-arm delay after repeated early wake-ups at one clock reading.
_MIN_SLEEP = 0.001
# Loop-timer source on uvloop (no _clock_resolution): delays are rounded to milliseconds.
_ROUNDING_SLACK = 0.0005
# How often call_at() asks the wheel whether it wants an earlier wake-up (its batch size).
_WAKEUP_CHECK = 256
# After a delivery the next wake-up waits at least min(tick / 4, _MIN_GAP): dense deadlines go out
# in batches (a 1e6/s burst made 33k wake-ups without it) while every fire stays well within a tick.
_MIN_GAP = 0.00025


def _load_timerfd() -> type[TimerFd] | None:
    """The compiled timerfd class, or None where there is none (not Linux, pure-Python mode)."""
    if not sys.platform.startswith("linux") or os.environ.get("FASTJOB_PUREPYTHON", "") not in ("", "0"):
        return None
    from ._timerfd import TimerFd  # a missing build on Linux is an error, as for the wheel

    return TimerFd


_TimerFd = _load_timerfd()


class _TimerFdWake:
    """Wake-ups from a timerfd that the loop watches like a socket."""

    __slots__ = ("_loop", "_fd", "_callback")

    precise = True

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        assert _TimerFd is not None, "built only where the timerfd module loaded"
        self._fd = _TimerFd()
        try:
            loop.add_reader(self._fd.fileno(), self._on_readable)
        except BaseException:
            self._fd.close()
            raise

    def arm(self, when: float) -> None:
        self._fd.arm_at(when)

    def disarm(self) -> None:
        self._fd.disarm()

    def close(self) -> None:
        if not self._fd.closed:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._fd.fileno())
            self._fd.close()

    def _on_readable(self) -> None:
        if self._fd.consume():
            self._callback()


class _LoopTimerWake:
    """Wake-ups from ``loop.call_at``, a hair late so that they are never early."""

    __slots__ = ("_loop", "_callback", "_handle", "_slack")

    precise = False

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        res = getattr(loop, "_clock_resolution", None)
        self._slack = float(res) if isinstance(res, (int, float)) else _ROUNDING_SLACK

    def arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        # loop.time() may lag time.monotonic() (uvloop): convert at arming time.
        loop_when = when + (self._loop.time() - time.monotonic())
        self._handle = self._loop.call_at(loop_when + self._slack, self._fired)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        self.disarm()

    def _fired(self) -> None:
        self._handle = None
        self._callback()


class WheelTimer:
    """Deliver items to ``on_due(list)`` once ``time.monotonic()`` passes their deadline."""

    __slots__ = (
        "_on_due", "_loop", "_wheel", "_wake", "_armed_at", "_closed", "_firing", "_min_gap",
        "_early_at", "_since_check",
    )

    def __init__(
        self,
        on_due: Callable[[list[Any]], None],
        *,
        tick: float = 0.001,
        loop: asyncio.AbstractEventLoop | None = None,
        wake: str = "auto",
    ) -> None:
        """``wake``: "timerfd", "loop" (loop.call_at) or "auto" (timerfd where available)."""
        if wake not in ("auto", "timerfd", "loop"):
            raise ValueError(f"wake must be 'auto', 'timerfd' or 'loop', got {wake!r}")
        self._on_due = on_due
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._wheel = TimingWheel(tick, time.monotonic())
        self._wake = self._make_wake(wake)
        self._armed_at: float | None = None
        self._closed = False
        self._firing = False  # inside _fire: it re-arms once at the end
        self._min_gap = min(tick / 4, _MIN_GAP)  # after a delivery, the next wake-up waits this long
        self._early_at: float | None = None  # loop.time() of the last loop-timer wake-up that was early
        self._since_check = 0  # schedules since the wake-up was last compared with next_wakeup()

    def _make_wake(self, wake: str) -> _TimerFdWake | _LoopTimerWake:
        if wake == "timerfd" and _TimerFd is None:
            raise RuntimeError("timerfd wake-ups need Linux and the compiled fastjob._timerfd")
        if wake != "loop" and _TimerFd is not None:
            try:
                return _TimerFdWake(self._loop, self._fire)
            except (NotImplementedError, OSError) as exc:
                # a loop without add_reader (Windows' proactor), or no descriptor to spare
                if wake == "timerfd":
                    raise
                log.warning("fastjob.timer: timerfd unavailable (%s); using loop timers", exc)
        return _LoopTimerWake(self._loop, self._fire)

    @staticmethod
    def time() -> float:
        """The driver's clock: deadlines passed to call_at() are on it."""
        return time.monotonic()

    @property
    def precise(self) -> bool:
        """True when wake-ups come from a timerfd (sub-millisecond), False for loop timers."""
        return self._wake.precise

    def call_at(self, when: float, item: object) -> int:
        """Deliver item once time.monotonic() >= ``when``; returns a handle for cancel()."""
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
        return self.call_at(time.monotonic() + delay, item)

    def cancel(self, handle: int) -> bool:
        """Forget a pending item; False if it already fired, was cancelled or is unknown.

        The wake-up is left armed: a wake-up with nothing due just re-arms.
        """
        return self._wheel.cancel(handle)

    def __len__(self) -> int:
        return len(self._wheel)

    def close(self) -> None:
        """Stop the wake-ups and drop every pending item; idempotent."""
        self._closed = True
        self._armed_at = None
        self._wake.close()
        self._wheel.clear()

    # ---- internals ----

    def _arm(self, when: float) -> None:
        self._armed_at = when
        self._wake.arm(when)

    def _fire(self) -> None:
        self._armed_at = None
        now = time.monotonic()
        try:
            batch = self._wheel.advance(now)
        except BaseException:
            # (MemoryError: the wheel kept its timers.)  Stay armed, or they would wait for
            # the next call_at().
            if not self._closed:
                self._arm(now + _MIN_SLEEP)
            raise
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
        nd = self._wheel.next_wakeup()
        if nd is None:
            self._wake.disarm()
            return
        if delivered or nd <= now:
            self._early_at = None
            # Dense deadlines: let the next ones gather for a moment (and the loop run) rather
            # than wake for each; tick / 4 keeps every fire well within one tick.
            nd = max(nd, now + self._min_gap)
        elif not self._wake.precise:
            # A loop timer came early.  Early again at the same reading of the loop's clock
            # (a coarse one): wait one granule rather than spin on zero-delay timers.
            loop_now = self._loop.time()
            if self._early_at == loop_now:
                nd = max(nd, now + _MIN_SLEEP)
            else:
                self._early_at = loop_now
        self._arm(nd)
