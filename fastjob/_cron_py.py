"""Cron next-fire times in pure Python: the twin of the compiled fastjob/_cron.pyx.

``fastjob.cron`` chooses between the two (compiled by default, this one with
FASTJOB_PUREPYTHON=1); both give identical results. This module also holds what the two
share and what is not on the hot path: :class:`CronError`, the expression parser (a port
of croniter's, quirks included), the "never fires" check, and the scan of a time zone's
UTC offset changes. See ``fastjob/cron.py`` for the syntax, the time-zone rules and
where they differ from croniter.

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
import re
import threading
import zoneinfo
from typing import Any

__all__ = ["Cron", "CronError", "parse"]


class CronError(ValueError):
    """A bad cron expression or time zone, or a cron that never fires."""


# ---- limits and calendar arithmetic --------------------------------------------------

MIN_YEAR = 1900  # supported instants: [1900-01-01, 2200-01-01) UTC
MAX_YEAR = 2200
_NO_MATCH = 1 << 62  # wall_next's "nothing before MAX_YEAR (+1, local)"


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    return 30 if m in (4, 6, 9, 11) else 31


MIN_S = _days_from_civil(MIN_YEAR, 1, 1) * 86400
MAX_S = _days_from_civil(MAX_YEAR, 1, 1) * 86400
MIN_MS = MIN_S * 1000
MAX_MS = MAX_S * 1000


# ---- the parser: croniter 7.0's field expansion, ported ------------------------------

# croniter's field order: a 6-field cron's seconds move from the front to the end
MINUTE, HOUR, DAY, MONTH, DOW, SECOND = range(6)
_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week", "second")
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6), (0, 59))
_LEN_MEANS_ALL = (60, 24, 31, 12, 7, 60)
_MONTHS = {
    "jan": 1,
    "feb": 2,
    "mar": 3,
    "apr": 4,
    "may": 5,
    "jun": 6,
    "jul": 7,
    "aug": 8,
    "sep": 9,
    "oct": 10,
    "nov": 11,
    "dec": 12,
}
_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_ALPHA: tuple[dict[str, Any], ...] = ({}, {}, {"l": "l"}, _MONTHS, _WEEKDAYS, {})

_FIELD_RE = re.compile(r"\S+", re.ASCII)
_STEP_RE = re.compile(r"^([^-]+)-([^-/]+)(/(\d+))?$", re.ASCII)
_INT_RE = re.compile(r"^\d+$", re.ASCII)
_STAR_OR_INT_RE = re.compile(r"^(\d+|\*)$", re.ASCII)
_WD = "|".join(_WEEKDAYS)
_MO = "|".join(_MONTHS)
_SPECIAL_DOW_RE = re.compile(
    rf"^(?P<pre>((?P<he>(({_WD})(-({_WD}))?)|(({_MO})(-({_MO}))?)|\w+)#)|l)"
    r"(?P<last>\d+)$",
    re.ASCII,
)
_NEAREST_WEEKDAY_RE = re.compile(r"^(?:(\d+)w|w(\d+))$", re.ASCII)
_HASH_RE = re.compile(
    r"^(?P<hash_type>h|r)(\((?P<range_begin>\d+)-(?P<range_end>\d+)\))?"
    r"(\/(?P<divisor>\d+))?$",
    re.ASCII,
)
_STAR_STEP_RE = re.compile(r"^\*(\/.+)$")
_START_STEP_RE = re.compile(r"^(.+)\/(.+)$")
_QUARTZ_LAST_DOW_RE = re.compile(r"^[0-7]l$", re.ASCII)

NTH_LAST = 6  # bit of "last" in a weekday's nth mask (bits 1-5: first..fifth)

# how the day-of-month and day-of-week fields combine (see _month_mask)
MODE_AND = 0  # either is "*": both apply
MODE_OR = 1  # both restricted: either (Vixie cron, croniter's default)
MODE_SPECIAL = 2  # both restricted, one uses '#', 'L<d>' or 'W': croniter's rule


class _Bad(Exception):
    """A field's error; parse() turns it into a CronError naming the expression."""


def _alpha(idx: int, key: str) -> Any:
    try:
        return _ALPHA[idx][key]
    except KeyError:
        if idx == DOW and _QUARTZ_LAST_DOW_RE.match(key):
            raise _Bad(
                f"{key.upper()!r} is not supported: write the last weekday as "
                f"L<weekday>, e.g. 'L{key[0]}' (croniter's form)"
            ) from None
        if idx == DAY and key == "lw":
            raise _Bad("'LW' (last weekday of the month) is not supported") from None
        if key in _MONTHS or key in _WEEKDAYS:
            raise _Bad(
                f"name {key!r} is not allowed in the {_FIELD_NAMES[idx]} field"
            ) from None
        raise _Bad(f"{key!r} is not a number or a known name") from None


def _alias(idx: int, val: Any) -> Any:
    # croniter's LOWMAP: of its aliases only 7 -> 0 (Sunday) applies to 5 or 6 fields
    return 0 if idx == DOW and val == 7 else val


def _expand_field(idx: int, field: str, raw_fields: list[str]) -> tuple[set[Any], dict[Any, set[Any]], int]:  # noqa: C901 - one grammar, read top to bottom
    """One field as croniter expands it: (values, nth weekday map, W day or 0)."""
    lo_r, hi_r = _RANGES[idx]
    if _HASH_RE.match(field):
        raise _Bad("hashed and random values (H, R) are not supported")
    if "?" in field:
        if field != "?":
            raise _Bad("'?' must stand alone")
        if idx not in (DAY, DOW):
            raise _Bad("'?' is only allowed in the day-of-month and day-of-week fields")
        field = "*"
    # a field's items are ints, names, '*', 'l' and 'n#k' strings as the grammar unfolds them
    e_list: list[Any] = list(field.split(","))
    res: list[Any] = []
    seen: set[Any] = set()
    nth_map: dict[Any, set[Any]] = {}
    w_day = 0
    while e_list:
        e = e_list.pop()
        nth: Any = None
        if idx == DOW:
            sm = _SPECIAL_DOW_RE.match(str(e))
            if sm:
                he, last = sm.group("he"), sm.group("last")
                if he:
                    e = he
                    nth = int(last)
                    if not 1 <= nth <= 5:
                        raise _Bad(f"'#{last}': the nth weekday must be 1-5")
                elif last:
                    e = last
                    nth = "l"
        if idx == DAY:
            wm = _NEAREST_WEEKDAY_RE.match(str(e))
            if wm:
                wd = int(wm.group(1) or wm.group(2))
                if not 1 <= wd <= 31:
                    raise _Bad(f"nearest-weekday day {wd} is out of range 1-31")
                if e_list or res:
                    raise _Bad("'W' must stand alone, not in a list")
                w_day = wd
                res.append(wd)
                continue
        s = str(e)
        t = _STAR_STEP_RE.sub(rf"{lo_r}-{hi_r}\1", s)
        m = _STEP_RE.search(t)
        start_with_step = False
        if not m:
            t = _START_STEP_RE.sub(rf"\1-{hi_r}/\2", s)
            m = _STEP_RE.search(t)
            start_with_step = bool(m)
        if m:
            low, high, step = m.group(1), m.group(2), m.group(4) or "1"
            if idx == DAY and high == "l":
                high = "31"
            if not _INT_RE.search(low):
                low = str(_alpha(idx, low))
            if not _INT_RE.search(high):
                high = str(_alpha(idx, high))
            step = int(step)
            if step == 0:
                raise _Bad("a step of 0 is not allowed")
            for band in (low, high):
                if not _INT_RE.search(band):
                    raise _Bad(f"range '{low}-{high}' is not acceptable")
            low, high = _alias(idx, int(low)), _alias(idx, int(high))
            if max(low, high) > hi_r:
                raise _Bad(
                    f"range '{m.group(1)}-{m.group(2)}' is out of range {lo_r}-{hi_r}"
                )
            start_at_field_max = start_with_step and low == high
            if low == high and not start_with_step:
                # croniter: an equal range ("5-5", "jan-jan") is the whole cycle
                low, high = lo_r, hi_r
            if start_at_field_max:
                rng = [low]
            elif low > high:
                # a range that wraps (fri-mon, 22-2), stepped across the wrap as
                # croniter does it
                rng = list(range(low, hi_r + 1, step))
                to_skip = 0
                if rng:
                    already_skipped = hi_r - rng[-1]
                    curpos = rng[-1] - lo_r
                    if curpos + step > hi_r - lo_r + 1 and already_skipped < step:
                        to_skip = step - already_skipped
                rng += list(range(lo_r + to_skip, high + 1, step))
            else:
                rng = list(range(low, high + 1, step))
            if idx == DOW and nth and nth != "l":
                rng = [f"{item}#{nth}" for item in rng]
            e_list += [a for a in rng if a not in seen]
            seen.update(rng)
        else:
            if t.startswith("-"):
                raise _Bad("negative numbers are not allowed")
            item: Any = t
            if not _STAR_OR_INT_RE.search(t):
                item = _alpha(idx, t)
            try:
                item = int(item)
            except ValueError:
                pass
            item = _alias(idx, item)
            if item not in ("*", "l") and not lo_r <= int(item) <= hi_r:
                raise _Bad(f"value {item} is out of range {lo_r}-{hi_r}")
            res.append(item)
            if idx == DOW and nth:
                nth_map.setdefault(item, set()).add(nth)
    values = set(res)
    if len(values) == _LEN_MEANS_ALL[idx]:
        # croniter keeps a full day list when the other day field has no '*' in it (so
        # it counts as restricted for the OR rule); otherwise a full list is '*'
        if not (
            (idx == DAY and "*" not in raw_fields[DOW])
            or (idx == DOW and "*" not in raw_fields[DAY])
        ):
            values = {"*"}
    return values, nth_map, w_day


def _bits(values: set[Any], idx: int) -> int:
    lo_r, hi_r = _RANGES[idx]
    if "*" in values:
        return sum(1 << v for v in range(lo_r, hi_r + 1))
    return sum(1 << v for v in values if isinstance(v, int))


class _Spec:
    """A parsed expression: the bitsets and flags both evaluators are built from."""

    __slots__ = (
        "six",
        "sec",
        "min",
        "hour",
        "month",
        "dom_bits",
        "dom_last",
        "dom_w",
        "dom_star",
        "dow_bits",
        "dow_star",
        "nth",
        "has_nth",
        "mode",
        "hour_star",
        "never",
    )
    six: bool
    sec: int
    min: int
    hour: int
    month: int
    dom_bits: int
    dom_last: bool
    dom_w: int
    dom_star: bool
    dow_bits: int
    dow_star: bool
    nth: tuple[int, ...]
    has_nth: bool
    mode: int
    hour_star: bool
    never: bool


def _spec(expr: str) -> _Spec:
    if not isinstance(expr, str):
        raise CronError(
            f"a cron expression must be a string, got {type(expr).__name__}"
        )
    fields = _FIELD_RE.findall(expr.lower())
    if len(fields) not in (5, 6):
        raise CronError(
            f"bad cron expression {expr!r}: want 5 fields (min hour dom month dow) "
            f"or 6 with seconds first (sec min hour dom month dow), got {len(fields)}"
        )
    six = len(fields) == 6
    shown = _FIELD_RE.findall(expr)  # as written, for messages
    if len(shown) != len(fields):  # (lower() never changes the fields; just in case)
        shown = list(fields)
    if six:
        fields.append(fields.pop(0))  # seconds last, as croniter orders them
        shown.append(shown.pop(0))
    expanded = []
    nth_map: dict[Any, set[Any]] = {}
    w_day = 0
    for idx, field in enumerate(fields):
        try:
            values, nmap, wd = _expand_field(idx, field, fields)
        except _Bad as exc:
            raise CronError(
                f"bad cron expression {expr!r}: "
                f"{_FIELD_NAMES[idx]} field {shown[idx]!r}: {exc}"
            ) from None
        expanded.append(values)
        if idx == DOW:
            nth_map = nmap
        if idx == DAY:
            w_day = wd
    if nth_map:
        plain = expanded[DOW] - set(nth_map) - {"*"}
        if plain and len(expanded[DOW]) != 7:
            raise CronError(
                f"bad cron expression {expr!r}: day-of-week field {shown[DOW]!r}: "
                "plain weekdays cannot be mixed with '#' or 'L' weekdays"
            )
    sp = _Spec()
    sp.six = six
    sp.sec = _bits(expanded[SECOND], SECOND) if six else 1
    sp.min = _bits(expanded[MINUTE], MINUTE)
    sp.hour = _bits(expanded[HOUR], HOUR)
    sp.month = _bits(expanded[MONTH], MONTH)
    dom, dow = expanded[DAY], expanded[DOW]
    sp.dom_star = "*" in dom
    sp.dom_bits = _bits(dom, DAY)
    sp.dom_last = "l" in dom
    sp.dom_w = w_day
    sp.dow_star = "*" in dow
    sp.dow_bits = _bits(dow, DOW)
    nth = [0] * 7
    for wday, ns in nth_map.items():
        for n in ns:
            nth[wday] |= 1 << (NTH_LAST if n == "l" else n)
    sp.nth = tuple(nth)
    sp.has_nth = bool(nth_map)
    if sp.dom_star or sp.dow_star:
        sp.mode = MODE_AND
    elif not sp.has_nth and not w_day:
        sp.mode = MODE_OR
    else:
        sp.mode = MODE_SPECIAL
    sp.hour_star = sp.hour == (1 << 24) - 1
    sp.never = _never(sp)
    return sp


# ---- which days of a month match -----------------------------------------------------


def _dow_masks(dow_bits: int) -> tuple[int, ...]:
    """Per weekday of the 1st (0 = Sunday): the days 1-31 on a weekday in dow_bits."""
    out = []
    for wd1 in range(7):
        mask = 0
        for d in range(1, 32):
            if dow_bits >> ((wd1 + d - 1) % 7) & 1:
                mask |= 1 << d
        out.append(mask)
    return tuple(out)


def _nearest_weekday(wd1: int, nd: int, w: int) -> int:
    """croniter's W: the weekday nearest day ``w`` (or the last day), same month."""
    day = min(w, nd)
    wd = (wd1 + day - 1) % 7
    if wd == 6:  # Saturday: the Friday before; the Monday after if it is the 1st
        return day - 1 if day > 1 else day + 2
    if wd == 0:  # Sunday: the Monday after; the Friday before if it is the last day
        return day + 1 if day < nd else day - 2
    return day


def _nth_mask(nth: tuple[int, ...], wd1: int, nd: int) -> int:
    mask = 0
    for w in range(7):
        bits = nth[w]
        if bits:
            first = 1 + (w - wd1) % 7
            count = (nd - first) // 7 + 1
            for n in range(1, 6):
                if bits >> n & 1 and n <= count:
                    mask |= 1 << (first + 7 * (n - 1))
            if bits >> NTH_LAST & 1:
                mask |= 1 << (first + 7 * (count - 1))
    return mask


def _month_mask(sp: _Spec, dow_masks: tuple[int, ...], y: int, m: int) -> int:
    """The days (bits 1-31) of month ``m`` of year ``y`` that the day fields accept.

    croniter's rules: with '*' in either day field, both apply (AND). With both
    restricted, either may match (OR), unless '#', 'L<weekday>' or 'W' is used: then
    croniter fires on the days those select, AND the other day field only when it is
    also a '#'/'W' one; its plain other field must merely be able to coincide with them
    (else it never fires: ``_never``).
    """
    nd = _days_in_month(y, m)
    valid = (1 << (nd + 1)) - 2
    wd1 = (_days_from_civil(y, m, 1) + 4) % 7
    if sp.dom_w:
        domp = 1 << _nearest_weekday(wd1, nd, sp.dom_w)
    elif sp.dom_star:
        domp = valid
    else:
        domp = (sp.dom_bits & valid) | (sp.dom_last << nd)
    if sp.has_nth:
        dowp = _nth_mask(sp.nth, wd1, nd)
    elif sp.dow_star:
        dowp = valid
    else:
        dowp = dow_masks[wd1] & valid
    if sp.mode == MODE_AND:
        return domp & dowp
    if sp.mode == MODE_OR:
        return domp | dowp
    return (domp if sp.dom_w else valid) & (dowp if sp.has_nth else valid)


def _never(sp: _Spec) -> bool:
    """True if no day ever matches. 2001-2028 holds every kind of year (weekday of Jan
    1, leap or not) and every kind of month, so a day-of-month/month/weekday combination
    that exists at all exists in those years (croniter searches 50 years; no combination
    is rarer than 40)."""
    dm = _dow_masks(sp.dow_bits)
    months = [m for m in range(1, 13) if sp.month >> m & 1]
    guard = sp.mode == MODE_SPECIAL and (sp.has_nth != bool(sp.dom_w))
    found = guard_found = False
    for y in range(2001, 2029):
        for m in months:
            if not found and _month_mask(sp, dm, y, m):
                found = True
            if guard and not guard_found:
                # croniter also computes the other side (the plain field AND the '#'/'W'
                # one) and raises when that never matches, though it does not fire on it
                nd = _days_in_month(y, m)
                valid = (1 << (nd + 1)) - 2
                wd1 = (_days_from_civil(y, m, 1) + 4) % 7
                if sp.has_nth:
                    dom_days = (sp.dom_bits & valid) | (sp.dom_last << nd)
                    side = dom_days & _nth_mask(sp.nth, wd1, nd)
                else:
                    side = (1 << _nearest_weekday(wd1, nd, sp.dom_w)) & dm[wd1]
                guard_found = side != 0
            if found and (guard_found or not guard):
                return False
    return True


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
