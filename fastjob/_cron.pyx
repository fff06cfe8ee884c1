# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cron next-fire times in C (the compiled core of fastjob.cron).

The same algorithm as the pure-Python twin ``fastjob/_cron_py.py``, line for line, on C
integers: see that module's docstring for how it works, and ``fastjob/cron.py`` for the syntax
and the time-zone rules. The parser, :class:`CronError`, the "never fires" check and the scan of
a zone's offset changes are the twin's (shared, and off the hot path). What is compiled is the
evaluator: bitsets walked with count-trailing-zeros on integer calendar fields, a cached month
mask, and a zone's offset changes kept in C arrays (scanned once per UTC year), so that a next
fire costs no Python object besides the returned int.
"""
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, realloc

import functools
import threading

from ._cron_py import (
    MAX_MS,
    MAX_S,
    MAX_YEAR,
    MIN_MS,
    MIN_S,
    MIN_YEAR,
    MODE_AND,
    MODE_OR,
    NTH_LAST,
    CronError,
    _load_zone,
    _scan_year,
    _spec,
)

__all__ = ["Cron", "CronError", "parse"]

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    static inline int fj_ctz64(unsigned long long v) { return __builtin_ctzll(v); }
    #else
    static inline int fj_ctz64(unsigned long long v) { int n = 0; while (!(v & 1ULL)) { v >>= 1; ++n; } return n; }
    #endif
    """
    int fj_ctz64(unsigned long long v) nogil

cdef enum:
    FIRST_TABLE_YEAR = 1899  # MIN_YEAR - 1: the year before a period may hold its start
    TABLE_YEARS = 301  # 1899..2199

cdef int64_t NO_MATCH = (<int64_t>1) << 62  # _wall_next's "nothing before MAX_YEAR (+1, local)"

cdef int64_t C_MIN_MS = MIN_MS
cdef int64_t C_MAX_MS = MAX_MS
cdef int64_t C_MIN_S = MIN_S
cdef int64_t C_MAX_S = MAX_S
cdef int C_MIN_YEAR = MIN_YEAR
cdef int C_MAX_YEAR = MAX_YEAR
cdef int C_NTH_LAST = NTH_LAST
cdef int C_MODE_AND = MODE_AND
cdef int C_MODE_OR = MODE_OR


# ---- integer calendar ----------------------------------------------------------------------------

cdef inline int64_t fdiv(int64_t a, int64_t b) noexcept nogil:
    """Floor division for b > 0 (C division truncates)."""
    cdef int64_t q = a / b
    if a % b < 0:
        q -= 1
    return q


cdef inline int64_t days_from_civil(int64_t y, int m, int d) noexcept nogil:
    if m <= 2:
        y -= 1
    cdef int64_t era = fdiv(y, 400)
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m + (-3 if m > 2 else 9)) + 2) / 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
    return era * 146097 + doe - 719468


cdef inline void civil_from_days(int64_t z, int *py, int *pm, int *pd) noexcept nogil:
    z += 719468
    cdef int64_t era = fdiv(z, 146097)
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
    cdef int64_t y = yoe + era * 400
    cdef int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
    cdef int64_t mp = (5 * doy + 2) / 153
    cdef int d = <int>(doy - (153 * mp + 2) / 5 + 1)
    cdef int m = <int>(mp + 3 if mp < 10 else mp - 9)
    py[0] = <int>(y + 1 if m <= 2 else y)
    pm[0] = m
    pd[0] = d


cdef inline int days_in_month(int y, int m) noexcept nogil:
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    if m == 4 or m == 6 or m == 9 or m == 11:
        return 30
    return 31


cdef inline int next_bit(uint64_t bits, int x) noexcept nogil:
    """The lowest set bit >= x, or 64."""
    if x >= 64:
        return 64
    cdef uint64_t v = bits >> x
    if v == 0:
        return 64
    return x + fj_ctz64(v)


cdef inline int64_t imax(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


# ---- a zone's offset changes ---------------------------------------------------------------------

cdef class _ZoneTable:
    """A zone's offset changes by UTC year (1899-2199), each year scanned on first use."""

    cdef object zone
    cdef int32_t first[TABLE_YEARS]  # index of the year's first change in the arrays; -1: not scanned
    cdef int32_t count[TABLE_YEARS]
    cdef int32_t start_off[TABLE_YEARS]
    cdef int64_t *utc
    cdef int32_t *before
    cdef int32_t *after
    cdef Py_ssize_t n, cap

    def __cinit__(self, zone):
        cdef int i
        self.zone = zone
        for i in range(TABLE_YEARS):
            self.first[i] = -1
            self.count[i] = 0
            self.start_off[i] = 0
        self.utc = NULL
        self.before = NULL
        self.after = NULL
        self.n = 0
        self.cap = 0

    def __dealloc__(self):
        free(self.utc)
        free(self.before)
        free(self.after)

    cdef int _grow(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = self.cap * 2 if self.cap else 64
        while cap < need:
            cap *= 2
        cdef int64_t *u = <int64_t *>realloc(self.utc, cap * sizeof(int64_t))
        if u == NULL:
            raise MemoryError()
        self.utc = u
        cdef int32_t *b = <int32_t *>realloc(self.before, cap * sizeof(int32_t))
        if b == NULL:
            raise MemoryError()
        self.before = b
        cdef int32_t *a = <int32_t *>realloc(self.after, cap * sizeof(int32_t))
        if a == NULL:
            raise MemoryError()
        self.after = a
        self.cap = cap
        return 0

    cdef int _ensure(self, int y) except -1:
        cdef int i = y - FIRST_TABLE_YEAR
        if self.first[i] >= 0:
            return 0
        start_off, trs = _scan_year(self.zone, y)  # Python: another thread may fill it meanwhile
        if self.first[i] >= 0:
            return 0
        cdef Py_ssize_t k = len(trs)
        if self.n + k > self.cap:
            self._grow(self.n + k)
        cdef Py_ssize_t j
        for j in range(k):
            u, b, a = trs[j]
            self.utc[self.n + j] = u
            self.before[self.n + j] = b
            self.after[self.n + j] = a
        self.count[i] = <int32_t>k
        self.start_off[i] = start_off
        self.first[i] = <int32_t>self.n
        self.n += k
        return 0

    cdef int period(self, int64_t t, int64_t *pa, int64_t *pb, int64_t *o, int64_t *op) except -1:
        """As _ZoneTable.period of the twin: [pa, pb) holds t, with offset o, and op before pa."""
        cdef int y, mo, d
        civil_from_days(fdiv(t, 86400), &y, &mo, &d)
        self._ensure(y)
        if y - 1 >= FIRST_TABLE_YEAR:
            self._ensure(y - 1)  # both before reading: a scan may move the arrays
        cdef int i = y - FIRST_TABLE_YEAR
        cdef Py_ssize_t f = self.first[i]
        cdef Py_ssize_t c = self.count[i]
        cdef Py_ssize_t j = -1
        cdef Py_ssize_t k
        for k in range(c):
            if self.utc[f + k] <= t:
                j = k
            else:
                break
        cdef Py_ssize_t pf, pc
        if j >= 0:
            pa[0] = self.utc[f + j]
            op[0] = self.before[f + j]
            o[0] = self.after[f + j]
        else:
            pc = self.count[i - 1] if y - 1 >= FIRST_TABLE_YEAR else 0
            if pc > 0:
                pf = self.first[i - 1]
                pa[0] = self.utc[pf + pc - 1]
                op[0] = self.before[pf + pc - 1]
                o[0] = self.after[pf + pc - 1]
            else:
                pa[0] = days_from_civil(y, 1, 1) * 86400
                op[0] = self.start_off[i]
                o[0] = self.start_off[i]
        if j + 1 < c:
            pb[0] = self.utc[f + j + 1]
        else:
            pb[0] = days_from_civil(y + 1, 1, 1) * 86400
        return 0


_zone_tables = {}
_zone_lock = threading.Lock()


cdef _ZoneTable _zone_table(str name, zone):
    with _zone_lock:
        table = _zone_tables.get(name)
        if table is None:
            table = _zone_tables[name] = _ZoneTable(zone)
        return table


# ---- the evaluator --------------------------------------------------------------------------------

cdef class Cron:
    """A parsed cron expression in a time zone; ``next_after`` gives its fire times.

    Built by :func:`parse` (cached), not directly."""

    cdef readonly str expr
    cdef readonly str timezone
    cdef uint64_t sec, mins, hours, month, dom_bits, dow_bits
    cdef uint64_t dowmask[7]
    cdef int nth[7]
    cdef int six, dom_last, dom_w, dom_star, dow_star, has_nth, mode, hour_star, never
    cdef int first_tod
    cdef _ZoneTable table
    cdef int64_t c_pa, c_pb, c_o, c_op
    cdef int64_t mm_key
    cdef uint64_t mm_mask
    cdef object __weakref__

    def __init__(self, str expr, timezone, spec, zone, fixed_off):
        cdef int wd1, d, w
        cdef uint64_t mask
        self.expr = expr
        self.timezone = timezone
        self.six = spec.six
        self.sec = spec.sec
        self.mins = spec.min
        self.hours = spec.hour
        self.month = spec.month
        self.dom_bits = spec.dom_bits
        self.dom_last = spec.dom_last
        self.dom_w = spec.dom_w
        self.dom_star = spec.dom_star
        self.dow_bits = spec.dow_bits
        self.dow_star = spec.dow_star
        self.has_nth = spec.has_nth
        self.mode = spec.mode
        self.hour_star = spec.hour_star
        self.never = spec.never
        for w in range(7):
            self.nth[w] = spec.nth[w]
        for wd1 in range(7):
            mask = 0
            for d in range(1, 32):
                if (self.dow_bits >> ((wd1 + d - 1) % 7)) & 1:
                    mask |= (<uint64_t>1) << d
            self.dowmask[wd1] = mask
        if fixed_off is None:
            self.table = _zone_table(timezone or "UTC", zone)
            self.c_pa = 0
            self.c_pb = 0  # empty: the first call looks the period up
            self.c_o = 0
            self.c_op = 0
        else:
            self.table = None
            self.c_pa = C_MIN_S - 2 * 86400
            self.c_pb = C_MAX_S
            self.c_o = fixed_off
            self.c_op = fixed_off
        self.mm_key = -1
        self.mm_mask = 0
        self.first_tod = self._tod_next(0)

    def __repr__(self):
        return f"Cron({self.expr!r}, {self.timezone!r})"

    # -- wall-clock search --

    cdef int _tod_next(self, int sod) noexcept:
        """The first matching second of the day >= sod, or -1."""
        cdef int h = sod / 3600
        cdef int r = sod - h * 3600
        cdef int mi = r / 60
        cdef int s = r - mi * 60
        cdef int nh = next_bit(self.hours, h)
        cdef int nm, ns
        if nh != h:
            if nh >= 24:
                return -1
            h = nh
            mi = 0
            s = 0
        while True:
            nm = next_bit(self.mins, mi)
            if nm != mi:
                mi = nm
                s = 0
            if mi < 60:
                ns = next_bit(self.sec, s)
                if ns < 60:
                    return h * 3600 + mi * 60 + ns
                mi += 1
                s = 0
                continue
            h = next_bit(self.hours, h + 1)
            if h >= 24:
                return -1
            mi = 0
            s = 0

    cdef uint64_t _month_mask(self, int y, int m) noexcept:
        cdef int nd = days_in_month(y, m)
        cdef uint64_t valid = ((<uint64_t>1) << (nd + 1)) - 2
        cdef int wd1 = <int>((days_from_civil(y, m, 1) + 4) % 7)
        if wd1 < 0:
            wd1 += 7
        cdef uint64_t domp, dowp
        cdef int day, wd, w, bits, first, count, n
        if self.dom_w:
            day = self.dom_w if self.dom_w < nd else nd
            wd = (wd1 + day - 1) % 7
            if wd == 6:
                day = day - 1 if day > 1 else day + 2
            elif wd == 0:
                day = day + 1 if day < nd else day - 2
            domp = (<uint64_t>1) << day
        elif self.dom_star:
            domp = valid
        else:
            domp = (self.dom_bits & valid) | ((<uint64_t>self.dom_last) << nd)
        if self.has_nth:
            dowp = 0
            for w in range(7):
                bits = self.nth[w]
                if bits:
                    first = 1 + (w - wd1 + 7) % 7
                    count = (nd - first) / 7 + 1
                    for n in range(1, 6):
                        if (bits >> n) & 1 and n <= count:
                            dowp |= (<uint64_t>1) << (first + 7 * (n - 1))
                    if (bits >> C_NTH_LAST) & 1:
                        dowp |= (<uint64_t>1) << (first + 7 * (count - 1))
        elif self.dow_star:
            dowp = valid
        else:
            dowp = self.dowmask[wd1] & valid
        if self.mode == C_MODE_AND:
            return domp & dowp
        if self.mode == C_MODE_OR:
            return domp | dowp
        return (domp if self.dom_w else valid) & (dowp if self.has_nth else valid)

    cdef inline uint64_t _days_mask(self, int y, int m) noexcept:
        cdef int64_t key = y * 16 + m
        if self.mm_key == key:
            return self.mm_mask
        cdef uint64_t mask = self._month_mask(y, m)
        self.mm_key = key
        self.mm_mask = mask
        return mask

    cdef int64_t _wall_next(self, int64_t S) noexcept:
        """The first matching wall-clock second >= S (local wall seconds), or NO_MATCH."""
        cdef int64_t days = fdiv(S, 86400)
        cdef int sod = <int>(S - days * 86400)
        cdef int y, m, d, nm, nd, tod
        cdef uint64_t mask
        civil_from_days(days, &y, &m, &d)
        while y <= C_MAX_YEAR:
            if not (self.month >> m) & 1:
                nm = next_bit(self.month, m + 1)
                if nm > 12:
                    y += 1
                    nm = next_bit(self.month, 1)
                m = nm
                d = 1
                sod = 0
                continue
            mask = self._days_mask(y, m) >> d
            if mask == 0:
                m += 1
                if m > 12:
                    y += 1
                    m = 1
                d = 1
                sod = 0
                continue
            nd = d + fj_ctz64(mask)
            if nd != d:
                d = nd
                sod = 0
            tod = self.first_tod if sod == 0 else self._tod_next(sod)
            if tod < 0:
                d += 1
                sod = 0
                continue
            return days_from_civil(y, m, d) * 86400 + tod
        return NO_MATCH

    # -- periods of one UTC offset --

    cdef inline int _lookup(self, int64_t t, int64_t *pa, int64_t *pb, int64_t *o, int64_t *op) except -1:
        if not (self.c_pa <= t < self.c_pb):
            self.table.period(t, pa, pb, o, op)
            self.c_pa = pa[0]
            self.c_pb = pb[0]
            self.c_o = o[0]
            self.c_op = op[0]
            return 0
        pa[0] = self.c_pa
        pb[0] = self.c_pb
        o[0] = self.c_o
        op[0] = self.c_op
        return 0

    cdef int64_t _next(self, int64_t after_ms) except? -1:
        cdef int64_t t = fdiv(after_ms, 1000)
        cdef bint restricted = not self.hour_star
        cdef int64_t pa, pb, o, op, npa, npb, no, nop, S, W, best, prev_S
        cdef bint have_prev = False
        self._lookup(t, &pa, &pb, &o, &op)
        if self.six:
            S = t + o + 1
        else:
            S = fdiv(t + o, 60) * 60 + 60
        if restricted and o < op:
            S = imax(S, pa + op)  # fixed hours: a repeated wall time fired in its first pass
        best = NO_MATCH
        W = NO_MATCH
        prev_S = 0
        while True:
            if not have_prev or not (prev_S <= S <= W):
                W = self._wall_next(S)
            prev_S = S
            have_prev = True
            if W < pb + o and W - o < best:
                best = W - o
            if best != NO_MATCH:
                return best * 1000
            if pb >= C_MAX_S:
                raise CronError(f"cron expression {self.expr!r} has no fire time before {C_MAX_YEAR}")
            self._lookup(pb, &npa, &npb, &no, &nop)
            S = pb + no
            if restricted:
                if npa == pb and no > nop and W < pb + no:
                    # fixed hours: a wall time skipped by a clock change fires when the clock
                    # reaches it, moved forward in whole minutes (croniter's rule)
                    best = W - fdiv(W - (pb + no), 60) * 60 - no
                if no < nop:
                    S = imax(S, npa + nop)
            pa = npa
            pb = npb
            o = no
            op = nop

    def next_after(self, after_ms):
        """The first fire time strictly after ``after_ms`` (epoch ms), in epoch ms (whole seconds)."""
        if type(after_ms) is not int and not isinstance(after_ms, int):
            raise TypeError(f"after_ms must be an int, got {type(after_ms).__name__}")
        cdef int64_t a
        try:
            a = after_ms
        except OverflowError:
            a = C_MAX_MS
        if not (C_MIN_MS <= a < C_MAX_MS):
            raise CronError(f"after_ms {after_ms} is outside the supported range (years {C_MIN_YEAR}-{C_MAX_YEAR - 1})")
        if self.never:
            raise CronError(f"cron expression {self.expr!r} never fires (no date matches its day and month fields)")
        return self._next(a)


@functools.lru_cache(maxsize=4096)
def parse(expr, timezone):
    """The cron ``expr`` (5 fields, or 6 with seconds first) in ``timezone`` (an IANA name; ""
    is UTC), parsed once and cached by (expr, timezone). Raises :class:`CronError`."""
    spec = _spec(expr)
    zone, fixed = _load_zone(timezone)
    return Cron(expr, timezone, spec, zone, fixed)
