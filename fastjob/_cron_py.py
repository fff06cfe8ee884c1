"""Cron next-fire times in pure Python: the twin of the compiled fastjob/_cron.pyx.

``fastjob.cron`` chooses between the two (compiled by default, this one with
FASTJOB_PUREPYTHON=1); both give identical results. This module also holds what the two
share and what is not on the hot path: :class:`CronError` and the expression parser
(``fastjob/_cron_parse.py``: croniter's language, quirks included), the day matching and
"never fires" check (``fastjob/_cron_days.py``), and the scan of a time zone's UTC
offset changes. See ``fastjob/cron.py`` for the syntax, the time-zone rules and where
they differ from croniter.

How a next fire is found (both implementations)
-----------------------------------------------
* An expression is parsed once into bitsets: seconds, minutes, hours (uint64), day of
  month (bits 1-31, plus the ``L`` and ``W`` markers), month (bits 1-12) and day of week
  (bits 0-6, plus the ``#``/``L`` markers). For one month, the matching days are one
  32-bit mask computed from the month's length and the weekday of its 1st (cached for
  the last month seen).
* Time is integer seconds: "wall" seconds are local wall-clock seconds since 1970-01-01
  00:00 local. The search walks the bitsets on integer (year, month, day, second-of-day)
  fields: no datetime objects, and no zoneinfo call once a zone's offset changes are
  cached.
* A zone is a sequence of "offset periods" (UTC intervals with one UTC offset). UTC and
  the fixed ``Etc/*`` zones are one period; for other zones the offset changes of a UTC
  year are found once (zoneinfo probed a day apart, each change bisected to the second)
  and cached per zone, so consecutive calls within one period, or within any year
  already seen, make no zoneinfo call.
* ``next_after``: in the period [pa, pb) (offset o) that holds the start, the first
  matching wall time W in the window [start, pb + o) is the answer, W - o in UTC; else
  the next period's window, from its start, and so on. The DST rules of fastjob/cron.py
  are two adjustments where a period begins with a change from offset op: if the hour
  field is not ``*`` and the clock went back (o < op), the window starts at pa + op,
  past the repeated wall times (they fired in the previous period: once); if it is not
  ``*`` and the clock went forward (o > op), a match W in the skipped walls
  [pa + op, pa + o) fires at W moved forward in whole minutes to pa + o or later.
"""

from __future__ import annotations

import datetime as _dt
import functools
import threading
import zoneinfo

from ._cron_days import (  # noqa: F401 - MODE_AND, MODE_OR, NTH_LAST: for fastjob/_cron.pyx
    MODE_AND,
    MODE_OR,
    NTH_LAST,
    _civil_from_days,
    _days_from_civil,
    _dow_masks,
    _month_mask,
    _Spec,
)
from ._cron_parse import CronError, _spec

__all__ = ["Cron", "CronError", "parse"]

# ---- limits --------------------------------------------------------------------------

MIN_YEAR = 1900  # supported instants: [1900-01-01, 2200-01-01) UTC
MAX_YEAR = 2200
_NO_MATCH = 1 << 62  # wall_next's "nothing before MAX_YEAR (+1, local)"
MIN_S = _days_from_civil(MIN_YEAR, 1, 1) * 86400
MAX_S = _days_from_civil(MAX_YEAR, 1, 1) * 86400
MIN_MS = MIN_S * 1000
MAX_MS = MAX_S * 1000


# ---- time zones ----------------------------------------------------------------------

_FIXED_NAMES = frozenset(
    {"UTC", "UCT", "GMT", "GMT0", "GMT+0", "GMT-0", "Greenwich", "Universal", "Zulu"}
)


def _load_zone(name: str) -> tuple[zoneinfo.ZoneInfo, int | None]:
    """(zoneinfo object, fixed offset in s or None); errors as in fastjob.schedule."""
    if name is not None and not isinstance(name, str):
        raise CronError(f"a time zone must be a string, got {type(name).__name__}")
    try:
        zone = zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # (OSError: the name of a folder of the tz database, e.g. "Europe")
        raise CronError(f"unknown timezone {name!r}") from exc
    key = name or "UTC"
    if key in _FIXED_NAMES or key.startswith("Etc/"):  # Etc/*: fixed offsets only
        off = _dt.datetime(2000, 1, 1, tzinfo=zone).utcoffset()
        assert off is not None  # a ZoneInfo always has an offset
        return zone, off // _dt.timedelta(seconds=1)
    return zone, None


def _offset_at(zone: _dt.tzinfo, ts: int) -> int:
    off = _dt.datetime.fromtimestamp(ts, zone).utcoffset()
    assert off is not None  # an aware datetime
    return off // _dt.timedelta(seconds=1)


def _scan_year(zone: _dt.tzinfo, y: int) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """The zone's UTC offset at the start of UTC year ``y`` and its changes in that
    year, as (utc second of the change, offset before, offset after). zoneinfo is probed
    once a day and each change bisected to the second: two changes less than a day apart
    would be missed (none exists in the tz database since 1900 as far as we know)."""
    start = _days_from_civil(y, 1, 1) * 86400
    end = _days_from_civil(y + 1, 1, 1) * 86400
    out = []
    a, off_a = start - 1, _offset_at(zone, start - 1)
    start_off = _offset_at(zone, start)
    b = start
    while a < end - 1:
        b = min(a + 86400, end - 1)
        off_b = _offset_at(zone, b)
        if off_b != off_a:
            lo, hi = a, b  # offset(lo) == off_a, offset(hi) != off_a
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset_at(zone, mid) == off_a:
                    lo = mid
                else:
                    hi = mid
            out.append((hi, off_a, _offset_at(zone, hi)))
        a, off_a = b, off_b
    return start_off, tuple(out)


class _ZoneTable:
    """A zone's offset changes by UTC year, scanned on first use (shared)."""

    def __init__(self, zone: _dt.tzinfo) -> None:
        self.zone = zone
        self.years: dict[
            int, tuple[int, tuple[int, ...], tuple[tuple[int, int, int], ...]]
        ] = {}

    def _year(self, y: int) -> tuple[int, tuple[int, ...], tuple[tuple[int, int, int], ...]]:
        got = self.years.get(y)
        if got is None:
            start_off, trs = _scan_year(self.zone, y)
            got = self.years.setdefault(y, (start_off, tuple(t[0] for t in trs), trs))
        return got

    def period(self, t: int) -> tuple[int, int, int, int]:
        """(pa, pb, offset, offset before pa): t is in [pa, pb), of constant offset.

        pa is the last change at or before t when there is one in t's UTC year or the
        year before, else the start of t's year; pb the next change in t's year, else
        the next year's start (such a boundary changes nothing: the next period has the
        same offset)."""
        days = t // 86400
        y = _civil_from_days(days)[0]
        start_off, utcs, trs = self._year(y)
        i = _bisect_right(utcs, t) - 1
        if i >= 0:
            pa, op, o = trs[i]
        else:
            prev = self._year(y - 1)[2] if y - 1 >= MIN_YEAR - 1 else ()
            if prev:
                pa, op, o = prev[-1]
            else:
                pa, op, o = _days_from_civil(y, 1, 1) * 86400, start_off, start_off
        pb = utcs[i + 1] if i + 1 < len(utcs) else _days_from_civil(y + 1, 1, 1) * 86400
        return pa, pb, o, op


def _bisect_right(a: tuple[int, ...], x: int) -> int:
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


_zone_tables: dict[str, _ZoneTable] = {}
_zone_lock = threading.Lock()


def _zone_table(name: str, zone: _dt.tzinfo) -> _ZoneTable:
    with _zone_lock:
        table = _zone_tables.get(name)
        if table is None:
            table = _zone_tables[name] = _ZoneTable(zone)
        return table


# ---- the evaluator -------------------------------------------------------------------


def _next_bit(bits: int, x: int) -> int:
    """The lowest set bit >= x, or 64."""
    if x >= 64:
        return 64
    v = bits >> x
    if not v:
        return 64
    return x + ((v & -v).bit_length() - 1)


class Cron:
    """A parsed cron expression in a time zone; ``next_after`` gives its fire times.

    Built by :func:`parse` (cached), not directly."""

    __slots__ = (
        "expr",
        "timezone",
        "_sp",
        "_dm",
        "_table",
        "_period",
        "_mm",
        "_sec",
        "_min",
        "_hour",
        "_month",
        "_first_tod",
        "__weakref__",
    )

    def __init__(self, expr: str, timezone: str, spec: _Spec, zone: _dt.tzinfo, fixed_off: int | None) -> None:
        self.expr = expr
        self.timezone = timezone
        self._sp = spec
        self._dm = _dow_masks(spec.dow_bits)
        self._sec, self._min = spec.sec, spec.min
        self._hour, self._month = spec.hour, spec.month
        if fixed_off is None:
            self._table: _ZoneTable | None = _zone_table(timezone or "UTC", zone)
            self._period = (0, 0, 0, 0)  # empty: the first call looks the period up
        else:
            self._table = None
            self._period = (MIN_S - 2 * 86400, MAX_S, fixed_off, fixed_off)
        self._mm = (-1, 0)
        self._first_tod = self._tod_next(0)

    def __repr__(self) -> str:
        return f"Cron({self.expr!r}, {self.timezone!r})"

    # -- wall-clock search --

    def _tod_next(self, sod: int) -> int:
        """The first matching second of the day >= sod, or -1."""
        hours, mins, secs = self._hour, self._min, self._sec
        h = sod // 3600
        r = sod - h * 3600
        mi = r // 60
        s = r - mi * 60
        nh = _next_bit(hours, h)
        if nh != h:
            if nh >= 24:
                return -1
            h, mi, s = nh, 0, 0
        while True:
            nm = _next_bit(mins, mi)
            if nm != mi:
                mi, s = nm, 0
            if mi < 60:
                ns = _next_bit(secs, s)
                if ns < 60:
                    return h * 3600 + mi * 60 + ns
                mi += 1
                s = 0
                continue
            h = _next_bit(hours, h + 1)
            if h >= 24:
                return -1
            mi = s = 0

    def _days_mask(self, y: int, m: int) -> int:
        key = y * 16 + m
        mm = self._mm
        if mm[0] == key:
            return mm[1]
        mask = _month_mask(self._sp, self._dm, y, m)
        self._mm = (key, mask)
        return mask

    def _wall_next(self, S: int) -> int:
        """The first matching wall-clock second >= S (local wall s), or _NO_MATCH."""
        days = S // 86400
        sod = S - days * 86400
        y, m, d = _civil_from_days(days)
        months = self._month
        while y <= MAX_YEAR:
            if not months >> m & 1:
                nm = _next_bit(months, m + 1)
                if nm > 12:
                    y += 1
                    nm = _next_bit(months, 1)
                m, d, sod = nm, 1, 0
                continue
            mask = self._days_mask(y, m) >> d
            if not mask:
                m += 1
                if m > 12:
                    y, m = y + 1, 1
                d, sod = 1, 0
                continue
            nd = d + ((mask & -mask).bit_length() - 1)
            if nd != d:
                d, sod = nd, 0
            tod = self._first_tod if sod == 0 else self._tod_next(sod)
            if tod < 0:
                d += 1
                sod = 0
                continue
            return _days_from_civil(y, m, d) * 86400 + tod
        return _NO_MATCH

    # -- periods of one UTC offset --

    def _lookup(self, t: int) -> tuple[int, int, int, int]:
        p = self._period
        if p[0] <= t < p[1]:
            return p
        assert self._table is not None  # a fixed offset has one endless period
        p = self._table.period(t)
        self._period = p
        return p

    def next_after(self, after_ms: int) -> int:
        """The first fire strictly after ``after_ms``, in epoch ms (whole seconds)."""
        if not isinstance(after_ms, int):
            raise TypeError(f"after_ms must be an int, got {type(after_ms).__name__}")
        if not MIN_MS <= after_ms < MAX_MS:
            raise CronError(
                f"after_ms {after_ms} is outside the supported range "
                f"(years {MIN_YEAR}-{MAX_YEAR - 1})"
            )
        sp = self._sp
        if sp.never:
            raise CronError(
                f"cron expression {self.expr!r} never fires "
                "(no date matches its day and month fields)"
            )
        t = after_ms // 1000
        restricted = not sp.hour_star
        pa, pb, o, op = self._lookup(t)
        if sp.six:
            S = t + o + 1
        else:
            S = (t + o) // 60 * 60 + 60
        if restricted and o < op:
            # fixed hours: a repeated wall time fired in its first pass
            S = max(S, pa + op)
        best = _NO_MATCH
        prev_S, W = None, _NO_MATCH
        while True:
            if prev_S is None or not prev_S <= S <= W:
                W = self._wall_next(S)
            prev_S = S
            if W < pb + o:
                best = min(best, W - o)
            if best != _NO_MATCH:
                return best * 1000
            if pb >= MAX_S:
                raise CronError(
                    f"cron expression {self.expr!r} has no fire time before {MAX_YEAR}"
                )
            npa, npb, no, nop = self._lookup(pb)
            S = pb + no
            if restricted:
                if npa == pb and no > nop and W < pb + no:
                    # fixed hours: a wall time skipped by a clock change fires when the
                    # clock reaches it, moved forward in whole minutes (croniter's rule)
                    best = W + -((W - (pb + no)) // 60) * 60 - no
                if no < nop:
                    S = max(S, npa + nop)
            pa, pb, o, op = npa, npb, no, nop


@functools.lru_cache(maxsize=4096)
def parse(expr: str, timezone: str) -> Cron:
    """The cron ``expr`` (5 fields, or 6 with seconds first) in ``timezone`` (an IANA
    name; "" is UTC), parsed once and cached by (expr, timezone). Raises
    :class:`CronError`."""
    spec = _spec(expr)
    zone, fixed = _load_zone(timezone)
    return Cron(expr, timezone, spec, zone, fixed)
