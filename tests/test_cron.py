"""fastjob.cron, both implementations, tested against croniter as the reference.

The compiled module must import: a missing build fails these tests instead of skipping
them. Every implementation must agree with the other exactly, and with croniter (the
version pinned in pyproject.toml) except in the one documented case: for a cron whose
hour field is not '*', a wall time repeated by a fall-back change fires once, at its
first occurrence, where croniter fires at both (see fastjob/cron.py). ``expected`` below
encodes exactly that exception.

FASTJOB_CRON_EXAMPLES=N sets the property tests' example counts (default: modest, CI).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import subprocess
import sys
from zoneinfo import ZoneInfo

import pytest
from croniter import CroniterBadDateError, croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastjob import _cron_py, cron
from fastjob.cron import CronError

IMPLS = ["cython", "python"]
EXAMPLES = int(os.environ.get("FASTJOB_CRON_EXAMPLES", "0")) or None


def _load(name: str):
    if name == "cython":
        from fastjob import _cron  # ImportError -> test failure, by design

        return _cron
    return _cron_py


@pytest.fixture(params=IMPLS)
def impl(request):
    return _load(request.param)


UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
CHATHAM = ZoneInfo("Pacific/Chatham")
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Pacific/Chatham",
]
NEVER = "never"


def ms(when: dt.datetime) -> int:
    assert when.tzinfo is not None
    return (when - EPOCH) // dt.timedelta(milliseconds=1)


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def local(zone: ZoneInfo, *args: int, fold: int = 0) -> dt.datetime:
    return dt.datetime(*args, tzinfo=zone, fold=fold)


def in_zone(epoch_ms: int, zone: ZoneInfo) -> dt.datetime:
    return (EPOCH + dt.timedelta(milliseconds=epoch_ms)).astimezone(zone)


def fires(
    impl, expr: str, zone: str, after: dt.datetime | int, count: int
) -> list[int]:
    c = impl.parse(expr, zone)
    out, t = [], after if isinstance(after, int) else ms(after)
    for _ in range(count):
        t = c.next_after(t)
        out.append(t)
    return out


# ---- the reference: croniter, and the one documented difference ----------------------


def _six(expr: str) -> bool:
    return len(expr.split()) == 6


def croniter_next(expr: str, zone: str, after_ms: int) -> int:
    """croniter's next fire as schedule.cron_after gets it (a new object per fire)."""
    start = dt.datetime.fromtimestamp(after_ms / 1000.0, ZoneInfo(zone or "UTC"))
    return int(
        round(
            croniter(expr, start, second_at_beginning=_six(expr)).get_next(float) * 1000
        )
    )


def _hour_is_star(expr: str) -> bool:
    return croniter.expand(expr, second_at_beginning=_six(expr))[0][1][0] == "*"


def _second_occurrence(at_ms: int, zone: ZoneInfo) -> bool:
    """True for the later instant (fold=1) of a wall time repeated by a fall-back."""
    when = in_zone(at_ms, zone)
    return when.fold == 1 and when.replace(fold=0).utcoffset() != when.utcoffset()


def _end_of_second_pass(at_ms: int, zone: ZoneInfo) -> int:
    """The first instant after the repeated wall times that hold ``at_ms`` (fold=1)."""
    when = in_zone(at_ms, zone)
    first = ms(when.replace(fold=0))
    lo, hi = first, at_ms  # the offset changes in (lo, hi]: find where
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if in_zone(mid, zone).utcoffset() == when.utcoffset():
            hi = mid
        else:
            lo = mid
    return hi + (at_ms - first)  # the change, plus the length of the repeat


def expected(expr: str, zone: str, after_ms: int) -> int | str:
    """croniter's next fire, except where FastJob's rule differs: a cron whose hour
    field is not '*' does not fire at a second occurrence of a repeated wall time
    (croniter does), so its next fire is croniter's first one past such instants; and a
    cron whose hour field is '*' fires at every second occurrence, which croniter misses
    when the clock goes back by less than an hour (Lord Howe's 30 minutes)."""
    try:
        got = croniter_next(expr, zone, after_ms)
        tz = ZoneInfo(zone or "UTC")
        if not _hour_is_star(expr):
            while _second_occurrence(got, tz):
                got = croniter_next(expr, zone, _end_of_second_pass(got, tz) - 1)
        else:
            got = _short_repeat_missed_by_croniter(expr, tz, after_ms, got) or got
    except CroniterBadDateError:
        return NEVER
    return got


def _short_repeat_missed_by_croniter(expr: str, tz: ZoneInfo, after_ms: int, got_ms: int) -> int | None:
    """The first second occurrence of a matching wall time in (after_ms, got_ms) where the clock
    went back by less than an hour, which croniter never fires at; else None. Looks only at the
    clock changes of the week after ``after_ms`` (hour-'*' crons fire at least weekly)."""
    hop = 15 * 60_000
    end = min(got_ms, after_ms + 8 * 86_400_000)
    step = 1000 if _six(expr) else 60_000
    t = after_ms
    while t < end:
        before, after_hop = in_zone(t, tz).utcoffset(), in_zone(t + hop, tz).utcoffset()
        if (before is not None and after_hop is not None
                and dt.timedelta(0) < before - after_hop < dt.timedelta(hours=1)):
            lo, hi = t, t + hop  # the change is in (lo, hi]
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if in_zone(mid, tz).utcoffset() == before:
                    lo = mid
                else:
                    hi = mid
            length = int((before - after_hop).total_seconds() * 1000)
            c = max(hi, (after_ms // step + 1) * step)
            c = -(-c // step) * step
            while c < min(hi + length, got_ms):
                if _second_occurrence(c, tz) and croniter.match(expr, in_zone(c, tz), second_at_beginning=_six(expr)):
                    return c
                c += step
        t += hop
    return None


def outcome(mod, expr: str, zone: str, after_ms: int) -> int | str:
    try:
        return mod.parse(expr, zone).next_after(after_ms)
    except CronError as exc:
        assert "never fires" in str(exc), str(exc)
        return NEVER


# ---- random expressions from the field grammar ---------------------------------------

MONTHS = [
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def _any_case(names: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(names).flatmap(
        lambda n: st.sampled_from([n, n.upper(), n.capitalize()])
    )


def _items(lo: int, hi: int, names: list[str] | None = None) -> st.SearchStrategy[str]:
    value = st.integers(lo, hi).map(str)
    if names:
        value = st.one_of(value, _any_case(names))
    step = st.integers(1, max(hi, 12))
    return st.one_of(
        st.just("*"),
        step.map(lambda k: f"*/{k}"),
        value,
        st.tuples(value, value).map(lambda t: f"{t[0]}-{t[1]}"),
        st.tuples(value, value, st.integers(1, 12)).map(
            lambda t: f"{t[0]}-{t[1]}/{t[2]}"
        ),
        st.tuples(value, st.integers(1, 20)).map(lambda t: f"{t[0]}/{t[1]}"),
    )


def _field(
    lo: int, hi: int, names: list[str] | None = None, extra=None
) -> st.SearchStrategy[str]:
    item = _items(lo, hi, names)
    if extra is not None:
        item = st.one_of(item, extra)
    return st.one_of(st.just("*"), st.lists(item, min_size=1, max_size=3).map(",".join))


_DOM_EXTRA = st.one_of(
    st.sampled_from(["L", "l", "?"]),
    st.integers(1, 31).map(lambda d: f"{d}W"),
    st.integers(1, 31).map(lambda d: f"W{d}"),
)
_DOW_EXTRA = st.one_of(
    st.sampled_from(["?"]),
    st.tuples(_any_case(WEEKDAYS), st.integers(1, 5)).map(lambda t: f"{t[0]}#{t[1]}"),
    st.tuples(st.integers(0, 7), st.integers(1, 5)).map(lambda t: f"{t[0]}#{t[1]}"),
    st.integers(0, 7).map(lambda d: f"L{d}"),
)

expressions = st.builds(
    lambda sec, minute, hour, dom, month, dow, six: " ".join(
        ([sec] if six else []) + [minute, hour, dom, month, dow]
    ),
    sec=_field(0, 59),
    minute=_field(0, 59),
    # often hours near the clock changes (01:00-03:59 in these zones), so that they
    # matter
    hour=st.one_of(_field(0, 23), _field(0, 4), st.just("*")),
    dom=st.one_of(st.just("*"), _field(1, 31, extra=_DOM_EXTRA)),
    month=st.one_of(st.just("*"), _field(1, 12, MONTHS)),
    dow=st.one_of(st.just("*"), _field(0, 7, WEEKDAYS, extra=_DOW_EXTRA)),
    six=st.booleans(),
)


@functools.cache
def _transitions(zone: str, year: int) -> tuple[int, ...]:
    """UTC ms of the zone's offset changes in a year (noon probes, then bisection)."""
    tz = ZoneInfo(zone)
    out = []
    prev = ms(utc(year, 1, 1, 12)) - 86_400_000
    for _ in range(367):
        t = prev + 86_400_000
        if in_zone(t, tz).utcoffset() != in_zone(prev, tz).utcoffset():
            lo, hi = prev, t
            while hi - lo > 1000:
                mid = (lo + hi) // 2 // 1000 * 1000
                if in_zone(mid, tz).utcoffset() == in_zone(lo, tz).utcoffset():
                    lo = mid
                else:
                    hi = mid
            out.append(hi)
        prev = t
    return tuple(out)


@st.composite
def zones_and_instants(draw) -> tuple[str, int]:
    zone = draw(st.sampled_from(ZONES))
    if zone in ("UTC", "Asia/Kolkata") or draw(st.integers(0, 3)) == 0:
        return zone, draw(st.integers(ms(utc(2000, 1, 1)), ms(utc(2040, 1, 1))))
    changes = _transitions(zone, draw(st.integers(2000, 2039)))
    base = draw(st.sampled_from(changes))
    return zone, base + draw(
        st.one_of(
            st.integers(-3 * 3_600_000, 3 * 3_600_000), st.integers(-5_000, 5_000)
        )
    )


# ---- the property tests --------------------------------------------------------------


@settings(
    max_examples=EXAMPLES or 300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(expr=expressions, where=zones_and_instants())
def test_both_implementations_match_croniter(expr: str, where: tuple[str, int]) -> None:
    """Three fires in a row from a random start (often near a clock change): the
    compiled and the pure-Python evaluators agree exactly, and with croniter but for the
    documented fall-back rule. An expression croniter refuses, both refuse."""
    zone, t = where
    compiled, twin = _load("cython"), _load("python")
    if not croniter.is_valid(expr, second_at_beginning=_six(expr)):
        for mod in (compiled, twin):
            with pytest.raises(CronError, match="bad cron expression"):
                mod.parse(expr, zone)
        return
    for _ in range(3):
        want = expected(expr, zone, t)
        got = outcome(compiled, expr, zone, t)
        assert outcome(twin, expr, zone, t) == got
        assert got == want, (expr, zone, t, in_zone(t, ZoneInfo(zone)))
        if got == NEVER:
            return
        assert type(got) is int and got > t and got % 1000 == 0
        t = got


DST_ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
]
# time-of-day fields around the changes (local 01:30-03:45 in these zones)
dst_expressions = st.builds(
    lambda sec, minute, hour, days, six: " ".join(
        ([sec] if six else []) + [minute, hour, days]
    ),
    sec=st.sampled_from(["0", "*", "*/15", "30", "59", "0,20"]),
    minute=st.sampled_from(
        ["*", "0", "30", "*/20", "15,45", "0-59/7", "44,45,46", "59", "*/30", "10-20"]
    ),
    hour=st.sampled_from(
        ["*", "1", "2", "3", "1-3", "*/2", "0-4", "2,3", "1,2", "0-23"]
    ),
    days=st.sampled_from(
        [
            "* * *",
            "* * *",
            "* * *",
            "* * sun",
            "1-15 * *",
            "* 3,4,9,10,11 *",
            "L * *",
            "* * l0",
        ]
    ),
    six=st.booleans(),
)


@st.composite
def near_a_change(draw) -> tuple[str, int]:
    zone = draw(st.sampled_from(DST_ZONES))
    base = draw(st.sampled_from(_transitions(zone, draw(st.integers(2000, 2039)))))
    return zone, base + draw(st.integers(-3 * 3_600_000, 2 * 3_600_000))


@settings(
    max_examples=EXAMPLES or 200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(expr=dst_expressions, where=near_a_change())
def test_around_clock_changes_match_croniter(expr: str, where: tuple[str, int]) -> None:
    """Six fires in a row from just before (or in) a clock change, through it."""
    zone, t = where
    compiled, twin = _load("cython"), _load("python")
    for _ in range(6):
        want = expected(expr, zone, t)
        got = outcome(compiled, expr, zone, t)
        assert outcome(twin, expr, zone, t) == got
        assert got == want, (expr, zone, t, in_zone(t, ZoneInfo(zone)))
        t = got


@settings(max_examples=EXAMPLES or 500, deadline=None)
@given(
    expr=expressions,
    zone=st.sampled_from(
        ZONES
        + ["Europe/Dublin", "America/Sao_Paulo", "Pacific/Apia", "Africa/Casablanca"]
    ),
    t=st.integers(_cron_py.MIN_MS, _cron_py.MAX_MS - 1),
)
def test_compiled_and_twin_agree_over_the_whole_range(
    expr: str, zone: str, t: int
) -> None:
    """Without croniter (fast): same result or same error, 1900-2199, more zones."""
    results = []
    for mod in (_load("cython"), _load("python")):
        try:
            results.append(mod.parse(expr, zone).next_after(t))
        except CronError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


_SOUP = st.lists(
    st.sampled_from(
        [
            "*",
            "?",
            "L",
            "W",
            "#",
            "/",
            "-",
            ",",
            "0",
            "1",
            "5",
            "7",
            "12",
            "23",
            "24",
            "31",
            "32",
            "59",
            "60",
            "mon",
            "FRI",
            "sun",
            "jan",
            "dec",
            "lw",
            "5l",
            "l5",
            "mon#2",
            "1#6",
            "*/0",
            "00",
            "-1",
            "3-1",
            "w5",
            "0w",
        ]
    ),
    min_size=1,
    max_size=3,
).map("".join)


@settings(max_examples=EXAMPLES or 400, deadline=None)
@given(fields=st.lists(_SOUP, min_size=5, max_size=6))
def test_accepts_exactly_what_croniter_accepts(fields: list[str]) -> None:
    """Token soup: parsed iff croniter.is_valid (no H, R, @alias: refused by design)."""
    expr = " ".join(fields)
    valid = croniter.is_valid(expr, second_at_beginning=_six(expr))
    for name in IMPLS:
        try:
            _load(name).parse(expr, "UTC")
        except CronError as exc:
            assert not valid, (expr, str(exc))
            assert "\n" not in str(exc) and repr(expr) in str(exc)
        else:
            assert valid, expr


# ---- syntax --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "after", "want"),
    [
        # L: the last day of the month
        (
            "0 0 L * *",
            utc(2024, 1, 15),
            [utc(2024, 1, 31), utc(2024, 2, 29), utc(2024, 3, 31), utc(2024, 4, 30)],
        ),
        (
            "0 0 20-L/5 * *",
            utc(2023, 2, 1),
            [utc(2023, 2, 20), utc(2023, 2, 25), utc(2023, 3, 20)],
        ),
        (
            "0 0 1,L * *",
            utc(2023, 2, 10),
            [utc(2023, 2, 28), utc(2023, 3, 1), utc(2023, 3, 31)],
        ),
        # '#': the nth weekday of the month
        (
            "0 0 * * mon#2",
            utc(2024, 1, 1),
            [utc(2024, 1, 8), utc(2024, 2, 12), utc(2024, 3, 11)],
        ),
        (
            "0 0 * * 5#5",
            utc(2024, 1, 1),
            [utc(2024, 3, 29), utc(2024, 5, 31), utc(2024, 8, 30)],
        ),
        (
            "0 0 * * mon-fri#1",
            utc(2024, 1, 31),
            [utc(2024, 2, 1), utc(2024, 2, 2), utc(2024, 2, 5), utc(2024, 2, 6)],
        ),
        # L<weekday>: the last such weekday (croniter's form: L before the day)
        (
            "0 0 * * L5",
            utc(2024, 1, 1),
            [utc(2024, 1, 26), utc(2024, 2, 23), utc(2024, 3, 29)],
        ),
        (
            "0 0 * * l0,sun#1",
            utc(2024, 3, 1),
            [utc(2024, 3, 3), utc(2024, 3, 31), utc(2024, 4, 7), utc(2024, 4, 28)],
        ),
        # W: the weekday nearest the day, within the month
        (
            "0 0 15W * *",
            utc(2024, 6, 1),
            [utc(2024, 6, 14), utc(2024, 7, 15), utc(2024, 8, 15), utc(2024, 9, 16)],
        ),
        (
            "0 0 1W * *",
            utc(2024, 5, 2),
            [utc(2024, 6, 3), utc(2024, 7, 1)],
        ),  # June 1 is a Saturday: Monday 3rd
        (
            "0 0 W31 * *",
            utc(2024, 2, 1),
            [utc(2024, 2, 29), utc(2024, 3, 29), utc(2024, 4, 30)],
        ),  # Mar 31: Sunday
        # names, any case; 7 and 0 are Sunday
        ("0 0 * JAN-Mar Mon", utc(2024, 3, 20), [utc(2024, 3, 25), utc(2025, 1, 6)]),
        ("0 0 * * 7", utc(2024, 1, 1), [utc(2024, 1, 7), utc(2024, 1, 14)]),
        ("0 0 * * 0", utc(2024, 1, 1), [utc(2024, 1, 7), utc(2024, 1, 14)]),
        ("0 0 * * SUN", utc(2024, 1, 1), [utc(2024, 1, 7), utc(2024, 1, 14)]),
        (
            "0 0 * * fri-mon",
            utc(2024, 1, 3),
            [utc(2024, 1, 5), utc(2024, 1, 6), utc(2024, 1, 7), utc(2024, 1, 8)],
        ),
        (
            "0 0 * * 5-7",
            utc(2024, 1, 3),
            [utc(2024, 1, 5), utc(2024, 1, 6), utc(2024, 1, 7), utc(2024, 1, 12)],
        ),
        # steps, start/step, ranges that wrap
        (
            "5/20 * * * *",
            utc(2024, 1, 1),
            [utc(2024, 1, 1, 0, 5), utc(2024, 1, 1, 0, 25), utc(2024, 1, 1, 0, 45)],
        ),
        (
            "0 22-1 * * *",
            utc(2024, 1, 1, 2),
            [utc(2024, 1, 1, 22), utc(2024, 1, 1, 23), utc(2024, 1, 2, 0)],
        ),
        (
            "*/20 */12 * * * *",
            utc(2024, 1, 1),
            [
                utc(2024, 1, 1, 0, 0, 20),
                utc(2024, 1, 1, 0, 0, 40),
                utc(2024, 1, 1, 0, 12),
            ],
        ),
        # croniter's quirk, kept: an equal range is the whole field
        (
            "5-5 * * * *",
            utc(2024, 1, 1),
            [utc(2024, 1, 1, 0, 1), utc(2024, 1, 1, 0, 2)],
        ),
        # day of month OR day of week when both are restricted; AND when one is '*' or
        # '?'
        (
            "0 0 13 * fri",
            utc(2024, 9, 1),
            [utc(2024, 9, 6), utc(2024, 9, 13), utc(2024, 9, 20)],
        ),
        (
            "0 0 ? * fri",
            utc(2024, 9, 1),
            [utc(2024, 9, 6), utc(2024, 9, 13), utc(2024, 9, 20)],
        ),
        (
            "0 0 30 2 mon",
            utc(2024, 1, 1),
            [utc(2024, 2, 5), utc(2024, 2, 12)],
        ),  # the 30th side never matches
        (
            "0 0 1-31 * */2",
            utc(2024, 1, 1),
            [utc(2024, 1, 2), utc(2024, 1, 4)],
        ),  # a full list with '*' is '*'
        # '#'/'W' with the other day field restricted: croniter fires on the '#'/'W'
        # days
        ("0 0 1-7 * mon#1", utc(2024, 1, 1), [utc(2024, 2, 5), utc(2024, 3, 4)]),
        ("0 0 15W * mon-fri", utc(2024, 6, 1), [utc(2024, 6, 14), utc(2024, 7, 15)]),
    ],
)
def test_syntax_examples(
    impl, expr: str, after: dt.datetime, want: list[dt.datetime]
) -> None:
    got = fires(impl, expr, "UTC", after, len(want))
    assert got == [ms(w) for w in want]
    assert got == fires(
        croniter_model, expr, "UTC", after, len(want)
    )  # as croniter has it


class croniter_model:
    """croniter behind the same API, for the examples (a new object per call)."""

    class _C:
        def __init__(self, expr: str, zone: str) -> None:
            self.expr, self.zone = expr, zone

        def next_after(self, after_ms: int) -> int:
            return croniter_next(self.expr, self.zone, after_ms)

    @staticmethod
    def parse(expr: str, zone: str):
        return croniter_model._C(expr, zone)


def test_six_fields_are_seconds_first_and_five_fields_fire_at_second_zero(impl) -> None:
    start = ms(utc(2024, 5, 1, 8, 0, 0))
    assert impl.parse("* * * * * *", "UTC").next_after(start) == start + 1000
    assert impl.parse("* * * * *", "UTC").next_after(start) == start + 60_000
    assert impl.parse("30 15 10 * * *", "UTC").next_after(start) == ms(
        utc(2024, 5, 1, 10, 15, 30)
    )
    # strictly after, in milliseconds
    c = impl.parse("*/5 * * * * *", "UTC")
    assert c.next_after(ms(utc(2024, 3, 10, 12, 0, 4, 999_000))) == ms(
        utc(2024, 3, 10, 12, 0, 5)
    )
    assert c.next_after(ms(utc(2024, 3, 10, 12, 0, 5))) == ms(
        utc(2024, 3, 10, 12, 0, 10)
    )
    assert c.next_after(ms(utc(2024, 3, 10, 12, 0, 5)) + 1) == ms(
        utc(2024, 3, 10, 12, 0, 10)
    )
    got = c.next_after(ms(utc(1969, 12, 31, 23, 59, 58)))  # before the epoch too
    assert type(got) is int and got == 0


@pytest.mark.parametrize(
    ("expr", "zone", "after", "want"),
    [
        ("0 9 * * *", "Asia/Kolkata", utc(2024, 3, 10, 0, 0), utc(2024, 3, 10, 3, 30)),
        ("0 9 * * *", "", utc(2024, 3, 10, 0, 0), utc(2024, 3, 10, 9, 0)),  # "" is UTC
        (
            "0 9 * * *",
            "Etc/GMT+5",
            utc(2024, 3, 10, 0, 0),
            utc(2024, 3, 10, 14, 0),
        ),  # UTC-5
        (
            "0 0 * * sat",
            "Europe/Berlin",
            utc(2024, 3, 8, 12, 0),
            utc(2024, 3, 8, 23, 0),
        ),  # the zone's weekday
        (
            "0 0 1 * *",
            "Pacific/Chatham",
            utc(2024, 1, 15),
            utc(2024, 1, 31, 10, 15),
        ),  # +13:45 in January
    ],
)
def test_time_zones(
    impl, expr: str, zone: str, after: dt.datetime, want: dt.datetime
) -> None:
    assert impl.parse(expr, zone).next_after(ms(after)) == ms(want)
    assert croniter_next(expr, zone, ms(after)) == ms(want)


# ---- daylight saving time ------------------------------------------------------------


def test_spring_forward_a_skipped_fixed_time_fires_when_the_clock_reaches_it(
    impl,
) -> None:
    """New York 2024-03-10, 02:00 EST -> 03:00 EDT: 02:30 fires at 03:00 EDT.

    As croniter does."""
    assert fires(
        impl, "30 2 * * *", "America/New_York", local(NEW_YORK, 2024, 3, 9, 12), 3
    ) == [
        ms(local(NEW_YORK, 2024, 3, 10, 3, 0)),
        ms(local(NEW_YORK, 2024, 3, 11, 2, 30)),
        ms(local(NEW_YORK, 2024, 3, 12, 2, 30)),
    ]
    # moved forward in whole minutes: the seconds stay
    assert fires(
        impl, "15 30 2 * * *", "America/New_York", local(NEW_YORK, 2024, 3, 10, 1), 1
    ) == [ms(local(NEW_YORK, 2024, 3, 10, 3, 0, 15))]
    # several fires in the gap are one
    assert fires(
        impl, "*/20 2 * * *", "America/New_York", local(NEW_YORK, 2024, 3, 10, 1), 2
    ) == [
        ms(local(NEW_YORK, 2024, 3, 10, 3, 0)),
        ms(local(NEW_YORK, 2024, 3, 11, 2, 0)),
    ]
    assert fires(
        impl, "17 */2 * * *", "America/New_York", local(NEW_YORK, 2024, 3, 10, 1), 1
    ) == [ms(utc(2024, 3, 10, 7))]
    # Berlin, 2024-03-31 02:00 CET -> 03:00 CEST
    assert fires(
        impl, "30 2 * * *", "Europe/Berlin", local(BERLIN, 2024, 3, 30, 12), 2
    ) == [
        ms(utc(2024, 3, 31, 1, 0)),
        ms(utc(2024, 4, 1, 0, 30)),
    ]
    # Lord Howe, 2024-10-06 02:00 -> 02:30 (a 30-minute change); Chatham 2024-09-29
    # 02:45 -> 03:45
    assert fires(
        impl, "15 2 * * *", "Australia/Lord_Howe", local(LORD_HOWE, 2024, 10, 5, 12), 1
    ) == [ms(local(LORD_HOWE, 2024, 10, 6, 2, 30))]
    assert fires(
        impl, "0 3 * * *", "Pacific/Chatham", local(CHATHAM, 2024, 9, 28, 12), 2
    ) == [
        ms(local(CHATHAM, 2024, 9, 29, 3, 45)),
        ms(local(CHATHAM, 2024, 9, 30, 3, 0)),
    ]


def test_spring_forward_an_every_hour_cron_loses_the_skipped_times(impl) -> None:
    assert fires(
        impl, "0 * * * *", "America/New_York", local(NEW_YORK, 2024, 3, 10, 0, 30), 3
    ) == [
        ms(utc(2024, 3, 10, 6, 0)),  # 01:00 EST
        ms(utc(2024, 3, 10, 7, 0)),  # 03:00 EDT (02:00 never happens)
        ms(utc(2024, 3, 10, 8, 0)),
    ]
    assert fires(
        impl, "30 * * * *", "America/New_York", local(NEW_YORK, 2024, 3, 10, 1, 45), 1
    ) == [ms(local(NEW_YORK, 2024, 3, 10, 3, 30))]


def test_fall_back_a_fixed_hour_cron_fires_once_at_the_first_occurrence(impl) -> None:
    """New York 2024-11-03, 02:00 EDT -> 01:00 EST: 01:30 happens twice. FastJob fires
    it once, at 01:30 EDT; croniter fires at both (the documented difference)."""
    first = ms(local(NEW_YORK, 2024, 11, 3, 1, 30, fold=0))
    second = ms(local(NEW_YORK, 2024, 11, 3, 1, 30, fold=1))
    next_day = ms(local(NEW_YORK, 2024, 11, 4, 1, 30))
    assert (first, second) == (ms(utc(2024, 11, 3, 5, 30)), ms(utc(2024, 11, 3, 6, 30)))
    assert fires(
        impl, "30 1 * * *", "America/New_York", local(NEW_YORK, 2024, 11, 2, 12), 2
    ) == [first, next_day]
    assert (
        croniter_next("30 1 * * *", "America/New_York", first) == second
    )  # croniter: twice
    # from inside the repeated hour, either pass: the next day
    for after in (
        utc(2024, 11, 3, 5, 45),
        utc(2024, 11, 3, 6, 10),
        utc(2024, 11, 3, 6, 45),
    ):
        assert (
            impl.parse("30 1 * * *", "America/New_York").next_after(ms(after))
            == next_day
        )
    # every 30 minutes of hour 1: 01:00 and 01:30 EDT, not again in EST
    assert fires(
        impl, "*/30 1 * * *", "America/New_York", local(NEW_YORK, 2024, 11, 3, 0, 45), 3
    ) == [
        ms(utc(2024, 11, 3, 5, 0)),
        ms(utc(2024, 11, 3, 5, 30)),
        ms(local(NEW_YORK, 2024, 11, 4, 1, 0)),
    ]
    # Berlin 2024-10-27 (03:00 CEST -> 02:00 CET): 02:30 once; Lord Howe 2024-04-07
    # (02:00 -> 01:30): 01:45 once
    assert fires(
        impl, "30 2 * * *", "Europe/Berlin", local(BERLIN, 2024, 10, 26, 12), 2
    ) == [
        ms(utc(2024, 10, 27, 0, 30)),
        ms(utc(2024, 10, 28, 1, 30)),
    ]
    assert fires(
        impl, "45 1 * * *", "Australia/Lord_Howe", local(LORD_HOWE, 2024, 4, 6, 12), 2
    ) == [
        ms(local(LORD_HOWE, 2024, 4, 7, 1, 45, fold=0)),
        ms(local(LORD_HOWE, 2024, 4, 8, 1, 45)),
    ]


def test_fall_back_an_every_hour_cron_fires_in_both_passes(impl) -> None:
    """With '*' hours, each real instant whose wall time matches fires (as croniter)."""
    assert fires(
        impl, "0 * * * *", "America/New_York", local(NEW_YORK, 2024, 11, 3, 0, 30), 3
    ) == [
        ms(utc(2024, 11, 3, 5, 0)),
        ms(utc(2024, 11, 3, 6, 0)),
        ms(utc(2024, 11, 3, 7, 0)),
    ]
    got = fires(impl, "*/15 * * * *", "America/New_York", utc(2024, 11, 3, 4, 50), 12)
    assert got == [ms(utc(2024, 11, 3, 5, 0)) + k * 15 * 60_000 for k in range(12)]
    assert got == fires(
        croniter_model, "*/15 * * * *", "America/New_York", utc(2024, 11, 3, 4, 50), 12
    )


# ---- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "0 0 30 2 *",
        "0 0 31 4,6,9,11 *",
        "0 0 8 * mon#1",
        "0 0 31W 2 0",
        "0 0 0 30 2 *",
        "0 0 30 2 ?",
    ],
)
def test_never_firing_crons_raise(impl, expr: str) -> None:
    c = impl.parse(
        expr, "Europe/Berlin"
    )  # it parses (croniter.is_valid says yes too) ...
    with pytest.raises(CronError, match="never fires"):  # ... and never fires
        c.next_after(ms(utc(2024, 1, 1)))
    with pytest.raises(CroniterBadDateError):
        croniter_next(expr, "Europe/Berlin", ms(utc(2024, 1, 1)))


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "want 5 fields"),
        ("* * * *", "want 5 fields"),
        ("* * * * * * *", "want 5 fields"),  # croniter's year field: not a FastJob cron
        ("@hourly", "want 5 fields"),
        ("61 * * * *", "out of range 0-59"),
        ("* 24 * * *", "hour field '24': value 24 is out of range 0-23"),
        ("* * 32 * *", "out of range 1-31"),
        ("* * 0 * *", "out of range 1-31"),
        ("* * * 13 *", "out of range 1-12"),
        ("* * * * 8", "out of range 0-6"),
        ("60 * * * * *", "second field '60'"),
        ("0 60 * * * *", "minute field '60'"),
        ("*/0 * * * *", "step of 0"),
        ("a b c d e", "not a number or a known name"),
        ("* * * jan-mon *", "'mon' is not allowed in the month field"),
        ("* * * * -1", "negative"),
        ("H * * * *", "(H, R) are not supported"),
        ("R * * * *", "(H, R) are not supported"),
        ("0 0 * * 5L", "write the last weekday as L<weekday>, e.g. 'L5'"),
        ("0 0 LW * *", "'LW'"),
        ("0 0 1,15W * *", "'W' must stand alone"),
        ("0 0 32W * *", "out of range 1-31"),
        ("0 0 * * mon#6", "must be 1-5"),
        ("0 0 * * mon,tue#2", "cannot be mixed"),
        ("? * * * *", "'?' is only allowed"),
        ("0 0 ?5 * *", "'?' must stand alone"),
    ],
)
def test_bad_expressions_raise_a_clear_one_line_error(
    impl, expr: str, message: str
) -> None:
    with pytest.raises(CronError) as info:
        impl.parse(expr, "UTC")
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message in text and repr(expr) in text and "\n" not in text
    accepted = croniter.is_valid(expr, second_at_beginning=_six(expr)) and len(
        expr.split()
    ) in (5, 6)
    assert not accepted or expr.startswith(
        ("H", "R")
    )  # we refuse only what croniter refuses, or H/R


@pytest.mark.parametrize(
    "zone",
    [
        "Mars/Olympus",
        "Europe/Berlin ",
        "utc",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe",
    ],
)
def test_bad_time_zone_raises(impl, zone: str) -> None:
    with pytest.raises(CronError, match="unknown timezone"):
        impl.parse("* * * * *", zone)


def test_after_ms_must_be_an_int_in_range(impl) -> None:
    c = impl.parse("* * * * *", "UTC")
    with pytest.raises(TypeError):
        c.next_after(1.5e12)
    for bad in (_cron_py.MIN_MS - 1, _cron_py.MAX_MS, 2**70, -(2**70)):
        with pytest.raises(CronError, match="supported range"):
            c.next_after(bad)
    with pytest.raises(CronError, match="before 2200"):
        impl.parse("0 0 29 2 *", "Europe/Berlin").next_after(ms(utc(2196, 3, 1)))


# ---- the cache, the implementations --------------------------------------------------


def test_parsed_forms_are_cached_by_expression_and_zone(impl) -> None:
    impl.parse.cache_clear()
    a = impl.parse("*/5 * * * * *", "Europe/Berlin")
    assert impl.parse("*/5 * * * * *", "Europe/Berlin") is a
    assert impl.parse("*/5 * * * * *", "UTC") is not a
    assert impl.parse("*/10 * * * * *", "Europe/Berlin") is not a
    info = impl.parse.cache_info()
    assert (info.hits, info.misses) == (1, 3)
    assert info.maxsize is not None  # bounded
    assert (a.expr, a.timezone) == ("*/5 * * * * *", "Europe/Berlin")
    assert repr(a) == "Cron('*/5 * * * * *', 'Europe/Berlin')"


def test_one_error_class_for_both() -> None:
    from fastjob import _cron

    assert _cron.CronError is _cron_py.CronError is cron.CronError
    assert issubclass(CronError, ValueError)


def test_the_default_is_the_compiled_evaluator() -> None:
    if os.environ.get("FASTJOB_PUREPYTHON", "") not in ("", "0"):
        assert not cron.USING_CYTHON and cron.parse is _cron_py.parse
    else:
        assert cron.USING_CYTHON and cron.parse is _load("cython").parse


@pytest.mark.parametrize(
    "env, want", [("1", "False _cron_py"), ("", "True _cron"), ("0", "True _cron")]
)
def test_implementation_is_selected_at_import(env: str, want: str) -> None:
    code = (
        "import fastjob.cron as c; "
        "print(c.USING_CYTHON, "
        "type(c.parse('* * * * *', 'UTC')).__module__.split('.')[-1])"
    )
    environ = dict(os.environ, FASTJOB_PUREPYTHON=env)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == want


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_a_star_hour_fires_in_a_half_hour_repeat(impl: str) -> None:
    """Lord Howe goes back 30 minutes (2000-03-26 02:00 LHDT -> 01:30 LHST): with the hour field '*',
    the repeated 01:40 fires again (croniter skips it; found by the property test)."""
    zone = ZoneInfo("Australia/Lord_Howe")
    first = local(zone, 2000, 3, 26, 1, 40, fold=0)
    nxt = _load(impl).parse("*/20 * * * sun", "Australia/Lord_Howe").next_after(ms(first))
    assert nxt == ms(local(zone, 2000, 3, 26, 1, 40, fold=1)) == ms(first) + 30 * 60_000
