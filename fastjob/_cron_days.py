"""Calendar arithmetic and the parsed form of a cron: which days of a month it matches.

Part of the pure-Python cron twin (``fastjob/_cron_py.py``), shared with the compiled
``fastjob/_cron.pyx`` through it. :class:`_Spec` is what the parser
(``fastjob/_cron_parse.py``) produces: a cron expression as bitsets and flags. Its day
fields are read here, one month at a time, as a 32-bit mask of the matching days;
:func:`_never` tells a cron that no date matches.
"""

from __future__ import annotations

# ---- calendar arithmetic -------------------------------------------------------------


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


# ---- the parsed form -----------------------------------------------------------------

NTH_LAST = 6  # bit of "last" in a weekday's nth mask (bits 1-5: first..fifth)

# how the day-of-month and day-of-week fields combine (see _month_mask)
MODE_AND = 0  # either is "*": both apply
MODE_OR = 1  # both restricted: either (Vixie cron, croniter's default)
MODE_SPECIAL = 2  # both restricted, one uses '#', 'L<d>' or 'W': croniter's rule


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
