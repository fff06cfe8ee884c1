"""The cron grammar: an expression read into the bitsets of :class:`~fastjob._cron_days._Spec`.

Part of the pure-Python cron twin (``fastjob/_cron_py.py``), shared with the compiled
``fastjob/_cron.pyx`` through it. The accepted language, the values and the error messages
are croniter 7.0's (the reference model of tests/test_cron.py), quirks included; the
syntax is described in ``fastjob/cron.py``.

A field is a comma-separated list of items. An item is

* ``*``, a number or a name (``jan``-``dec`` in the month field, ``sun``-``sat`` in the
  day-of-week field), and in the day-of-month field ``L`` (the month's last day);
* a range ``a-b``, ``*/n`` (the whole field, every n-th) or ``a/n`` (from ``a`` to the
  field's end), ``a-b`` optionally ``/n`` too;
* in the day-of-month field only, ``nW`` or ``Wn``, alone in its field: the weekday
  nearest day n;
* in the day-of-week field only, ``x#k`` (the k-th such weekday of the month; x a number,
  a name or a range of names) and ``Ln`` (the last weekday n of the month).

A 6-field expression has seconds first; they are moved to the end (croniter's field
order) before the fields are read.
"""

from __future__ import annotations

import re
from typing import cast

from ._cron_days import MODE_AND, MODE_OR, MODE_SPECIAL, NTH_LAST, _never, _Spec

__all__ = ["CronError"]


class CronError(ValueError):
    """A bad cron expression or time zone, or a cron that never fires."""


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
_NAMES: tuple[dict[str, int], ...] = ({}, {}, {}, _MONTHS, _WEEKDAYS, {})

_FIELD_RE = re.compile(r"\S+", re.ASCII)
_DIGITS_RE = re.compile(r"\d+", re.ASCII)
_WD = "|".join(_WEEKDAYS)
_MO = "|".join(_MONTHS)
# what may stand before '#': one word (a number or a name), or a range of two names
_NTH_BASE_RE = re.compile(rf"\w+|({_WD})-({_WD})|({_MO})-({_MO})", re.ASCII)
_HASH_RE = re.compile(
    r"^(?P<hash_type>h|r)(\((?P<range_begin>\d+)-(?P<range_end>\d+)\))?"
    r"(\/(?P<divisor>\d+))?$",
    re.ASCII,
)
_QUARTZ_LAST_DOW_RE = re.compile(r"^[0-7]l$", re.ASCII)

# A field's values: numbers, and the markers "*" (any) and "l" (the month's last day).
# An nth weekday map: weekday -> the k of its '#k' items, and NTH_LAST for 'L<weekday>'.
Value = int | str


class _Bad(Exception):
    """A field's error; _spec() turns it into a CronError naming the expression."""


def _is_int(text: str) -> bool:
    return _DIGITS_RE.fullmatch(text) is not None


def _name(idx: int, key: str) -> Value:
    """A word that is not a number: a month or weekday name, or 'l' in the day field."""
    if idx == DAY and key == "l":
        return "l"
    try:
        return _NAMES[idx][key]
    except KeyError:
        if idx == DOW and _QUARTZ_LAST_DOW_RE.match(key):
            raise _Bad(
                f"{key.upper()!r} is not supported: write the last weekday as "
                f"L<weekday>, e.g. 'L{key[0]}' (croniter's form)"
            ) from None
        if idx == DAY and key == "lw":
            raise _Bad("'LW' (last weekday of the month) is not supported") from None
        if key in _MONTHS or key in _WEEKDAYS:
            raise _Bad(f"name {key!r} is not allowed in the {_FIELD_NAMES[idx]} field") from None
        raise _Bad(f"{key!r} is not a number or a known name") from None


def _sunday(idx: int, value: int) -> int:
    """Weekday 7 is Sunday (0); of croniter's aliases the only one for 5 or 6 fields."""
    return 0 if idx == DOW and value == 7 else value


def _range(idx: int, low_text: str, high_text: str, step_text: str, from_start: bool) -> list[int]:
    """The values of ``low-high/step``; ``from_start``: written ``low/step`` (to the end)."""
    lo, hi = _RANGES[idx]
    # each end as digits: a number as written, a name as its number ('l' stays 'l')
    high_end = str(hi) if idx == DAY and high_text == "l" else high_text
    low_s = low_text if _is_int(low_text) else str(_name(idx, low_text))
    high_s = high_end if _is_int(high_end) else str(_name(idx, high_end))
    step = int(step_text)
    if step == 0:
        raise _Bad("a step of 0 is not allowed")
    if not (_is_int(low_s) and _is_int(high_s)):
        raise _Bad(f"range '{low_s}-{high_s}' is not acceptable")
    first, last = _sunday(idx, int(low_s)), _sunday(idx, int(high_s))
    if max(first, last) > hi:
        raise _Bad(f"range '{low_text}-{high_text}' is out of range {lo}-{hi}")
    if first == last:
        if from_start:
            return [first]  # 'a/n' with a at the field's end: a alone
        first, last = lo, hi  # croniter: an equal range ("5-5", "jan-jan") is the whole cycle
    if first <= last:
        values = list(range(first, last + 1, step))
    else:
        # across the end of the cycle (fri-mon, 22-2): stepped to the end, then on from the
        # cycle's start as croniter does it: at lo if the next step lands exactly on lo,
        # else at lo + over, one value past where it lands
        values = list(range(first, hi + 1, step))
        over = values[-1] + step - hi
        values += range(lo + (over if over > 1 else 0), last + 1, step)
    if values[0] < lo:  # only 0, in the day and month fields
        raise _Bad(f"value {values[0]} is out of range {lo}-{hi}")
    return values


def _item(idx: int, item: str) -> list[Value]:
    """The values of one item of a list: '*', a number, a name, or a range."""
    lo, hi = _RANGES[idx]
    if item.startswith("-"):
        raise _Bad("negative numbers are not allowed")
    if item.startswith("*/") and len(item) > 2:
        if _is_int(item[2:]):  # '*/n'
            return list(_range(idx, str(lo), str(hi), item[2:], False))
        # croniter reads no other '*/...' as 'a-b': only as 'a/n' below
    else:
        low, dash, rest = item.partition("-")
        high, slash, step = rest.partition("/")
        if low and dash and high and "-" not in high and (not slash or _is_int(step)):  # 'a-b', 'a-b/n'
            return list(_range(idx, low, high, step or "1", False))
    cut = item.rfind("/", 1, len(item) - 1)  # the last '/' with text on both sides
    if cut > 0:
        start, step = item[:cut], item[cut + 1 :]
        if "-" not in start and _is_int(step):  # 'a/n'
            return list(_range(idx, start, str(hi), step, True))
        item = f"{start}-{hi}/{step}"  # not a range: named in the error below as croniter reads it
    if item == "*":
        return ["*"]
    value = int(item) if _is_int(item) else _name(idx, item)
    if value == "l":
        return ["l"]
    value = _sunday(idx, cast(int, value))
    if not lo <= value <= hi:
        raise _Bad(f"value {value} is out of range {lo}-{hi}")
    return [value]


def _nearest_weekday_item(item: str) -> int | None:
    """The day of a day-of-month item 'nW' or 'Wn', else None."""
    if item.endswith("w") and _is_int(item[:-1]):
        return int(item[:-1])
    if item.startswith("w") and _is_int(item[1:]):
        return int(item[1:])
    return None


def _nth_item(item: str) -> tuple[str, int] | None:
    """A day-of-week item 'x#k' or 'Ln' as (x, k) or (n, NTH_LAST), else None."""
    if item.startswith("l") and _is_int(item[1:]):
        return item[1:], NTH_LAST
    base, sharp, k = item.partition("#")
    if sharp and _is_int(k) and _NTH_BASE_RE.fullmatch(base):
        if not 1 <= int(k) <= 5:
            raise _Bad(f"'#{k}': the nth weekday must be 1-5")
        return base, int(k)
    return None


def _expand_field(idx: int, field: str, fields: list[str]) -> tuple[set[Value], dict[int, set[int]], int]:
    """One field (lower case) of ``fields``: (its values, nth weekday map, W day or 0)."""
    if _HASH_RE.match(field):
        raise _Bad("hashed and random values (H, R) are not supported")
    if "?" in field:
        if field != "?":
            raise _Bad("'?' must stand alone")
        if idx not in (DAY, DOW):
            raise _Bad("'?' is only allowed in the day-of-month and day-of-week fields")
        field = "*"
    items = field.split(",")
    values: set[Value] = set()
    nth_map: dict[int, set[int]] = {}
    w_day = 0
    for item in reversed(items):  # croniter's order: of two bad items, the last is reported
        if idx == DAY and (day := _nearest_weekday_item(item)) is not None:
            if not 1 <= day <= 31:
                raise _Bad(f"nearest-weekday day {day} is out of range 1-31")
            if len(items) > 1:
                raise _Bad("'W' must stand alone, not in a list")
            w_day = day
            values.add(day)
        elif idx == DOW and (nth := _nth_item(item)) is not None:
            base, k = nth
            for value in _item(idx, base):
                values.add(value)
                nth_map.setdefault(cast(int, value), set()).add(k)  # (x is a number or names)
        else:
            values.update(_item(idx, item))
    if len(values) == _LEN_MEANS_ALL[idx]:
        # croniter keeps a full day list when the other day field has no '*' in it (so
        # it counts as restricted for the OR rule); otherwise a full list is '*'
        if not ((idx == DAY and "*" not in fields[DOW]) or (idx == DOW and "*" not in fields[DAY])):
            values = {"*"}
    return values, nth_map, w_day


def _bits(values: set[Value], idx: int) -> int:
    lo_r, hi_r = _RANGES[idx]
    if "*" in values:
        return sum(1 << v for v in range(lo_r, hi_r + 1))
    return sum(1 << v for v in values if isinstance(v, int))


def _spec(expr: str) -> _Spec:
    """Parse ``expr`` (5 fields, or 6 with seconds first); raises :class:`CronError`."""
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
    expanded: list[set[Value]] = []
    nth_map: dict[int, set[int]] = {}
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
            nth[wday] |= 1 << n
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
