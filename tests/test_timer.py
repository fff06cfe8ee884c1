"""WheelTimer driver tests on real event loops (asyncio and uvloop), both wheel implementations.

Synchronisation is by futures awaited with bounded timeouts, never by sleeping and hoping.
"""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

import fastjob.timer as timer_mod
from fastjob import _timewheel_py
from fastjob.timer import WheelTimer

LOOPS = ["asyncio", "uvloop"]
WAIT = 5.0  # generous upper bound for any single wait: a loaded CI machine must not flake


@pytest.fixture(params=LOOPS)
def run(request):
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""
    if request.param == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop

    def runner(coro):
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    return runner


@pytest.fixture(params=["timerfd", "loop"], autouse=True)
def wake_source(request, monkeypatch):
    """Both wake-up sources: the timerfd (Linux default) and loop.call_at (the fallback)."""
    if request.param == "loop":
        monkeypatch.setattr(timer_mod, "_TimerFd", None)
    elif timer_mod._TimerFd is None:
        pytest.skip("no timerfd here (not Linux, or FASTJOB_PUREPYTHON=1)")
    return request.param


@pytest.fixture(params=["cython", "python"], autouse=True)
def wheel_impl(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(timer_mod, "TimingWheel", _timewheel_py.TimingWheel)
    else:
        from fastjob._timewheel import TimingWheel

        monkeypatch.setattr(timer_mod, "TimingWheel", TimingWheel)
    return request.param


class Recorder:
    """on_due callback: records (time.monotonic(), batch) and resolves a future after n items."""

    def __init__(self, expected: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.batches: list[tuple[float, list]] = []
        self.items: list = []
        self.expected = expected
        self.done = self.loop.create_future()

    def __call__(self, batch: list) -> None:
        self.batches.append((time.monotonic(), list(batch)))
        self.items.extend(batch)
        if len(self.items) >= self.expected and not self.done.done():
            self.done.set_result(None)


def test_items_delivered_not_before_their_time(run):
    async def main():
        rec = Recorder(20)
        t = WheelTimer(rec)
        base = t.time()
        deadlines = {}
        for i in range(20):
            when = base + 0.005 + i * 0.0037  # sub-millisecond offsets: exercises early wake-ups
            deadlines[i] = when
            t.call_at(when, i)
        await asyncio.wait_for(rec.done, WAIT)
        for at, batch in rec.batches:
            for i in batch:
                assert at >= deadlines[i]
                assert time.monotonic() >= deadlines[i]
        assert rec.items == list(range(20))
        assert len(t) == 0
        t.close()

    run(main())


def test_same_deadline_is_one_batch_in_order(run):
    async def main():
        rec = Recorder(100)
        t = WheelTimer(rec)
        when = t.time() + 0.01
        for i in range(100):
            t.call_at(when, i)
        await asyncio.wait_for(rec.done, WAIT)
        assert len(rec.batches) == 1
        assert rec.batches[0][1] == list(range(100))
        t.close()

    run(main())


def test_cancel(run):
    async def main():
        rec = Recorder(1)
        t = WheelTimer(rec)
        ha = t.call_later(0.005, "a")
        hb = t.call_later(0.02, "b")
        assert len(t) == 2
        assert t.cancel(ha) is True
        assert t.cancel(ha) is False
        await asyncio.wait_for(rec.done, WAIT)
        assert rec.items == ["b"]
        assert t.cancel(hb) is False  # already delivered
        t.close()

    run(main())


def test_rearms_for_an_earlier_deadline(run):
    async def main():
        rec = Recorder(1)
        t = WheelTimer(rec)
        t.call_later(60.0, "late")
        start = t.time()
        t.call_later(0.01, "early")
        await asyncio.wait_for(rec.done, WAIT)
        assert rec.items == ["early"]
        assert t.time() - start < 30.0
        assert len(t) == 1
        t.close()

    run(main())


def test_exception_in_callback_is_logged_and_timer_survives(run, caplog):
    async def main():
        got = []
        done = asyncio.get_running_loop().create_future()

        def on_due(batch):
            got.extend(batch)
            if "after" in batch:
                done.set_result(None)
            if batch[0] == "boom":
                raise RuntimeError("handler failed")

        t = WheelTimer(on_due)
        t.call_later(0.002, "boom")
        t.call_later(0.25, "after")  # far enough that a loaded machine still sees two batches
        await asyncio.wait_for(done, WAIT)
        assert got == ["boom", "after"]
        t.close()

    with caplog.at_level(logging.ERROR, logger="fastjob.timer"):
        run(main())
    errors = [r for r in caplog.records if r.name == "fastjob.timer"]
    assert len(errors) == 1 and errors[0].exc_info[0] is RuntimeError


def test_schedule_and_close_from_callback(run):
    async def main():
        rec_items = []
        done = asyncio.get_running_loop().create_future()

        def on_due(batch):
            rec_items.extend(batch)
            if batch[-1] < 5:
                t.call_later(0.001, batch[-1] + 1)
            else:
                t.close()
                done.set_result(None)

        t = WheelTimer(on_due)
        t.call_later(0.001, 0)
        t.call_later(30.0, "never")
        await asyncio.wait_for(done, WAIT)
        assert rec_items == [0, 1, 2, 3, 4, 5]
        assert len(t) == 0 and t._armed_at is None

    run(main())


def test_close_cancels_wakeup_and_is_idempotent(run):
    async def main():
        loop = asyncio.get_running_loop()
        delivered = []
        t = WheelTimer(delivered.extend)
        t.call_later(0.005, "x")
        t.close()
        t.close()
        assert len(t) == 0 and t._armed_at is None
        with pytest.raises(RuntimeError):
            t.call_later(0.001, "y")
        # A plain loop timer well after x's deadline: by then x would have been delivered.
        probe = loop.create_future()
        loop.call_later(0.03, probe.set_result, None)
        await asyncio.wait_for(probe, WAIT)
        assert delivered == []

    run(main())


def test_early_wakeup_rearms_without_spinning(run):
    """Sub-millisecond deadlines on a millisecond clock: few wake-ups, none delivers early."""

    async def main():
        loop = asyncio.get_running_loop()
        fires = 0
        done = loop.create_future()

        class Counting(WheelTimer):
            __slots__ = ()

            def _fire(self):
                nonlocal fires
                fires += 1
                super()._fire()

        def on_due(batch):
            for when in batch:
                assert time.monotonic() >= when
            if not done.done():
                done.set_result(None)

        t = Counting(on_due)
        base = t.time()
        for k in range(5):
            t.call_at(base + 0.0104 + k * 0.00001, base + 0.0104 + k * 0.00001)
        await asyncio.wait_for(done, WAIT)
        assert fires <= 4, fires
        t.close()

    run(main())


def test_call_later_delay_and_len(run):
    async def main():
        rec = Recorder(3)
        t = WheelTimer(rec, tick=0.002)
        start = t.time()
        for i in range(3):
            t.call_later(0.01 * i, i)
        assert len(t) == 3
        await asyncio.wait_for(rec.done, WAIT)
        assert rec.items == [0, 1, 2]
        assert rec.batches[-1][0] >= start + 0.01 * 2
        t.close()

    run(main())


def test_wake_source_choice(run, wake_source):
    async def main():
        t = WheelTimer(list)
        assert t.precise is (wake_source == "timerfd")
        t.close()
        with pytest.raises(ValueError):
            WheelTimer(list, wake="sometimes")
        if wake_source == "loop":
            with pytest.raises(RuntimeError):
                WheelTimer(list, wake="timerfd")
        t = WheelTimer(list, wake="loop")
        assert not t.precise
        t.close()

    run(main())


@pytest.mark.parametrize("wake_source", ["timerfd"], indirect=True)  # a timerfd test: no loop-timer case
def test_close_releases_the_timerfd(run, wake_source):

    async def main():
        t = WheelTimer(list)
        fd = t._wake._fd
        fileno = fd.fileno()
        t.call_later(10.0, "x")
        t.close()
        assert fd.closed
        # no reader left behind (asyncio answers False; uvloop answers None either way)
        assert not asyncio.get_running_loop().remove_reader(fileno)
        t.close()

    run(main())


def test_dense_deadlines_are_batched(run, wake_source):
    """A thousand deadlines 5 us apart: a handful of wake-ups, all in order, none early."""

    async def main():
        rec = Recorder(1000)
        t = WheelTimer(rec)
        base = t.time() + 0.01
        for i in range(1000):
            t.call_at(base + i * 5e-6, i)
        await asyncio.wait_for(rec.done, WAIT)
        assert rec.items == list(range(1000))
        for at, batch in rec.batches:
            assert at >= base + batch[-1] * 5e-6
        assert len(rec.batches) < 100, len(rec.batches)
        t.close()

    run(main())


def test_wheel_error_keeps_the_timer_armed(run, wake_source):
    """advance() failing (say MemoryError) must not leave pending items without a wake-up."""

    async def main():
        rec = Recorder(1)
        t = WheelTimer(rec)
        real = t._wheel
        failures = []

        class Flaky:
            def __getattr__(self, name):
                return getattr(real, name)

            def advance(self, now):
                if not failures:
                    failures.append(now)
                    raise MemoryError("simulated")
                return real.advance(now)

            def __len__(self):
                return len(real)

        t._wheel = Flaky()
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
        t.call_later(0.002, "x")
        await asyncio.wait_for(rec.done, WAIT)
        assert rec.items == ["x"] and failures
        assert any(isinstance(e, MemoryError) for e in errors)
        t.close()

    run(main())
