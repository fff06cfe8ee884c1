"""Unit tests of fastjob.schedule (everything except ``make_next_fire``).

Every expected instant is written by hand as a wall-clock time in a zone (``zoneinfo``) or in
UTC and converted to epoch milliseconds here, independently of the code under test.
"""
from __future__ import annotations

import datetime as dt
import sys
import types
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastjob import schedule
from fastjob.models import JobSpec, ScheduleType
from fastjob.schedule import (
    ScheduleError,
    cron_after,
    first_fire_ms,
    now_ms,
    parse_at,
    parse_period,
    period_seconds,
    retry_delay,
    validate,
)

pytestmark = pytest.mark.rules  # pytest -m rules: the scheduler's rules, no process, no service

UTC = dt.timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
MINUTE_MS = 60_000
DAY_MS = 86_400_000

try:
    import tzdata  # noqa: F401

    HAVE_TZDATA = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TZDATA = False


def ms(when: dt.datetime) -> int:
    """Exact epoch milliseconds of an aware datetime (integer arithmetic, no float rounding)."""
    assert when.tzinfo is not None
    return (when - EPOCH) // dt.timedelta(milliseconds=1)


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def local(zone: ZoneInfo, *args: int, fold: int = 0) -> dt.datetime:
    return dt.datetime(*args, tzinfo=zone, fold=fold)


def in_zone(epoch_ms: int, zone: ZoneInfo) -> dt.datetime:
    return (EPOCH + dt.timedelta(milliseconds=epoch_ms)).astimezone(zone)


def job(kind: ScheduleType | str, expr: str = "", **fields: Any) -> JobSpec:
    return JobSpec(app="app", name="job", handler="pkg.mod:handler", schedule_type=kind, schedule_expr=expr, **fields)


# ---- cron_after: basics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        # 5 fields: minute precision
        ("*/15 * * * *", utc(2024, 3, 10, 12, 7, 30, 250_000), utc(2024, 3, 10, 12, 15)),
        ("*/15 * * * *", utc(2024, 3, 10, 12, 14, 59, 999_000), utc(2024, 3, 10, 12, 15)),
        ("*/15 * * * *", utc(2024, 3, 10, 12, 15), utc(2024, 3, 10, 12, 30)),  # strictly after
        ("*/15 * * * *", utc(2024, 3, 10, 12, 15, 0, 1_000), utc(2024, 3, 10, 12, 30)),
        ("*/15 * * * *", utc(2024, 12, 31, 23, 50), utc(2025, 1, 1, 0, 0)),
        ("0 9 * * mon-fri", utc(2024, 3, 8, 12, 0), utc(2024, 3, 11, 9, 0)),  # Friday -> Monday
        ("0 0 29 2 *", utc(2024, 3, 1), utc(2028, 2, 29)),  # next leap day
        ("5 4 * * sun", utc(2024, 3, 10, 4, 5), utc(2024, 3, 17, 4, 5)),
        # 6 fields: seconds first
        ("*/5 * * * * *", utc(2024, 3, 10, 12, 0, 3, 500_000), utc(2024, 3, 10, 12, 0, 5)),
        ("*/5 * * * * *", utc(2024, 3, 10, 12, 0, 5), utc(2024, 3, 10, 12, 0, 10)),  # strictly after
        ("*/5 * * * * *", utc(2024, 3, 10, 12, 0, 4, 999_000), utc(2024, 3, 10, 12, 0, 5)),
        ("*/5 * * * * *", utc(2024, 3, 10, 12, 0, 59, 999_000), utc(2024, 3, 10, 12, 1, 0)),
        ("30 15 10 * * *", utc(2024, 3, 10, 9, 0), utc(2024, 3, 10, 10, 15, 30)),
        ("30 15 10 * * *", utc(2024, 3, 10, 10, 15, 30), utc(2024, 3, 11, 10, 15, 30)),
        ("0 0 9 * * mon-fri", utc(2024, 3, 8, 9, 0), utc(2024, 3, 11, 9, 0)),
        ("0 0 9 * * mon-fri", utc(2024, 3, 11, 8, 59, 59, 999_000), utc(2024, 3, 11, 9, 0)),
    ],
)
def test_cron_after_utc(expr: str, after: dt.datetime, expected: dt.datetime) -> None:
    got = cron_after(expr, "UTC", ms(after))
    assert type(got) is int
    assert got == ms(expected)


def test_cron_after_six_fields_fire_every_second_and_minute_fields_do_not() -> None:
    start = ms(utc(2024, 5, 1, 8, 0, 0))
    assert cron_after("* * * * * *", "UTC", start) == start + 1000
    assert cron_after("* * * * *", "UTC", start) == start + MINUTE_MS


@pytest.mark.parametrize(
    ("expr", "zone", "after", "expected"),
    [
        # winter (CET, +01:00) and summer (CEST, +02:00) in Berlin
        ("0 9 * * *", "Europe/Berlin", utc(2024, 1, 15, 0, 0), utc(2024, 1, 15, 8, 0)),
        ("0 9 * * *", "Europe/Berlin", utc(2024, 7, 15, 0, 0), utc(2024, 7, 15, 7, 0)),
        # 2024-06-30 20:00 EDT is 2024-07-01 00:00 UTC: the next 09:00 New York is July 1, 13:00 UTC
        ("0 9 * * *", "America/New_York", utc(2024, 7, 1, 0, 0), utc(2024, 7, 1, 13, 0)),
        ("0 9 * * *", "America/New_York", utc(2024, 1, 15, 14, 0, 0, 1_000), utc(2024, 1, 16, 14, 0)),
        # weekdays are the zone's weekdays: Friday 23:30 UTC is already Saturday in Berlin
        ("0 0 9 * * mon-fri", "Europe/Berlin", utc(2024, 3, 8, 7, 59, 59), utc(2024, 3, 8, 8, 0)),
        ("0 0 9 * * mon-fri", "Europe/Berlin", utc(2024, 3, 8, 8, 0), utc(2024, 3, 11, 8, 0)),
        ("0 0 * * sat", "Europe/Berlin", utc(2024, 3, 8, 12, 0), utc(2024, 3, 8, 23, 0)),
        # half-hour offset zone, no DST
        ("0 9 * * *", "Asia/Kolkata", utc(2024, 3, 10, 0, 0), utc(2024, 3, 10, 3, 30)),
        # an empty zone name means UTC
        ("0 9 * * *", "", utc(2024, 3, 10, 0, 0), utc(2024, 3, 10, 9, 0)),
    ],
)
def test_cron_after_in_a_timezone(expr: str, zone: str, after: dt.datetime, expected: dt.datetime) -> None:
    assert cron_after(expr, zone, ms(after)) == ms(expected)


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Europe/Berlin ", "utc", "../../etc/passwd", "/etc/localtime"])
def test_cron_after_bad_timezone_raises_schedule_error(zone: str) -> None:
    with pytest.raises(ScheduleError, match="timezone"):
        cron_after("* * * * *", zone, ms(utc(2024, 1, 1)))


def test_timezone_naming_a_tzdata_directory_raises_schedule_error() -> None:
    with pytest.raises(ScheduleError):
        cron_after("* * * * *", "Europe", ms(utc(2024, 1, 1)))


# ---- cron_after: daylight saving time -------------------------------------------------------


def _fires(expr: str, zone: str, after: dt.datetime, count: int) -> list[int]:
    out, t = [], ms(after)
    for _ in range(count):
        t = cron_after(expr, zone, t)
        out.append(t)
    return out


def test_spring_forward_new_york_fires_at_end_of_gap() -> None:
    """Spring forward, America/New_York, 2024-03-10: at 02:00 EST clocks jump to 03:00 EDT.

    A cron at 02:30 local names a wall time that does not exist that day. croniter neither skips
    the day nor moves the fire by the size of the gap (which would give 03:30): it fires once at
    the end of the gap, 03:00 EDT (07:00 UTC). The next day is back to 02:30 EDT.
    Any fire that falls in the gap lands there, even one whose minute is not 0 ("17 */2": 03:00,
    not 02:17 or 04:17); an hourly cron just loses the 02:00 fire.
    """
    assert _fires("30 2 * * *", "America/New_York", local(NEW_YORK, 2024, 3, 9, 12, 0), 3) == [
        ms(local(NEW_YORK, 2024, 3, 10, 3, 0)),
        ms(local(NEW_YORK, 2024, 3, 11, 2, 30)),
        ms(local(NEW_YORK, 2024, 3, 12, 2, 30)),
    ]
    assert ms(local(NEW_YORK, 2024, 3, 10, 3, 0)) == ms(utc(2024, 3, 10, 7, 0))
    assert ms(local(NEW_YORK, 2024, 3, 11, 2, 30)) == ms(utc(2024, 3, 11, 6, 30))
    assert cron_after("17 */2 * * *", "America/New_York", ms(local(NEW_YORK, 2024, 3, 10, 1, 0))) == ms(
        utc(2024, 3, 10, 7, 0)
    )
    assert _fires("0 * * * *", "America/New_York", local(NEW_YORK, 2024, 3, 10, 0, 30), 3) == [
        ms(utc(2024, 3, 10, 6, 0)),  # 01:00 EST
        ms(utc(2024, 3, 10, 7, 0)),  # 03:00 EDT (02:00 never happens)
        ms(utc(2024, 3, 10, 8, 0)),  # 04:00 EDT
    ]


def test_spring_forward_berlin_fires_at_end_of_gap() -> None:
    """Spring forward, Europe/Berlin, 2024-03-31: at 02:00 CET clocks jump to 03:00 CEST.

    As in New York, croniter fires the non-existent 02:30 once, at 03:00 CEST (01:00 UTC).
    """
    assert _fires("30 2 * * *", "Europe/Berlin", local(BERLIN, 2024, 3, 30, 12, 0), 3) == [
        ms(utc(2024, 3, 31, 1, 0)),  # 03:00 CEST
        ms(utc(2024, 4, 1, 0, 30)),  # 02:30 CEST
        ms(utc(2024, 4, 2, 0, 30)),
    ]
    assert ms(local(BERLIN, 2024, 3, 31, 3, 0)) == ms(utc(2024, 3, 31, 1, 0))


def test_fall_back_new_york_fires_once_at_the_repeated_time() -> None:
    """Fall back, America/New_York, 2024-11-03: at 02:00 EDT clocks go back to 01:00 EST.

    01:30 happens twice that day, 01:30 EDT (05:30 UTC) and 01:30 EST (06:30 UTC). A fixed-hour
    cron "30 1 * * *" fires ONCE, at the first (fastjob.cron's rule; croniter fires at both). An
    hourly cron (hour field "*") fires at every matching instant, the repeated hour included.
    """
    first = ms(local(NEW_YORK, 2024, 11, 3, 1, 30, fold=0))
    next_day = ms(local(NEW_YORK, 2024, 11, 4, 1, 30))
    assert (first, next_day) == (ms(utc(2024, 11, 3, 5, 30)), ms(utc(2024, 11, 4, 6, 30)))
    assert _fires("30 1 * * *", "America/New_York", local(NEW_YORK, 2024, 11, 2, 12, 0), 2) == [first, next_day]
    # after 01:45 EDT (first pass) and inside the repeated hour (01:10 EST): the next is tomorrow's
    assert cron_after("30 1 * * *", "America/New_York", ms(utc(2024, 11, 3, 5, 45))) == next_day
    assert cron_after("30 1 * * *", "America/New_York", ms(utc(2024, 11, 3, 6, 10))) == next_day
    # an hourly cron fires at 01:00 twice, then 02:00 EST
    assert _fires("0 * * * *", "America/New_York", local(NEW_YORK, 2024, 11, 3, 0, 30), 3) == [
        ms(utc(2024, 11, 3, 5, 0)),
        ms(utc(2024, 11, 3, 6, 0)),
        ms(utc(2024, 11, 3, 7, 0)),
    ]


def test_fall_back_berlin_fires_once_in_the_repeated_hour() -> None:
    """Fall back, Europe/Berlin, 2024-10-27: at 03:00 CEST clocks go back to 02:00 CET.

    The repeated hour is 02:00-03:00: "30 2 * * *" fires once, at the first 02:30 (00:30 UTC);
    "30 1 * * *" (01:30 happens once in Berlin) fires once that day too.
    """
    assert _fires("30 2 * * *", "Europe/Berlin", local(BERLIN, 2024, 10, 26, 12, 0), 2) == [
        ms(utc(2024, 10, 27, 0, 30)),
        ms(utc(2024, 10, 28, 1, 30)),
    ]
    assert _fires("30 1 * * *", "Europe/Berlin", local(BERLIN, 2024, 10, 26, 12, 0), 2) == [
        ms(utc(2024, 10, 26, 23, 30)),  # 01:30 CEST
        ms(utc(2024, 10, 28, 0, 30)),  # 01:30 CET
    ]


# ---- cron_after: properties -----------------------------------------------------------------

DST_ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "Pacific/Chatham"]
# DST transitions of those zones in 2024 (UTC), to sample instants near them on purpose
TRANSITIONS_MS = [
    ms(utc(2024, 3, 10, 7, 0)),  # New York spring forward
    ms(utc(2024, 11, 3, 6, 0)),  # New York fall back
    ms(utc(2024, 3, 31, 1, 0)),  # Berlin spring forward
    ms(utc(2024, 10, 27, 1, 0)),  # Berlin fall back
    ms(utc(2024, 4, 6, 15, 0)),  # Lord Howe fall back (30 minutes)
    ms(utc(2024, 10, 5, 15, 30)),  # Lord Howe spring forward (30 minutes)
    ms(utc(2024, 4, 6, 14, 0)),  # Chatham fall back
    ms(utc(2024, 9, 28, 14, 0)),  # Chatham spring forward
]
LO_MS, HI_MS = ms(utc(2000, 1, 1)), ms(utc(2040, 1, 1))
instants = st.one_of(
    st.integers(LO_MS, HI_MS),
    st.builds(lambda base, off: base + off, st.sampled_from(TRANSITIONS_MS),
              st.integers(-3 * 3_600_000, 3 * 3_600_000)),
)


@settings(max_examples=150, deadline=None)
@given(t=instants, zone=st.sampled_from(DST_ZONES))
def test_seconds_cron_is_the_next_matching_second(t: int, zone: str) -> None:
    """``*/7`` seconds: the result is > t, a whole second with second % 7 == 0, and no such second
    lies strictly between t and the result (all these zones' offsets are whole minutes, so the
    local second equals the UTC second)."""
    got = cron_after("*/7 * * * * *", zone, t)
    assert type(got) is int
    assert got > t
    assert got % 1000 == 0
    assert in_zone(got, ZoneInfo(zone)).second % 7 == 0
    assert got - t <= 7000
    first_whole = t // 1000 + 1
    for sec in range(first_whole, got // 1000):
        assert in_zone(sec * 1000, ZoneInfo(zone)).second % 7 != 0


@settings(max_examples=150, deadline=None)
@given(t=instants, zone=st.sampled_from(DST_ZONES))
def test_quarter_hour_cron_is_the_next_matching_minute(t: int, zone: str) -> None:
    """Every real instant has a wall time, even across DST jumps, so "*/15" never skips a
    quarter hour (offsets here are multiples of 15 minutes): the result is the first quarter-hour
    instant strictly after t."""
    got = cron_after("*/15 * * * *", zone, t)
    when = in_zone(got, ZoneInfo(zone))
    assert got > t
    assert (when.minute % 15, when.second, when.microsecond) == (0, 0, 0)
    assert got - t <= 15 * MINUTE_MS
    for minute in range(t // MINUTE_MS + 1, got // MINUTE_MS):
        assert in_zone(minute * MINUTE_MS, ZoneInfo(zone)).minute % 15 != 0


@settings(max_examples=100, deadline=None)
@given(t=instants, zone=st.sampled_from(["Europe/Berlin", "America/New_York"]))
def test_weekday_nine_oclock_six_field_cron(t: int, zone: str) -> None:
    """"0 0 9 * * mon-fri": 09:00 exists exactly once each day in these zones, so the expected
    result is the first weekday 09:00 wall time after t, built by hand from the local date."""
    tz = ZoneInfo(zone)
    day = in_zone(t, tz).date()
    while True:
        candidate = dt.datetime.combine(day, dt.time(9, 0), tzinfo=tz)
        if candidate.weekday() < 5 and ms(candidate) > t:
            break
        day += dt.timedelta(days=1)
    assert cron_after("0 0 9 * * mon-fri", zone, t) == ms(candidate)


@settings(max_examples=100, deadline=None)
@given(
    t=st.integers(LO_MS, HI_MS),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    zone=st.sampled_from(["UTC", "Asia/Tokyo", "Asia/Kolkata"]),
)
def test_daily_cron_in_zones_without_dst(t: int, hour: int, minute: int, zone: str) -> None:
    """A daily "M H * * *" cron in a zone without DST fires at H:M local, within a day after t,
    and its previous fire (a day earlier) is not after t."""
    got = cron_after(f"{minute} {hour} * * *", zone, t)
    when = in_zone(got, ZoneInfo(zone))
    assert (when.hour, when.minute, when.second, when.microsecond) == (hour, minute, 0, 0)
    assert t < got <= t + DAY_MS
    assert got - DAY_MS <= t


# ---- validate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        job(ScheduleType.CRON, "*/5 * * * *"),
        job(ScheduleType.CRON, "0 9 * * mon-fri", timezone="Europe/Berlin"),
        job(ScheduleType.CRON, "*/5 * * * * *"),
        job(ScheduleType.CRON, "0 0 9 * * mon-fri", timezone="America/New_York"),
        job(ScheduleType.CRON, "0 0 * * *", timezone=""),
        job(ScheduleType.FIXED_RATE, "10"),
        job(ScheduleType.FIXED_RATE, "0.5"),
        job(ScheduleType.FIXED_DELAY, "60"),
        job(ScheduleType.ONCE, ""),
        job(ScheduleType.ONCE, "1700000000"),
        job(ScheduleType.ONCE, "2030-01-01T00:00:00+01:00"),
        job(ScheduleType.API),
        job(ScheduleType.API, misfire_policy="fire_once"),
        job(ScheduleType.API, misfire_policy="skip"),
        job(ScheduleType.API, routing="round_robin"),
        job(ScheduleType.API, routing="random"),
        job(ScheduleType.API, routing="least_busy"),
        job(ScheduleType.API, retry_times=0, retry_backoff=0.0),
        job(ScheduleType.API, retry_times=5, retry_backoff=2.5),
        job(ScheduleType.API, timeout=None),
        job(ScheduleType.API, timeout=0.001),
        job(ScheduleType.API, timeout=3600),
    ],
    ids=repr,
)
def test_validate_accepts_good_jobs(spec: JobSpec) -> None:
    assert validate(spec) is None


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "* * * *",  # 4 fields
        "* * * * * * *",  # 7 fields
        "61 * * * *",
        "* 24 * * *",
        "* * 32 * *",
        "* * 0 * *",
        "* * * 13 *",
        "* * * * 8",
        "*/0 * * * *",
        "a b c d e",
        "60 * * * * *",  # seconds out of range
        "0 60 * * * *",  # minutes out of range in a 6-field cron
        "* * * * * 9",
    ],
)
def test_validate_rejects_bad_cron(expr: str) -> None:
    with pytest.raises(ScheduleError, match="cron"):
        validate(job(ScheduleType.CRON, expr))


@pytest.mark.parametrize("expr", ["0 0 30 2 *", "0 0 31 4 *"])
def test_validate_rejects_cron_that_never_fires(expr: str) -> None:
    with pytest.raises(ScheduleError):
        validate(job(ScheduleType.CRON, expr))


def test_validate_rejects_cron_with_bad_timezone() -> None:
    with pytest.raises(ScheduleError, match="timezone"):
        validate(job(ScheduleType.CRON, "* * * * *", timezone="Mars/Olympus"))


@pytest.mark.parametrize("kind", [ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY])
@pytest.mark.parametrize("expr", ["0", "0.0", "-1", "-0.5", "abc", "", "inf", "-inf", "nan", "1e400"])
def test_validate_rejects_bad_period(kind: ScheduleType, expr: str) -> None:
    with pytest.raises(ScheduleError, match="period"):
        validate(job(kind, expr))


@pytest.mark.parametrize(
    "expr", ["tomorrow", "2024-13-01T00:00:00", "2024-02-30", "2024-03-10T25:00", "12:00", "0x10"]
)
def test_validate_rejects_bad_one_shot_time(expr: str) -> None:
    with pytest.raises(ScheduleError, match="one-shot"):
        validate(job(ScheduleType.ONCE, expr))


@pytest.mark.parametrize("policy", ["sometimes", "", "FIRE_ONCE"])
def test_validate_rejects_bogus_misfire_policy(policy: str) -> None:
    with pytest.raises(ScheduleError, match="misfire_policy"):
        validate(job(ScheduleType.FIXED_RATE, "5", misfire_policy=policy))


@pytest.mark.parametrize("routing", ["fastest", "", "Random", "round-robin"])
def test_validate_rejects_bad_routing(routing: str) -> None:
    with pytest.raises(ScheduleError, match="routing"):
        validate(job(ScheduleType.FIXED_RATE, "5", routing=routing))


@pytest.mark.parametrize(("retry_times", "retry_backoff"), [(-1, 1.0), (0, -0.5), (-3, -1.0)])
def test_validate_rejects_negative_retries(retry_times: int, retry_backoff: float) -> None:
    with pytest.raises(ScheduleError, match="retry"):
        validate(job(ScheduleType.API, retry_times=retry_times, retry_backoff=retry_backoff))


@pytest.mark.parametrize("timeout", [0, 0.0, -1, -0.001, float("nan")])
def test_validate_rejects_non_positive_timeout(timeout: float) -> None:
    with pytest.raises(ScheduleError, match="timeout"):
        validate(job(ScheduleType.API, timeout=timeout))


def test_validate_rejects_unknown_schedule_type() -> None:
    # a plain ValueError from ScheduleType(...), not ScheduleError (api.py checks the type first)
    with pytest.raises(ValueError):
        validate(job("weekly", "5"))


# ---- parse_period, parse_at -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"), [("10", 10.0), ("0.25", 0.25), (" 3 ", 3.0), ("1e3", 1000.0), ("86400", 86400.0)]
)
def test_parse_period(expr: str, expected: float) -> None:
    got = parse_period(expr)
    assert type(got) is float
    assert got == expected


@pytest.mark.parametrize("expr", ["0", "-0", "-5", "abc", "", "10s", "inf", "Infinity", "-inf", "nan", "1e400", None])
def test_parse_period_rejects(expr: Any) -> None:
    with pytest.raises(ScheduleError):
        parse_period(expr)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1700000000", 1_700_000_000.0),
        ("1700000000.25", 1_700_000_000.25),
        ("0", 0.0),
        # ISO 8601 with an offset: 12:00 at +02:00 is 10:00 UTC
        ("2024-03-10T12:00:00+02:00", ms(utc(2024, 3, 10, 10, 0)) / 1000),
        ("2024-03-10T12:00:00-05:00", ms(utc(2024, 3, 10, 17, 0)) / 1000),
        ("2024-03-10T12:00:00+00:00", ms(utc(2024, 3, 10, 12, 0)) / 1000),
        ("2024-03-10T12:00:00.5+01:00", ms(utc(2024, 3, 10, 11, 0, 0, 500_000)) / 1000),
        # naive means UTC, whatever the machine's local zone
        ("2024-03-10T12:00:00", ms(utc(2024, 3, 10, 12, 0)) / 1000),
        ("2024-03-10 12:00", ms(utc(2024, 3, 10, 12, 0)) / 1000),
        ("2024-03-10", ms(utc(2024, 3, 10)) / 1000),
    ],
)
def test_parse_at(expr: str, expected: float) -> None:
    assert parse_at(expr) == expected


@pytest.mark.xfail(
    sys.version_info < (3, 11),
    strict=True,
    reason="datetime.fromisoformat accepts a 'Z' suffix only from Python 3.11 (project allows 3.10)",
)
def test_parse_at_accepts_z_suffix() -> None:
    assert parse_at("2024-03-10T12:00:00Z") == ms(utc(2024, 3, 10, 12, 0)) / 1000


@pytest.mark.parametrize(
    "expr", ["", "tomorrow", "2024-13-01", "2024-02-30T00:00:00", "2024-03-10T12:00:00+25:00", "0x10", None]
)
def test_parse_at_rejects_garbage(expr: Any) -> None:
    with pytest.raises(ScheduleError, match="one-shot"):
        parse_at(expr)


@pytest.mark.parametrize("expr", ["nan", "inf", "-inf", "1e400"])
def test_parse_at_rejects_non_finite_numbers(expr: str) -> None:
    with pytest.raises(ScheduleError):
        parse_at(expr)


# ---- first_fire_ms, period_seconds ----------------------------------------------------------

NOW = ms(utc(2024, 3, 10, 12, 7, 30, 250_000))


def test_first_fire_cron_is_next_cron_time_after_now() -> None:
    assert first_fire_ms(job(ScheduleType.CRON, "*/15 * * * *"), NOW) == ms(utc(2024, 3, 10, 12, 15))
    assert first_fire_ms(job(ScheduleType.CRON, "*/5 * * * * *"), NOW) == ms(utc(2024, 3, 10, 12, 7, 35))
    # 12:07 UTC is 08:07 EDT on 2024-03-10 (after the spring-forward): the next 09:00 EDT is 13:00 UTC
    spec = job(ScheduleType.CRON, "0 9 * * *", timezone="America/New_York")
    assert first_fire_ms(spec, NOW) == ms(utc(2024, 3, 10, 13, 0))
    # exactly on a fire time: the fire after it
    assert first_fire_ms(job(ScheduleType.CRON, "*/15 * * * *"), ms(utc(2024, 3, 10, 12, 15))) == ms(
        utc(2024, 3, 10, 12, 30)
    )


@pytest.mark.parametrize("kind", [ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY])
def test_first_fire_fixed_rate_and_delay_is_now(kind: ScheduleType) -> None:
    assert first_fire_ms(job(kind, "3600"), NOW) == NOW


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("1700000000.25", 1_700_000_000_250),
        ("1700000000", 1_700_000_000_000),
        ("2030-01-01T00:00:00+01:00", ms(utc(2029, 12, 31, 23, 0))),
        ("2030-01-01T00:00:00", ms(utc(2030, 1, 1))),
        ("2020-01-01T00:00:00.123", ms(utc(2020, 1, 1, 0, 0, 0, 123_000))),  # in the past: kept as is
    ],
)
def test_first_fire_once_with_time(expr: str, expected: int) -> None:
    got = first_fire_ms(job(ScheduleType.ONCE, expr), NOW)
    assert type(got) is int
    assert got == expected


def test_first_fire_once_without_time_is_now() -> None:
    assert first_fire_ms(job(ScheduleType.ONCE, ""), NOW) == NOW


def test_first_fire_api_is_none() -> None:
    assert first_fire_ms(job(ScheduleType.API), NOW) is None


def test_schedule_type_may_be_a_plain_string() -> None:
    assert first_fire_ms(job("fixed_rate", "5"), NOW) == NOW
    assert first_fire_ms(job("api"), NOW) is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (job(ScheduleType.FIXED_RATE, "2.5"), 2.5),
        (job(ScheduleType.FIXED_DELAY, "60"), 60.0),
        (job(ScheduleType.CRON, "* * * * *"), None),
        (job(ScheduleType.ONCE, "1700000000"), None),
        (job(ScheduleType.ONCE, ""), None),
        (job(ScheduleType.API), None),
    ],
    ids=repr,
)
def test_period_seconds(spec: JobSpec, expected: float | None) -> None:
    assert period_seconds(spec) == expected


@pytest.mark.parametrize("kind", [ScheduleType.FIXED_RATE, ScheduleType.FIXED_DELAY])
def test_period_seconds_rejects_bad_period(kind: ScheduleType) -> None:
    with pytest.raises(ScheduleError):
        period_seconds(job(kind, "0"))


# ---- retry_delay, now_ms --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "attempt", "expected"),
    [
        (1.5, 0, 1.5),
        (1.5, 1, 1.5),
        (1.5, 2, 3.0),
        (1.5, 3, 6.0),
        (1.5, 8, 192.0),
        (1.5, 9, 300.0),  # 384 capped at 5 minutes
        (1.5, 50, 300.0),
        (1.0, 9, 256.0),
        (1.0, 10, 300.0),
        (0.0, 1, 0.0),
        (0.0, 20, 0.0),
        (500.0, 1, 300.0),
    ],
)
def test_retry_delay(backoff: float, attempt: int, expected: float) -> None:
    assert retry_delay(job(ScheduleType.API, retry_backoff=backoff), attempt) == expected


@settings(max_examples=100, deadline=None)
@given(backoff=st.floats(0, 1000, allow_nan=False), attempt=st.integers(1, 200))
def test_retry_delay_doubles_until_capped(backoff: float, attempt: int) -> None:
    spec = job(ScheduleType.API, retry_backoff=backoff)
    assert retry_delay(spec, 1) == min(300.0, backoff)
    here, there = retry_delay(spec, attempt), retry_delay(spec, attempt + 1)
    assert 0 <= here <= there <= 300.0
    assert there == min(300.0, 2 * here)


def test_retry_delay_stays_capped_for_huge_attempts() -> None:
    assert retry_delay(job(ScheduleType.API, retry_backoff=1.0), 1025) == 300.0


def test_now_ms_uses_the_wall_clock_in_integer_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.1234))
    got = now_ms()
    assert type(got) is int
    assert got == 1_700_000_000_123


def test_now_ms_is_close_to_real_time() -> None:
    import time

    before = time.time_ns() // 1_000_000
    got = now_ms()
    after = time.time_ns() // 1_000_000
    assert type(got) is int
    assert before - 1 <= got <= after + 1
