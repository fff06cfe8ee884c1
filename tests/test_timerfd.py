"""The timerfd wrapper the timer driver wakes on (Linux only)."""
from __future__ import annotations

import math
import select
import sys
import time

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("timerfd is Linux-only", allow_module_level=True)

from fastjob._timerfd import TimerFd  # noqa: E402


@pytest.fixture
def tfd():
    fd = TimerFd()
    yield fd
    fd.close()


def readable(fd: TimerFd, timeout: float) -> bool:
    r, _, _ = select.select([fd.fileno()], [], [], timeout)
    return bool(r)


def test_not_readable_until_its_instant(tfd):
    tfd.arm_at(time.monotonic() + 60.0)  # far enough that no stall of a loaded machine reaches it
    assert not readable(tfd, 0)
    assert tfd.consume() == 0
    when = time.monotonic() + 0.05
    tfd.arm_at(when)
    assert readable(tfd, 5.0)
    assert time.monotonic() >= when
    assert tfd.consume() == 1
    assert not readable(tfd, 0)


@pytest.mark.parametrize("when", [0.0, -5.0, 1e-12, 1.0])
def test_past_instants_fire_at_once(tfd, when):
    tfd.arm_at(when)
    assert readable(tfd, 5.0)
    assert tfd.consume() == 1


def test_rearm_replaces_and_disarm_cancels(tfd):
    tfd.arm_at(time.monotonic() + 0.01)
    tfd.arm_at(time.monotonic() + 3600)
    assert not readable(tfd, 0.05)
    tfd.arm_at(0.0)
    assert readable(tfd, 5.0)
    tfd.disarm()  # re-setting the timer also drops an expiry not yet read
    assert tfd.consume() == 0
    tfd.arm_at(time.monotonic() + 0.01)
    tfd.disarm()
    assert not readable(tfd, 0.05)


def test_far_future_is_kept_not_rejected(tfd):
    tfd.arm_at(1e300)
    assert not readable(tfd, 0)


def test_bad_input_and_closed(tfd):
    with pytest.raises(ValueError):
        tfd.arm_at(math.nan)
    with pytest.raises(TypeError):
        tfd.arm_at("soon")
    fd = TimerFd()
    fd.close()
    fd.close()
    assert fd.closed
    for call in (lambda: fd.arm_at(1.0), fd.disarm, fd.consume):
        with pytest.raises(ValueError):
            call()
