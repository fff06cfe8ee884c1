"""TimingWheel tests, run against both implementations (compiled and pure Python).

The compiled wheel must import: a missing build fails these tests instead of skipping them.
"""
from __future__ import annotations

import gc
import heapq
import math
import os
import random
import subprocess
import sys
import tracemalloc
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastjob import _timewheel_py

IMPLS = ["cython", "python"]
TOP_TICKS = 2**36  # ticks covered by the compiled wheel's levels; beyond: overflow list


def _load(name: str):
    if name == "cython":
        from fastjob import _timewheel  # ImportError -> test failure, by design

        return _timewheel.TimingWheel
    return _timewheel_py.TimingWheel


@pytest.fixture(params=IMPLS)
def Wheel(request):
    return _load(request.param)


# ---- reference model -------------------------------------------------------------------------


class Model:
    """The specification: a heap of (deadline, seq) with exact comparisons."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, object]] = []
        self.live: dict[object, float] = {}
        self.seq = 0

    def schedule(self, d: float, key: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (d, self.seq, key))
        self.live[key] = d

    def cancel(self, key: object) -> bool:
        return self.live.pop(key, None) is not None

    def advance(self, now: float) -> list:
        out = []
        while self.heap and self.heap[0][0] <= now:
            _, _, key = heapq.heappop(self.heap)
            if self.live.pop(key, None) is not None:
                out.append(key)
        return out

    def next_deadline(self) -> float | None:
        return min(self.live.values()) if self.live else None


class Harness:
    """Drives a wheel and the model side by side and checks them after every step."""

    def __init__(self, Wheel, tick: float) -> None:
        self.tick = tick
        self.wheel = Wheel(tick, now=0.0)
        self.model = Model()
        self.now = 0.0
        self.handles: list[tuple[int, object]] = []
        self.n = 0

    def schedule(self, d: float) -> None:
        self.n += 1
        key = ("item", self.n, d)
        h = self.wheel.schedule(d, key)
        assert isinstance(h, int)
        self.model.schedule(d, key)
        self.handles.append((h, key))

    def cancel_index(self, i: int) -> None:
        if not self.handles:
            return
        h, key = self.handles[i % len(self.handles)]
        assert self.wheel.cancel(h) == self.model.cancel(key)

    def advance(self, now: float) -> None:
        self.now = max(self.now, now)
        got = self.wheel.advance(now)
        want = self.model.advance(now)
        assert got == want
        for key in got:
            assert key[2] <= now  # never early
        nd = self.model.next_deadline()
        assert nd is None or nd > now  # nothing due is left behind (so: not late either)

    def check(self) -> None:
        assert len(self.wheel) == len(self.model.live)
        nd = self.model.next_deadline()
        assert self.wheel.next_deadline() == nd
        wake = self.wheel.next_wakeup()
        assert (wake is None) == (nd is None)
        assert wake is None or wake <= nd  # may ask to be woken early, never late


# ---- property test ---------------------------------------------------------------------------

garbage_handles = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63, max_value=2**200),
    st.sampled_from([None, "1", 1.5, True, False, (), object()]),
)
ops = st.one_of(
    st.tuples(st.just("at"), st.integers(-8, 300)),  # now + k * tick/4: ties, same tick, past
    st.tuples(st.just("rel"), st.floats(-5.0, 5000.0, allow_nan=False)),
    st.tuples(st.just("far"), st.floats(0.5, 3.0)),  # beyond the top level's range
    st.tuples(st.just("burst"), st.integers(1, 200), st.integers(0, 130)),
    st.tuples(st.just("cancel"), st.integers(0, 10**6)),
    st.tuples(st.just("garbage"), garbage_handles),
    st.tuples(st.just("adv"), st.floats(0.0, 1.0), st.sampled_from([0.0, 0.3, 1, 64, 4096, 2**20, TOP_TICKS])),
    st.tuples(st.just("jump"), st.sampled_from([-1, 0, 1])),  # to next deadline (or just before/after)
    st.tuples(st.just("back"), st.floats(0.0, 10.0)),  # advance with a time in the past
)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tick=st.sampled_from([0.001, 0.01, 1.0]), program=st.lists(ops, max_size=60))
def test_matches_heap_model(impl, tick, program):
    h = Harness(_load(impl), tick)
    for op in program:
        kind = op[0]
        if kind == "at":
            h.schedule(h.now + op[1] * tick / 4)
        elif kind == "rel":
            h.schedule(h.now + op[1])
        elif kind == "far":
            h.schedule(h.now + op[1] * TOP_TICKS * tick)
        elif kind == "burst":
            n, k = op[1], op[2]
            for j in range(n):  # same tick, deadlines in scrambled order inside it
                h.schedule(h.now + k * tick + ((j * 7919) % n) * tick / (n + 1))
        elif kind == "cancel":
            h.cancel_index(op[1])
        elif kind == "garbage":
            assert h.wheel.cancel(op[1]) is False
        elif kind == "adv":
            h.advance(h.now + op[1] * op[2] * tick)
        elif kind == "jump":
            nd = h.model.next_deadline()
            if nd is not None:
                h.advance(math.nextafter(nd, nd + op[1]) if op[1] else nd)
        elif kind == "back":
            h.advance(h.now - op[1])
        h.check()
    h.advance(h.now + 4 * TOP_TICKS * tick)
    h.check()


@pytest.mark.parametrize("seed", [1, 2])
def test_large_counts_match_model(Wheel, seed):
    rnd = random.Random(seed)
    h = Harness(Wheel, 0.001)
    for _ in range(20_000):
        r = rnd.random()
        if r < 0.7:
            h.schedule(rnd.choice([rnd.uniform(0, 0.05), rnd.uniform(0, 10), rnd.uniform(0, 5000)]))
        elif r < 0.8:
            h.schedule(round(rnd.uniform(0, 3), 3))  # many exact ties
        else:
            h.cancel_index(rnd.randrange(10**6))
    while h.model.live:
        h.advance(h.now + rnd.choice([0.0004, 0.003, 0.2, 30.0]))
        h.check()


def test_driven_by_next_wakeup_matches_model(Wheel):
    """A driver that sleeps until next_wakeup(): big slots are cascaded ahead, a share per
    tick; nothing changes in what fires when."""
    rnd = random.Random(5)
    h = Harness(Wheel, 0.001)
    for _ in range(6_000):
        h.schedule(rnd.choice([1.0 + rnd.random(), 5.0 + 0.2 * rnd.random(), rnd.uniform(0, 400)]))
    for i in range(0, len(h.handles), 7):
        h.cancel_index(i)
    h.check()
    wakes = 0
    while h.model.live:
        w = h.wheel.next_wakeup()
        wakes += w < h.model.next_deadline()
        h.advance(max(w, h.now) + rnd.choice([0.0, 0.0002, 0.0013]))
        h.check()
    if Wheel.__module__.endswith("_timewheel"):
        assert wakes > 0  # the compiled wheel asked to prepare its cascades


def test_cancelled_nodes_are_reused_not_grown():
    from fastjob._timewheel import TimingWheel

    w = TimingWheel(0.001, now=0.0)
    rnd = random.Random(3)
    hs = [w.schedule(rnd.uniform(0, 100), None) for _ in range(50_000)]
    size = w.memory_usage()
    for _ in range(3):
        for hd in hs:
            assert w.cancel(hd)
        assert len(w) == 0 and w.next_deadline() is None
        assert not any(w.cancel(hd) for hd in hs[:100])  # stale after a lazy cancel
        hs = [w.schedule(rnd.uniform(0, 100), None) for _ in range(50_000)]
        # the handle table is reused, not grown; bucket vectors differ by a little slack
        assert w.memory_usage() <= size * 1.05
    keep = hs[::2]
    for hd in hs[1::2]:
        w.cancel(hd)
    assert len(w) == len(keep)
    got = w.advance(200.0)
    assert len(got) == len(keep) and len(w) == 0


def test_slots_are_handed_out_in_address_order_after_churn():
    """Timers fired in random order free their slots in random order; the next ones scheduled
    still get table slots in ascending order (next fit), so using them in the order they were
    scheduled streams through memory.  Handles stay unique and valid throughout."""
    from fastjob._timewheel import TimingWheel

    w = TimingWheel(0.001, now=0.0)
    rnd = random.Random(8)
    for _ in range(20_000):
        w.schedule(rnd.uniform(0, 10), None)
    w.advance(5.0)  # about half fire, in deadline order: their slots come free scattered
    live = len(w)
    hs = [w.schedule(rnd.uniform(20, 30), i) for i in range(5_000)]
    slots = [h & 0xFFFFFFFF for h in hs]
    assert len(set(hs)) == len(hs)
    ascending = sum(b > a for a, b in pairwise(slots))
    assert ascending >= len(slots) - 3, ascending  # one wrap-around at most
    assert len(w) == live + 5_000
    assert all(w.cancel(h) for h in hs[::2]) and not any(w.cancel(h) for h in hs[::2])
    assert sorted(w.advance(40.0)[-2_500:]) == list(range(1, 5_000, 2))


def test_far_future_is_kept_not_clamped(Wheel):
    w = Wheel(1.0, now=0.0)
    far = 5.0 * TOP_TICKS
    w.schedule(far, "far")
    w.schedule(1e300, "very far")
    assert w.advance(far - 1.0) == []
    assert w.next_deadline() == far
    assert w.advance(far) == ["far"]
    assert w.advance(1e299) == []
    assert w.advance(1e300) == ["very far"]
    assert len(w) == 0


@pytest.mark.parametrize("tick", [0.001, 1.0])
def test_dense_tick_advanced_in_steps_matches_model(Wheel, tick):
    """Thousands of deadlines inside one tick (the compiled wheel sorts such a slot by dealing
    it into buckets), with exact ties and cancelled ones, taken a slice at a time; deadlines
    already past, scheduled while time is inside the tick, join its slot (the clamped keys)."""
    rnd = random.Random(11)
    h = Harness(Wheel, tick)
    h.advance(50 * tick)
    start = 60 * tick
    for _ in range(3000):
        r = rnd.random()
        if r < 0.8:
            h.schedule(start + rnd.random() * tick)
        elif r < 0.9:
            h.schedule(start + tick * rnd.choice([0.0, 0.25, 0.5, 0.999]))  # exact ties
        else:
            h.schedule(rnd.uniform(0, 50 * tick))  # already past: the current slot
    for i in range(0, len(h.handles), 5):
        h.cancel_index(i)
    h.advance(start - tick / 3)  # inside the tick before: the past ones go
    h.check()
    h.advance(start + tick * 0.05)  # inside the dense tick: its slot gets sorted
    h.check()
    for _ in range(200):
        h.schedule(rnd.uniform(0, start))  # past: into the current slot, which is unsorted again
    h.schedule(start + tick * 0.9)
    while h.model.live:
        h.advance(h.now + tick * rnd.choice([0.01, 0.07, 0.3]))
        h.check()


def test_not_early_within_the_current_tick(Wheel):
    w = Wheel(1.0, now=0.0)
    w.schedule(0.7, "a")
    w.schedule(0.2, "b")
    assert w.advance(0.5) == ["b"]
    assert w.next_deadline() == 0.7
    assert w.advance(0.69) == []
    assert w.advance(0.7) == ["a"]


def test_past_deadlines_fire_on_next_advance(Wheel):
    w = Wheel(0.001, now=100.0)
    w.advance(200.0)
    w.schedule(150.0, "late")
    w.schedule(-1e9, "very late")
    assert w.next_deadline() == -1e9
    assert w.advance(200.0) == ["very late", "late"]


def test_ties_fire_in_insertion_order(Wheel):
    w = Wheel(0.001, now=0.0)
    for i in range(100):
        w.schedule(5.0, i)
    w.schedule(4.0, "first")
    assert w.advance(5.0) == ["first"] + list(range(100))


def test_schedule_from_advance_results(Wheel):
    w = Wheel(0.001, now=0.0)
    w.schedule(1.0, 1)
    fired = []
    now = 0.0
    while len(fired) < 50:
        now += 0.5
        for x in w.advance(now):
            fired.append(x)
            w.schedule(now + 0.25 * x, x + 1)  # re-schedule from the processing of a batch
    assert fired == list(range(1, 51))


def test_handles_are_generation_checked(Wheel):
    w = Wheel(0.001, now=0.0)
    h1 = w.schedule(1.0, "a")
    assert w.cancel(h1) is True
    assert w.cancel(h1) is False
    h2 = w.schedule(1.0, "b")  # likely reuses a's node
    assert h2 != h1
    assert w.cancel(h1) is False
    assert len(w) == 1
    assert w.advance(2.0) == ["b"]
    assert w.cancel(h2) is False  # fired
    h3 = w.schedule(3.0, "c")
    w.clear()
    assert w.cancel(h3) is False
    h4 = w.schedule(3.0, "d")
    assert w.cancel(h3) is False and len(w) == 1
    assert w.cancel(h4) is True


def test_handle_from_another_wheel_or_garbage_never_corrupts(Wheel):
    a, b = Wheel(0.001, now=0.0), Wheel(0.001, now=0.0)
    for i in range(10):
        a.schedule(i, i)
    for bad in [-1, 2**63, 2**64 + 1, 2**300, "x", None, 1.0, True, [1], object()]:
        assert b.cancel(bad) is False
        assert a.cancel(bad) is False
    assert len(a) == 10
    assert a.advance(100) == list(range(10))


def test_next_deadline_and_len(Wheel):
    w = Wheel(0.001, now=0.0)
    assert w.next_deadline() is None and len(w) == 0
    h = w.schedule(3.25, "x")
    w.schedule(7.5, "y")
    assert w.next_deadline() == 3.25 and len(w) == 2
    w.cancel(h)
    assert w.next_deadline() == 7.5 and len(w) == 1
    w.clear()
    assert w.next_deadline() is None and len(w) == 0
    assert w.advance(100.0) == []


def test_tick_property_and_default_now(Wheel):
    w = Wheel()
    assert w.tick == 0.001
    import time

    w.schedule(time.monotonic() - 1, "due")
    assert w.advance(time.monotonic()) == ["due"]


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1.0", b"1", None, [1.0], {}, 1j, object()])
def test_non_numeric_deadline_is_type_error(Wheel, bad):
    w = Wheel(0.001, now=0.0)
    with pytest.raises(TypeError, match="deadline must be a real number"):
        w.schedule(bad, "x")
    with pytest.raises(TypeError, match="now must be a real number"):
        w.advance(bad)
    assert len(w) == 0 and w.next_deadline() is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 10**400])
def test_non_finite_deadline_is_value_error(Wheel, bad):
    w = Wheel(0.001, now=0.0)
    w.schedule(1.0, "ok")
    with pytest.raises(ValueError, match="deadline must be a finite number"):
        w.schedule(bad, "x")
    with pytest.raises(ValueError, match="now must be a finite number"):
        w.advance(bad)
    assert len(w) == 1 and w.advance(1.0) == ["ok"]


def test_other_real_numbers_are_accepted(Wheel):
    w = Wheel(Fraction(1, 1000), now=0)
    w.schedule(2, "int")
    w.schedule(Fraction(3, 2), "fraction")
    w.schedule(True, "bool")
    assert w.advance(Fraction(5, 2)) == ["bool", "fraction", "int"]


@pytest.mark.parametrize("tick", [0, -0.001, 0.0, 1e-300, 5e-324, 9e-7])
def test_bad_tick(Wheel, tick):
    with pytest.raises(ValueError, match="tick must be >= 1 microsecond"):
        Wheel(tick)


def test_bad_tick_and_now_types(Wheel):
    with pytest.raises(TypeError, match="tick"):
        Wheel("fast")
    with pytest.raises(ValueError, match="tick"):
        Wheel(math.nan)
    with pytest.raises(TypeError, match="now"):
        Wheel(0.001, now="now")


# ---- reference counts and memory -------------------------------------------------------------


class Item:
    pass


def test_exact_refcounts(Wheel):
    w = Wheel(0.001, now=0.0)
    a, b, c, d = Item(), Item(), Item(), Item()
    rc = sys.getrefcount
    base = [rc(a), rc(b), rc(c), rc(d)]

    def counts():
        return [rc(a) - base[0], rc(b) - base[1], rc(c) - base[2], rc(d) - base[3]]

    ha = w.schedule(1.0, a)
    w.schedule(2.0, b)
    w.schedule(3.0, c)
    w.schedule(3.0, d)
    w.schedule(4.0, d)  # same item twice: two references
    # (each count is taken in a statement of its own: pytest's assert rewriting keeps the
    # temporaries of an assert expression alive)
    now = counts()
    assert now == [1, 1, 1, 2]
    ok = w.cancel(ha)
    now = counts()
    assert ok is True and now == [0, 1, 1, 2]
    ok = w.cancel(ha)
    now = counts()
    assert ok is False and now == [0, 1, 1, 2]
    got = w.advance(2.5)
    same = got[0] is b and len(got) == 1
    now = counts()
    assert same and now == [0, 1, 1, 2]  # the wheel's reference moved to the list
    del got
    now = counts()
    assert now == [0, 0, 1, 2]
    w.clear()
    now = counts()
    assert now == [0, 0, 0, 0]
    w.schedule(1.0, c)
    w.schedule(1.0, d)
    del w
    gc.collect()
    now = counts()
    assert now == [0, 0, 0, 0]


def test_reentrant_release_during_cancel_and_clear(Wheel):
    """An item's __del__ that uses the wheel must find it consistent."""
    w = Wheel(0.001, now=0.0)
    seen = []

    class Reentrant:
        def __del__(self):
            seen.append(len(w))
            w.schedule(9.0, "from __del__")

    h = w.schedule(1.0, Reentrant())
    assert w.cancel(h) is True
    assert seen == [0] and len(w) == 1
    w.schedule(1.0, Reentrant())
    w.schedule(2.0, Reentrant())
    w.clear()
    assert seen == [0, 0, 1] and len(w) == 2
    assert w.advance(10.0) == ["from __del__", "from __del__"]


def test_schedule_cancel_loop_does_not_grow(Wheel):
    w = Wheel(0.001, now=0.0)
    item = Item()
    rnd = random.Random(0)
    keep = [w.schedule(rnd.uniform(0, 100), item) for _ in range(1000)]

    def churn(n: int) -> None:
        for i in range(n):
            h = w.schedule(rnd.uniform(0, 100), item)
            if i % 2:
                w.cancel(h)
            else:
                w.cancel(keep[i % len(keep)])
                keep[i % len(keep)] = h

    churn(20_000)  # warm up: slab, dicts and heap reach their working size
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn(100_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(w) == 1000
    # A leak would cost >= 40 bytes per operation (4 MB here); the twin's heap compaction
    # cycle alone swings by ~130 KB.
    assert grown < 256 * 1024, grown


def test_compiled_node_is_small():
    from fastjob._timewheel import TimingWheel

    assert TimingWheel.node_size() <= 48
    w = TimingWheel(0.001, now=0.0)
    for n in (1000, 100_000, 1_000_000):
        while len(w) < n:
            w.schedule(len(w) * 0.001, None)
        assert w.memory_usage() / len(w) <= 48, n


# ---- implementation selection ----------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [("1", "False _timewheel_py"), ("", "True _timewheel")])
def test_implementation_is_selected_at_import(env, expected):
    code = (
        "import fastjob.timewheel as t; "
        "print(t.USING_CYTHON, t.TimingWheel.__module__.split('.')[-1])"
    )
    environ = dict(os.environ, FASTJOB_PUREPYTHON=env)
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
