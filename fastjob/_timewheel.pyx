# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Hierarchical timing wheel in C structures (the compiled core of fastjob.timewheel).

Layout and why
--------------
* Time is cut into ticks (default 1 ms: the precision a job scheduler needs; the driver in
  timer.py wakes to within tens of microseconds, and a tick only bounds how late a fire may be
  when its driver visits often enough, while a finer tick means more slots to step through).
* ``LEVELS`` = 6 levels of 64 slots.  64 slots per level means one ``uint64`` "pending" bitmap per
  level, so the next non-empty slot is found with one count-trailing-zeros instruction (Linux's
  timer wheel uses the same 6-bit levels).  Level ``l`` slots are ``64**l`` ticks wide; six
  levels cover 2**36 ticks (about 795 days at 1 ms).  Deadlines further away wait in an overflow
  list and are re-inserted when the wheel's current block of 2**36 ticks reaches them: kept,
  never clamped.
* The wheel is a "digital clock" (Varghese/Kafka style): a timer sits at the lowest level that
  can hold its tick relative to the current tick.  Levels 0-2 are double-buffered: 128 slots,
  the current block of 64 and the next one, so the slot the current tick enters next at
  levels 1-3 already has a place to go one level down.  That slot is cascaded ahead of time,
  a share per visited tick sized to empty it just in time (``_precascade``), instead of all
  at once when time enters it (64k timers, a 6-9 ms stall, every 64 ms under a 1e6/s burst);
  ``next_wakeup()`` tells a driver when to visit for that.  Levels 3-5 are plain 64-slot
  digits; slots of levels 4 and 5 (4.7 hours, 12 days) are still cascaded whole on entry.  Each
  entry keeps its exact float deadline, so cascading loses no precision; ``advance(now)`` fires
  exactly the timers
  whose deadline is ``<= now`` (never early, and never later than the call that follows the
  deadline).  Empty time is skipped with the bitmaps.
* Buckets are contiguous vectors of 16-byte entries (deadline, handle index, low half of the
  insertion sequence), not linked lists: cascading and expiry stream through memory instead
  of chasing pointers through a slab (a 1e6-timer burst costs ~170 ns per expiry in the wheel
  instead of ~430 ns, which went mostly to dependent cache misses).  Vectors grow by 1.5x
  (little slack), are freed when emptied, and a few small ones are pooled for sparse buckets.
* A handle table of 16-byte slots (item, generation, high half of the sequence) in 1024-slot
  chunks (never moved) owns the items.  Handles are ``gen << 32 | index``; a slot's generation
  is bumped when it is reused, so a stale, fired or cancelled handle never cancels a later
  timer.  Entries are never located through the handle table, so cascading never touches it.
  Free slots are kept in a bitmap (one bit per slot, plus one summary bit per 64) and handed out
  next-fit in address order: timers scheduled together sit together in the table however
  scattered the slots that came free were, so a long-running wheel keeps the locality of a
  fresh one (after a million timers fired in random order, scheduling a million more cost
  180-218 ns each with a LIFO free list, 103-126 ns next-fit; cancelling them in order 155-175
  ns, now 76-78 ns).
* Cancel is O(1) and touches only the timer's slot: it releases the item and marks the slot
  cancelled; its bucket entry stays as a tombstone until it is met (expiry, a slot-minimum
  scan, a level-0 minimum check while cascading) or until the table would grow while a
  quarter of it is tombstones (then one pass over the vectors sweeps them).  Only then is the
  slot reused.
* A level-0 slot is sorted by deadline once when time is inside its tick, so repeated
  advances within one tick take the due prefix; each level-0 slot keeps its earliest live
  deadline.  A slot's deadlines lie within its tick, so the sort deals them into n/2..n buckets
  by position in the tick and sorts each small bucket (about linear: a 1e6/s burst spent a
  third of the wheel's time in a comparison sort of ~1000-entry slots).
* Due entries of one tick are resolved through the handle table (prefetched; independent
  loads, not a pointer chase) and sorted by (deadline, sequence) when they fire; ticks are
  visited in order, so the whole batch comes out in deadline order, ties in insertion order.
* ``next_deadline()`` is cached; the cache survives schedules (min update) and advances that
  fire nothing, and is recomputed from the first non-empty slot only when needed (a cancel
  drops it: the handle table does not know the timer's deadline or bucket).
"""

from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.ref cimport PyObject, Py_INCREF
from cpython.float cimport PyFloat_CheckExact, PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_CheckExact
from cpython.number cimport PyNumber_Check
from cpython.list cimport PyList_New
from libc.stdint cimport int32_t, uint32_t, int64_t, uint64_t, INT64_MAX
from libc.math cimport isnan, isinf
from libc.stdlib cimport qsort
from libc.string cimport memmove, memcpy

import time as _time

cdef extern from *:
    void __builtin_prefetch(const void*) nogil
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_clzll(unsigned long long) nogil

cdef extern from "Python.h":
    # Steals the reference: used to hand the wheel's own reference on to the result list.
    void _list_set_item "PyList_SET_ITEM"(object, Py_ssize_t, PyObject*)
    void _decref "Py_DECREF"(PyObject*)
    void _xdecref "Py_XDECREF"(PyObject*)


cdef enum:
    LEVELS = 6
    SLOT_BITS = 6
    SLOT_MASK = 63
    SLOTS = 64                 # slots per block of one level (one 6-bit digit of the tick)
    RING = 128                 # slots of a double-buffered level: this block and the next
    RING_MASK = 127
    RING_LEVELS = 3            # levels 0-2 are double-buffered, 3-5 are plain 64-slot digits
    TOP_BITS = 36              # LEVELS * SLOT_BITS
    OVERFLOW = 576             # 3 * 128 + 3 * 64: bucket index of the overflow list
    NBUCKETS = 577
    NPEND = 9                  # OVERFLOW / 64 pending words
    PREP_BATCH = 256           # entries one visit may cascade ahead before a wake-up is asked for
    CHUNK_BITS = 10            # 1024 handle-table slots (16 KiB) per chunk
    CHUNK = 1024
    CHUNK_MASK = 1023
    MAX_GEN = 0x7fffffff       # keeps handles below 2**63
    POOL = 32                  # small emptied vectors kept for reuse
    POOL_CAP = 4               # ... of at most this many entries

# Ticks are clamped to [-1, MAX_TICK]; clamping is monotonic, so order is preserved, and the
# exact float deadline still decides when a timer fires.
cdef int64_t MAX_TICK = (<int64_t>1) << 62
cdef double MAX_TICK_F = <double>MAX_TICK


ctypedef struct Ent:
    # One pending timer in a bucket vector: 16 bytes, streamed by cascade and expiry.
    double deadline
    uint32_t hidx          # handle-table index
    uint32_t seq_lo        # low half of the insertion sequence (high half in the Slot)


ctypedef struct Slot:
    # Handle-table entry, 16 bytes.  item: owned reference while pending; NULL once cancelled
    # (its Ent is still in a bucket: a tombstone, swept when met); odd when free (free-list link).
    PyObject* item
    uint32_t gen
    uint32_t seq_hi


ctypedef struct VHdr:
    # Header of a bucket vector, followed by cap Ents.
    uint32_t len
    uint32_t cap


ctypedef struct Entry:
    double deadline
    uint64_t seq
    PyObject* item
    uint32_t hidx


cdef int _cmp_entry(const void* a, const void* b) noexcept nogil:
    cdef const Entry* x = <const Entry*>a
    cdef const Entry* y = <const Entry*>b
    if x.deadline < y.deadline:
        return -1
    if x.deadline > y.deadline:
        return 1
    if x.seq < y.seq:
        return -1
    if x.seq > y.seq:
        return 1
    return 0


cdef int _cmp_ent(const void* a, const void* b) noexcept nogil:
    cdef double x = (<const Ent*>a).deadline, y = (<const Ent*>b).deadline
    return -1 if x < y else (1 if x > y else 0)


# The two records sorted in the hot path: delivery Entries by (deadline, sequence), bucket
# Ents by deadline only (their ties are ordered later, by sequence, when they fire).  One
# quicksort serves both; Cython compiles a copy per type, so each keeps its inlined compare.
ctypedef fused Sortable:
    Entry
    Ent


cdef inline bint _lt(const Sortable* a, const Sortable* b) noexcept nogil:
    if Sortable is Entry:
        return a.deadline < b.deadline or (a.deadline == b.deadline and a.seq < b.seq)
    else:
        return a.deadline < b.deadline


cdef void _quicksort(Sortable* e, Py_ssize_t n, int depth) noexcept nogil:
    """Median-of-three quicksort with inlined compares (libc qsort's indirect calls cost
    several times more); past the depth limit it hands over to qsort, so no O(n**2)."""
    cdef Py_ssize_t i, j, mid
    cdef Sortable pivot, tmp
    while n > 16:
        if depth == 0:
            if Sortable is Entry:
                qsort(e, n, sizeof(Entry), _cmp_entry)
            else:
                qsort(e, n, sizeof(Ent), _cmp_ent)
            return
        depth -= 1
        mid = n >> 1
        if _lt(&e[mid], &e[0]):
            tmp = e[mid]; e[mid] = e[0]; e[0] = tmp
        if _lt(&e[n - 1], &e[0]):
            tmp = e[n - 1]; e[n - 1] = e[0]; e[0] = tmp
        if _lt(&e[n - 1], &e[mid]):
            tmp = e[n - 1]; e[n - 1] = e[mid]; e[mid] = tmp
        pivot = e[mid]
        i = -1
        j = n
        while True:
            i += 1
            while _lt(&e[i], &pivot):
                i += 1
            j -= 1
            while _lt(&pivot, &e[j]):
                j -= 1
            if i >= j:
                break
            tmp = e[i]; e[i] = e[j]; e[j] = tmp
        # [0, j] and [j+1, n): recurse into the smaller part, loop on the larger one
        if j + 1 < n - j - 1:
            _quicksort(e, j + 1, depth)
            e += j + 1
            n -= j + 1
        else:
            _quicksort(e + j + 1, n - j - 1, depth)
            n = j + 1
    for i in range(1, n):  # insertion sort of the short rest
        tmp = e[i]
        j = i
        while j > 0 and _lt(&tmp, &e[j - 1]):
            e[j] = e[j - 1]
            j -= 1
        e[j] = tmp


cdef inline int _depth_limit(Py_ssize_t n) noexcept nogil:
    return 2 * (64 - __builtin_clzll(<uint64_t>n | 1))


cdef void _sort_run(Entry* e, Py_ssize_t n) noexcept nogil:
    """Sort one tick's run in place; most runs are already sorted and cost one pass."""
    cdef Py_ssize_t i
    for i in range(1, n):
        if _lt(&e[i], &e[i - 1]):
            break
    else:
        return
    _quicksort(e, n, _depth_limit(n))


cdef void _distribute_ents(Ent* a, Py_ssize_t n, double lo, double width, Ent* tmp) noexcept nogil:
    """Sort one level-0 slot's Ents by deadline in about linear time (a tick's deadlines are
    spread over the tick): deal them by position within [lo, lo + width) into n/2..n buckets,
    sort each small bucket, copy back.  Keys are clamped, so a deadline outside the tick (a
    past one) only lands in the first or last bucket, where _quicksort orders it exactly."""
    cdef uint32_t counts[1025]
    cdef Py_ssize_t i, nb = 16
    cdef uint32_t k, start, end, c
    cdef double scale, x
    while nb < 1024 and nb * 2 <= n:
        nb *= 2
    scale = <double>nb / width
    for i in range(nb + 1):
        counts[i] = 0
    for i in range(n):
        x = (a[i].deadline - lo) * scale
        k = 0 if x < 0.0 else (<uint32_t>(nb - 1) if x >= <double>(nb - 1) else <uint32_t>x)
        counts[k + 1] += 1
    for i in range(1, nb + 1):
        counts[i] += counts[i - 1]
    # counts[k] is now where bucket k starts; deal (stable), advancing counts[k] to its end
    for i in range(n):
        x = (a[i].deadline - lo) * scale
        k = 0 if x < 0.0 else (<uint32_t>(nb - 1) if x >= <double>(nb - 1) else <uint32_t>x)
        tmp[counts[k]] = a[i]
        counts[k] += 1
    start = 0
    for i in range(nb):
        end = counts[i]
        c = end - start
        if c > 1:
            _quicksort(tmp + start, c, _depth_limit(c))
        start = end
    memcpy(a, tmp, <size_t>n * sizeof(Ent))


cdef double _as_seconds(object x, str what) except? -1.0:
    """Accept real numbers only: a str deadline is a bug, NaN/inf would corrupt the ordering."""
    cdef double v
    if PyFloat_CheckExact(x):
        v = PyFloat_AS_DOUBLE(x)
    else:
        if isinstance(x, (str, bytes, bytearray)) or not PyNumber_Check(x):
            raise TypeError(f"{what} must be a real number of seconds, got {type(x).__name__}")
        try:
            v = float(x)
        except OverflowError:
            raise ValueError(f"{what} must be a finite number of seconds, got {x!r}") from None
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a real number of seconds, got {type(x).__name__}") from None
    if isnan(v) or isinf(v):
        raise ValueError(f"{what} must be a finite number of seconds, got {v!r}")
    return v


# Level geometry: bucket base, slot mask and tick shift per level.
cdef int32_t* LBASE = [0, 128, 256, 384, 448, 512]
cdef int32_t* LMASK = [127, 127, 127, 63, 63, 63]


cdef inline int _ring128_first(uint64_t lo, uint64_t hi, int p) noexcept nogil:
    """Distance (0..127) from position p to the first set bit of the 128-bit ring hi:lo,
    going up and wrapping; -1 if none."""
    cdef uint64_t a, b
    cdef int q
    if p == 0:
        a = lo
        b = hi
    elif p < 64:
        a = (lo >> p) | (hi << (64 - p))
        b = (hi >> p) | (lo << (64 - p))
    elif p == 64:
        a = hi
        b = lo
    else:
        q = p - 64
        a = (hi >> q) | (lo << (64 - q))
        b = (lo >> q) | (hi << (64 - q))
    if a:
        return __builtin_ctzll(a)
    if b:
        return 64 + __builtin_ctzll(b)
    return -1


# item value of a free handle-table slot (odd: never an object's address)
cdef PyObject* FREE = <PyObject*>1


cdef inline bint _is_free(PyObject* p) noexcept:
    return (<size_t>p) & 1


cdef class TimingWheel:
    """Hierarchical timing wheel; see the module docstring for the layout."""

    cdef Slot** chunks            # handle table: 1024-slot blocks, never moved
    cdef int32_t nchunks
    cdef int32_t chunks_cap
    cdef int32_t capacity
    cdef uint64_t* fbits          # free handle-table slots, one bit each (1 = free)
    cdef uint64_t* fsum           # bit w set when fbits[w] has a free slot
    cdef int32_t fcursor          # fbits word the next allocation starts looking at
    cdef Py_ssize_t nfree
    cdef Py_ssize_t count         # live (pending) timers
    cdef Py_ssize_t zombies       # cancelled timers whose Ent is still in a bucket
    cdef uint64_t seq
    cdef int64_t cur
    cdef int64_t ov_min
    cdef double origin
    cdef double tick_s
    cdef double inv_tick
    cdef bint min_valid
    cdef double min_deadline
    cdef Entry* out               # delivery buffer of one advance
    cdef Py_ssize_t out_len
    cdef Py_ssize_t out_cap
    cdef uint64_t pending[NPEND]
    cdef uint64_t svalid[2]
    cdef uint64_t ssorted[2]      # level-0 slots whose vector is in deadline order
    cdef VHdr* vec[NBUCKETS]
    cdef VHdr* pool[POOL]         # emptied small vectors kept for reuse (sparse buckets)
    cdef int npool
    cdef double smin[RING]

    def __cinit__(self):
        cdef int k
        self.chunks = NULL
        self.nchunks = 0
        self.chunks_cap = 0
        self.capacity = 0
        self.fbits = NULL
        self.fsum = NULL
        self.fcursor = 0
        self.nfree = 0
        self.count = 0
        self.zombies = 0
        self.seq = 0
        self.cur = 0
        self.out = NULL
        self.out_len = 0
        self.out_cap = 0
        for k in range(NBUCKETS):
            self.vec[k] = NULL
        self.npool = 0
        self._reset_buckets()

    def __init__(self, tick=0.001, now=None):
        cdef double t = _as_seconds(tick, "tick")
        if not t >= 1e-6:
            # (a vanishing tick would overflow the tick arithmetic and the slot sort's scale)
            raise ValueError(f"tick must be >= 1 microsecond (in seconds), got {tick!r}")
        cdef double n = _time.monotonic() if now is None else _as_seconds(now, "now")
        if self.count or self.zombies:
            self.clear()
        self.tick_s = t
        self.inv_tick = 1.0 / t
        self.origin = n
        self.cur = 0

    def __dealloc__(self):
        cdef int32_t i
        cdef int k
        if self.chunks != NULL:
            for i in range(self.capacity):
                if self._s(i).item != NULL and not _is_free(self._s(i).item):
                    _decref(self._s(i).item)
            for i in range(self.nchunks):
                PyMem_Free(self.chunks[i])
            PyMem_Free(self.chunks)
            self.chunks = NULL
        PyMem_Free(self.fbits)
        PyMem_Free(self.fsum)
        self.fbits = NULL
        self.fsum = NULL
        for k in range(NBUCKETS):
            if self.vec[k] != NULL:
                PyMem_Free(self.vec[k])
                self.vec[k] = NULL
        if self.out != NULL:
            PyMem_Free(self.out)
            self.out = NULL
        while self.npool:
            self.npool -= 1
            PyMem_Free(self.pool[self.npool])

    # ---- internals -------------------------------------------------------------------------

    cdef void _reset_buckets(self) noexcept:
        """Free every bucket vector (the caller has dealt with their timers)."""
        cdef int k
        for k in range(NBUCKETS):
            if self.vec[k] != NULL:
                PyMem_Free(self.vec[k])
                self.vec[k] = NULL
        for k in range(NPEND):
            self.pending[k] = 0
        self.svalid[0] = 0
        self.svalid[1] = 0
        self.ssorted[0] = 0
        self.ssorted[1] = 0
        self.ov_min = INT64_MAX
        self.min_valid = False

    cdef inline int64_t _tick_of(self, double d) noexcept:
        cdef double x = (d - self.origin) * self.inv_tick
        if x >= MAX_TICK_F:
            return MAX_TICK
        if x < 0.0:
            return -1
        return <int64_t>x

    cdef inline Slot* _s(self, uint32_t i) noexcept:
        return self.chunks[i >> CHUNK_BITS] + (i & CHUNK_MASK)

    cdef inline Ent* _ents(self, int32_t b) noexcept:
        return <Ent*>(self.vec[b] + 1)

    cdef int _grow(self) except -1:
        cdef int32_t i, base, w, words, sum_words
        cdef Slot* p
        cdef Slot** t
        cdef uint64_t* bits
        cdef int32_t new_tab
        if self.capacity > 0x7fffffff - CHUNK:
            raise MemoryError("TimingWheel: too many pending timers")
        if self.nchunks == self.chunks_cap:
            new_tab = self.chunks_cap * 2 if self.chunks_cap else 8
            t = <Slot**>PyMem_Realloc(self.chunks, <size_t>new_tab * sizeof(Slot*))
            if t == NULL:
                raise MemoryError()
            self.chunks = t
            self.chunks_cap = new_tab
        base = self.capacity
        words = (base + CHUNK) >> 6
        sum_words = (words + 63) >> 6
        # (each step below only enlarges a buffer: a failure leaves the wheel as it was)
        bits = <uint64_t*>PyMem_Realloc(self.fbits, <size_t>words * sizeof(uint64_t))
        if bits == NULL:
            raise MemoryError()
        self.fbits = bits
        bits = <uint64_t*>PyMem_Realloc(self.fsum, <size_t>sum_words * sizeof(uint64_t))
        if bits == NULL:
            raise MemoryError()
        self.fsum = bits
        p = <Slot*>PyMem_Malloc(CHUNK * sizeof(Slot))
        if p == NULL:
            raise MemoryError()
        self.chunks[self.nchunks] = p
        self.nchunks += 1
        for i in range(CHUNK):
            p[i].gen = 1
            p[i].seq_hi = 0
            p[i].item = FREE
        for w in range(((base >> 6) + 63) >> 6, sum_words):
            self.fsum[w] = 0
        for w in range(base >> 6, words):
            self.fbits[w] = ~(<uint64_t>0)
            self.fsum[w >> 6] |= (<uint64_t>1) << (w & 63)
        self.capacity = base + CHUNK
        self.nfree += CHUNK
        return 0

    cdef inline void _free(self, uint32_t i) noexcept:
        cdef uint32_t w = i >> 6
        self._s(i).item = FREE
        self.fbits[w] |= (<uint64_t>1) << (i & 63)
        self.fsum[w >> 6] |= (<uint64_t>1) << (w & 63)
        self.nfree += 1

    cdef inline uint32_t _alloc(self) noexcept:
        """A free slot (the caller made sure there is one), the next one in address order from
        where the last allocation was: timers scheduled together sit together in the table, so
        cancelling or firing them in that order streams through it instead of jumping around
        (a LIFO free list handed out slots in the order the last ones fired: random)."""
        cdef int32_t w = self.fcursor
        cdef uint64_t bits = self.fbits[w]
        if bits == 0:
            w = self._next_free_word(w)
            bits = self.fbits[w]
        self.fbits[w] = bits & (bits - 1)
        if bits & (bits - 1) == 0:
            self.fsum[w >> 6] &= ~((<uint64_t>1) << (w & 63))
        self.fcursor = w
        self.nfree -= 1
        return (<uint32_t>w << 6) | <uint32_t>__builtin_ctzll(bits)

    cdef int32_t _next_free_word(self, int32_t w) noexcept:
        """The first fbits word after w (wrapping around) with a free slot; there is one."""
        cdef int32_t sw = w >> 6
        cdef int32_t nsw = ((self.capacity >> 6) + 63) >> 6
        cdef uint64_t m = self.fsum[sw] & ~((<uint64_t>2 << (w & 63)) - 1)  # words above w
        while m == 0:
            sw += 1
            if sw == nsw:
                sw = 0
            m = self.fsum[sw]
        return (sw << 6) | __builtin_ctzll(m)

    cdef int _reserve(self, int32_t b, uint32_t extra) except -1:
        """Room for `extra` more Ents in bucket b (grows by 1.5x: little slack)."""
        cdef VHdr* v = self.vec[b]
        cdef uint32_t need, cap
        if v == NULL:
            if self.npool and extra <= 1:
                self.npool -= 1
                v = self.pool[self.npool]
                v.len = 0
                self.vec[b] = v
                return 0
            cap = extra
            v = <VHdr*>PyMem_Malloc(sizeof(VHdr) + <size_t>cap * sizeof(Ent))
            if v == NULL:
                raise MemoryError()
            v.len = 0
            v.cap = cap
            self.vec[b] = v
            return 0
        need = v.len + extra
        if need <= v.cap:
            return 0
        cap = v.cap + (v.cap >> 1) + 1
        if cap < need:
            cap = need
        v = <VHdr*>PyMem_Realloc(v, sizeof(VHdr) + <size_t>cap * sizeof(Ent))
        if v == NULL:
            raise MemoryError()
        v.cap = cap
        self.vec[b] = v
        return 0

    cdef int _push(self, int32_t b, Ent* e) except -1:
        cdef VHdr* v = self.vec[b]
        cdef Ent* a
        cdef uint64_t bit = (<uint64_t>1) << (b & 63)
        if v == NULL or v.len == v.cap:
            self._reserve(b, 1)
            v = self.vec[b]
        a = <Ent*>(v + 1)
        a[v.len] = e[0]
        v.len += 1
        if v.len == 1:
            if b < OVERFLOW:
                self.pending[b >> 6] |= bit
            if b < RING:
                self.smin[b] = e.deadline
                self.svalid[b >> 6] |= bit
                self.ssorted[b >> 6] |= bit
        elif b < RING:
            if e.deadline < self.smin[b]:
                self.smin[b] = e.deadline
            if e.deadline < a[v.len - 2].deadline:
                self.ssorted[b >> 6] &= ~bit
        return 0

    cdef inline void _drop(self, int32_t b) noexcept:
        """Free bucket b's vector (emptied); a small one is kept for reuse."""
        if self.vec[b].cap <= POOL_CAP and self.npool < POOL:
            self.pool[self.npool] = self.vec[b]
            self.npool += 1
        else:
            PyMem_Free(self.vec[b])
        self.vec[b] = NULL
        if b < OVERFLOW:
            self.pending[b >> 6] &= ~((<uint64_t>1) << (b & 63))
        if b < RING:
            self.svalid[b >> 6] &= ~((<uint64_t>1) << (b & 63))

    cdef inline int32_t _bucket_for(self, double d) noexcept:
        cdef int64_t t = self._tick_of(d)
        cdef int64_t c = self.cur
        if t < c:
            t = c
        if (t >> 6) - (c >> 6) <= 1:
            return <int32_t>(t & RING_MASK)
        elif (t >> 12) - (c >> 12) <= 1:
            return 128 + <int32_t>((t >> 6) & RING_MASK)
        elif (t >> 18) - (c >> 18) <= 1:
            return 256 + <int32_t>((t >> 12) & RING_MASK)
        elif (t >> 24) == (c >> 24):
            return 384 + <int32_t>((t >> 18) & SLOT_MASK)
        elif (t >> 30) == (c >> 30):
            return 448 + <int32_t>((t >> 24) & SLOT_MASK)
        elif (t >> 36) == (c >> 36):
            return 512 + <int32_t>((t >> 30) & SLOT_MASK)
        if t < self.ov_min:
            self.ov_min = t
        return OVERFLOW

    cdef inline int _place(self, Ent* e) except -1:
        return self._push(self._bucket_for(e.deadline), e)

    cdef inline int _place_moved(self, Ent* e) except -1:
        """Re-place an Ent that may be a tombstone, without touching the handle table unless
        it would lower a level-0 slot's exact minimum (then it is checked, and a tombstone is
        swept).  The first Ent of an empty level-0 slot leaves the slot's minimum unknown."""
        cdef int32_t b = self._bucket_for(e.deadline)
        if b < RING:
            if self.vec[b] == NULL:
                # first of its slot: its minimum is known only once checked (by _slot_min)
                self._push(b, e)
                self.svalid[b >> 6] &= ~((<uint64_t>1) << (b & 63))
                return 0
            if e.deadline < self.smin[b] and (self.svalid[b >> 6] >> (b & 63)) & 1:
                if self._s(e.hidx).item == NULL:
                    self._free(e.hidx)
                    self.zombies -= 1
                    return 0
        return self._push(b, e)

    cdef inline int _first(self, int level) noexcept:
        cdef int shift = level * SLOT_BITS
        cdef int w = LBASE[level] >> 6
        cdef uint64_t b
        if level < RING_LEVELS:
            return _ring128_first(self.pending[w], self.pending[w + 1],
                                  <int>((self.cur >> shift) & RING_MASK))
        b = self.pending[w] >> ((self.cur >> shift) & SLOT_MASK)
        return __builtin_ctzll(b) if b else -1

    cdef inline int64_t _slot_start(self, int level, int d) noexcept:
        cdef int shift = level * SLOT_BITS
        if d == 0:
            return self.cur
        return ((self.cur >> shift) + d) << shift

    cdef inline int32_t _slot_bucket(self, int level, int d) noexcept:
        cdef int shift = level * SLOT_BITS
        return LBASE[level] + <int32_t>(((self.cur >> shift) + d) & LMASK[level])

    cdef int64_t _next_event(self) noexcept:
        cdef int64_t best = INT64_MAX
        cdef int64_t e
        cdef int level, d
        for level in range(LEVELS):
            d = self._first(level)
            if d >= 0:
                e = self._slot_start(level, d)
                if e < best:
                    best = e
        if self.vec[OVERFLOW] != NULL:
            e = (self.ov_min >> TOP_BITS) << TOP_BITS
            if e < self.cur:
                e = self.cur
            if e < best:
                best = e
        return best

    cdef int _move_tail(self, int32_t b, int64_t q) except -1:
        """Re-place up to q Ents from the end of bucket b (cascading); streams the vector,
        tombstones move along untouched (swept when they reach level 0)."""
        cdef VHdr* v
        cdef Ent e
        while q > 0:
            v = self.vec[b]
            if v == NULL:
                break
            e = (<Ent*>(v + 1))[v.len - 1]
            self._place_moved(&e)           # (another bucket: b is the slot being entered)
            v = self.vec[b]
            v.len -= 1
            if v.len == 0:
                self._drop(b)
            q -= 1
        return 0

    cdef int _replace_overflow(self) except -1:
        cdef VHdr* v = self.vec[OVERFLOW]
        cdef Ent* a = <Ent*>(v + 1)
        cdef uint32_t i, n = v.len
        cdef int64_t t
        self.vec[OVERFLOW] = NULL
        self.ov_min = INT64_MAX
        try:
            for i in range(n):
                self._place_moved(&a[i])
        except BaseException:
            # put the rest back (the overflow bucket keeps them)
            while i < n:
                t = self._tick_of(a[i].deadline)
                if t < self.ov_min:
                    self.ov_min = t
                if self._push(OVERFLOW, &a[i]) != 0:
                    break
                i += 1
            PyMem_Free(v)
            raise
        PyMem_Free(v)
        return 0

    cdef int _cascade(self) except -1:
        cdef int level
        cdef int32_t b
        cdef int64_t cur = self.cur
        if self.vec[OVERFLOW] != NULL and (cur >> TOP_BITS) >= (self.ov_min >> TOP_BITS):
            self._replace_overflow()
        for level in range(LEVELS - 1, 0, -1):
            b = self._slot_bucket(level, 0)
            if self.vec[b] != NULL:
                self._move_tail(b, INT64_MAX)
        return 0

    cdef int _precascade(self) except -1:
        cdef int level, shift
        cdef int32_t b
        cdef int64_t y1, left, q
        for level in range(1, RING_LEVELS + 1):
            shift = level * SLOT_BITS
            b = self._slot_bucket(level, 1)
            if self.vec[b] != NULL:
                y1 = (self.cur >> shift) + 1
                left = (y1 << shift) - self.cur
                q = (self.vec[b].len + left - 1) // left
                self._move_tail(b, q)
        return 0

    cdef int _out_reserve(self, Py_ssize_t extra) except -1:
        cdef Entry* o
        cdef Py_ssize_t cap = self.out_cap
        if self.out_len + extra <= cap:
            return 0
        if cap < 1024:
            cap = 1024
        while cap < self.out_len + extra:
            cap *= 2
        o = <Entry*>PyMem_Realloc(self.out, <size_t>cap * sizeof(Entry))
        if o == NULL:
            raise MemoryError()
        self.out = o
        self.out_cap = cap
        return 0

    cdef inline void _take(self, Ent* e) noexcept:
        """Move a due Ent's timer to the delivery buffer (room reserved by the caller); a
        tombstone is swept instead."""
        cdef Slot* s = self._s(e.hidx)
        cdef Entry* o
        if s.item == NULL:
            self._free(e.hidx)
            self.zombies -= 1
            return
        o = self.out + self.out_len
        o.deadline = e.deadline
        o.seq = ((<uint64_t>s.seq_hi) << 32) | e.seq_lo
        o.item = s.item
        o.hidx = e.hidx
        self.out_len += 1

    cdef int _collect(self, int32_t slot, double now, bint partial) except -1:
        """Move the due Ents of a level-0 slot to the delivery buffer, sorted as one run."""
        cdef VHdr* v = self.vec[slot]
        cdef Ent* a = <Ent*>(v + 1)
        cdef uint32_t i, n = v.len, k
        cdef Py_ssize_t start = self.out_len
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        self._out_reserve(n)      # (the only step that can fail: before anything moves)
        if not partial:
            for i in range(n):
                if i + 8 < n:
                    __builtin_prefetch(self._s(a[i + 8].hidx))
                self._take(&a[i])
            self._drop(slot)
        else:
            if not (self.ssorted[slot >> 6] & bit):
                if n > 32:
                    # the reserved, still unused delivery buffer (32 B per Ent) is the scratch
                    _distribute_ents(a, n, self.origin + <double>self.cur * self.tick_s, self.tick_s,
                                     <Ent*>(self.out + self.out_len))
                else:
                    _quicksort(a, n, _depth_limit(n))
                self.ssorted[slot >> 6] |= bit
            i = 0
            while i < n:
                if i + 8 < n:
                    __builtin_prefetch(self._s(a[i + 8].hidx))
                if a[i].deadline > now:
                    if self._s(a[i].hidx).item != NULL:
                        break
                    self._free(a[i].hidx)     # tombstone at the head
                    self.zombies -= 1
                else:
                    self._take(&a[i])
                i += 1
            if i == n:
                self._drop(slot)
            else:
                if i:
                    memmove(a, a + i, (n - i) * sizeof(Ent))
                    v.len = n - i
                self.smin[slot] = a[0].deadline
                self.svalid[slot >> 6] |= bit
        _sort_run(self.out + start, self.out_len - start)
        return 0

    cdef void _restore_out(self) noexcept:
        """Put the delivery buffer's timers back in the wheel (after a MemoryError)."""
        cdef Py_ssize_t j
        cdef Ent e
        for j in range(self.out_len):
            e.deadline = self.out[j].deadline
            e.hidx = self.out[j].hidx
            e.seq_lo = <uint32_t>(self.out[j].seq & 0xffffffffu)
            try:
                self._place(&e)
            except BaseException:
                pass   # out of memory twice: nothing better to do than keep going
        self.out_len = 0

    cdef bint _slot_min(self, int32_t b, double* out) except? -1:
        """Earliest live deadline of bucket b (sweeping tombstones met on the way)."""
        cdef VHdr* v = self.vec[b]
        cdef Ent* a
        cdef uint32_t i, w = 0, n
        cdef double m = 0.0
        cdef bint found = False
        if b < RING and (self.svalid[b >> 6] >> (b & 63)) & 1:
            out[0] = self.smin[b]
            return True
        if v == NULL:
            return False
        a = <Ent*>(v + 1)
        n = v.len
        for i in range(n):
            if i + 8 < n:
                __builtin_prefetch(self._s(a[i + 8].hidx))
            if self._s(a[i].hidx).item == NULL:
                self._free(a[i].hidx)
                self.zombies -= 1
            else:
                if not found or a[i].deadline < m:
                    m = a[i].deadline
                    found = True
                a[w] = a[i]
                w += 1
        if w == 0:
            self._drop(b)
            return False
        v.len = w
        if b < RING:
            self.smin[b] = m
            self.svalid[b >> 6] |= (<uint64_t>1) << (b & 63)
        out[0] = m
        return True

    cdef double _compute_min(self) except? -1.0:
        cdef int level, d
        cdef int64_t start, best_tick = INT64_MAX
        cdef double best = 0.0, m
        cdef bint found = False
        for level in range(LEVELS):
            while True:
                d = self._first(level)
                if d < 0:
                    break
                start = self._slot_start(level, d)
                if found and start > best_tick and start > self.cur:
                    break
                if self._slot_min(self._slot_bucket(level, d), &m):
                    if not found or m < best:
                        best = m
                        best_tick = self._tick_of(m)
                        found = True
                    break
        if self.vec[OVERFLOW] != NULL and (not found or self.ov_min <= best_tick):
            if self._slot_min(OVERFLOW, &m) and (not found or m < best):
                best = m
        return best

    cdef void _compact(self) noexcept:
        """Sweep every tombstone: one pass over the buckets."""
        cdef int32_t b
        cdef VHdr* v
        cdef Ent* a
        cdef uint32_t i, w
        for b in range(NBUCKETS):
            v = self.vec[b]
            if v == NULL:
                continue
            a = <Ent*>(v + 1)
            w = 0
            for i in range(v.len):
                if self._s(a[i].hidx).item == NULL:
                    self._free(a[i].hidx)
                else:
                    a[w] = a[i]
                    w += 1
            if w == 0:
                self._drop(b)
            else:
                v.len = w
        self.svalid[0] = 0
        self.svalid[1] = 0
        self.zombies = 0

    # ---- public API ------------------------------------------------------------------------

    @property
    def tick(self) -> float:
        return self.tick_s

    def schedule(self, deadline, item) -> int:
        """Keep a reference to item until it fires at deadline or is cancelled; return a handle."""
        cdef double d = _as_seconds(deadline, "deadline")
        cdef int32_t b
        cdef uint32_t i
        cdef Slot* s
        cdef Ent e
        if self.nfree == 0:
            if self.zombies * 4 >= self.capacity and self.zombies > 0:
                self._compact()
            if self.nfree == 0:
                self._grow()
        b = self._bucket_for(d)
        self._reserve(b, 1)
        i = self._alloc()
        s = self._s(i)
        s.gen = s.gen + 1 if s.gen < MAX_GEN else 1
        self.seq += 1
        s.seq_hi = <uint32_t>(self.seq >> 32)
        Py_INCREF(item)
        s.item = <PyObject*>item
        e.deadline = d
        e.hidx = i
        e.seq_lo = <uint32_t>(self.seq & 0xffffffffu)
        self._push(b, &e)
        self.count += 1
        if self.count == 1:
            self.min_deadline = d
            self.min_valid = True
        elif self.min_valid and d < self.min_deadline:
            self.min_deadline = d
        return ((<uint64_t>s.gen) << 32) | <uint64_t>i

    def cancel(self, handle) -> bool:
        """Drop a pending timer; False (and no effect) for any handle that is not pending.

        O(1), touching only the timer's handle-table entry: the item is released and the
        handle made stale now; its bucket entry stays as a tombstone until next met.
        """
        cdef uint64_t h
        cdef uint32_t i
        cdef Slot* s
        cdef PyObject* item
        if not PyLong_CheckExact(handle):
            if not isinstance(handle, int) or isinstance(handle, bool):
                return False
        try:
            h = handle
        except OverflowError:
            return False
        i = <uint32_t>(h & 0xffffffffu)
        if i >= <uint32_t>self.capacity:
            return False
        s = self._s(i)
        item = s.item
        if item == NULL or _is_free(item) or <uint64_t>s.gen != (h >> 32):
            return False
        s.item = NULL
        self.svalid[0] = 0
        self.svalid[1] = 0
        self.min_valid = False
        self.count -= 1
        self.zombies += 1
        _decref(item)
        return True

    def advance(self, now) -> list:
        """Remove and return the items with deadline <= now, in deadline order (ties: FIFO)."""
        cdef double n = _as_seconds(now, "now")
        cdef int64_t T = self._tick_of(n)
        cdef int64_t E
        cdef int32_t slot
        cdef Py_ssize_t k, j
        cdef list result
        if self.count == 0:
            if self.zombies:
                self._compact()
            if T > self.cur:
                self.cur = T
            return []
        self.out_len = 0
        try:
            if T <= self.cur:
                if self.min_valid and self.min_deadline > n:
                    return []
                slot = <int32_t>(self.cur & RING_MASK)
                if self.vec[slot] != NULL:
                    self._collect(slot, n, True)
            else:
                while True:
                    E = self._next_event()
                    if E > T:
                        break
                    self.cur = E
                    self._cascade()
                    slot = <int32_t>(E & RING_MASK)
                    if self.vec[slot] != NULL:
                        self._collect(slot, n, E == T)
                    if E == T:
                        break
                    self._precascade()
                    self.cur = E + 1
                self.cur = T
                self._precascade()
            k = self.out_len
            if k == 0:
                return []
            result = PyList_New(k)
        except BaseException:
            self._restore_out()
            self.min_valid = False
            raise
        for j in range(k):
            if j + 8 < k:
                __builtin_prefetch(self._s(self.out[j + 8].hidx))
            if j + 16 < k:
                # The consumer will touch each item (a list iteration increfs it): start
                # loading them now, many at a time, rather than one miss after another later.
                __builtin_prefetch(self.out[j + 16].item)
            self._free(self.out[j].hidx)
            _list_set_item(result, j, self.out[j].item)
        self.out_len = 0
        if self.out_cap > 8192:
            PyMem_Free(self.out)
            self.out = NULL
            self.out_cap = 0
        self.count -= k
        self.min_valid = False
        return result

    def next_deadline(self):
        """Earliest pending deadline (exact), or None when empty."""
        if self.count == 0:
            return None
        if not self.min_valid:
            self.min_deadline = self._compute_min()
            self.min_valid = True
        return self.min_deadline

    def next_wakeup(self):
        """When a driver should next call advance(): the earliest deadline, or earlier when a
        large upper-level slot is coming and should be cascaded a share per tick ahead of time
        (so that its cascade is never one long stall).  None when empty."""
        cdef double nd, w
        cdef int level, shift, d, d2, p
        cdef int32_t b
        cdef int64_t entry, x, best = INT64_MAX, c
        if self.count == 0:
            return None
        nd = self.next_deadline()
        for level in range(1, RING_LEVELS + 1):
            shift = level * SLOT_BITS
            d = self._first(level)
            while d >= 1:
                b = self._slot_bucket(level, d)
                c = self.vec[b].len if self.vec[b] != NULL else 0
                if c > PREP_BATCH:
                    entry = self._slot_start(level, d)
                    x = entry - (c + PREP_BATCH - 1) // PREP_BATCH
                    if x < entry - ((<int64_t>1) << shift):
                        x = entry - ((<int64_t>1) << shift)
                    if x <= self.cur:
                        x = self.cur + 1
                    if x < best:
                        best = x
                    break
                if level < RING_LEVELS:
                    p = <int>(((self.cur >> shift) + d + 1) & RING_MASK)
                    d2 = _ring128_first(self.pending[LBASE[level] >> 6],
                                        self.pending[(LBASE[level] >> 6) + 1], p)
                    if d2 < 0 or d + 1 + d2 >= RING:
                        break
                    d = d + 1 + d2
                else:
                    p = <int>((self.cur >> shift) & SLOT_MASK) + d + 1
                    if p >= SLOTS or (self.pending[LBASE[level] >> 6] >> p) == 0:
                        break
                    d = d + 1 + __builtin_ctzll(self.pending[LBASE[level] >> 6] >> p)
        if best != INT64_MAX:
            w = self.origin + <double>best * self.tick_s
            if w < nd:
                return w
        return nd

    def clear(self) -> None:
        """Drop every pending timer (their handles become stale)."""
        cdef int32_t i
        cdef Py_ssize_t k = 0
        cdef list items
        cdef Slot* s
        if self.count == 0 and self.zombies == 0:
            return
        items = PyList_New(self.count)
        for i in range(self.capacity):
            s = self._s(i)
            if s.item != NULL and not _is_free(s.item):
                _list_set_item(items, k, s.item)
                k += 1
                s.item = FREE
                self._free(i)
            elif s.item == NULL:
                self._free(i)
        self.fcursor = 0
        self.count = 0
        self.zombies = 0
        self._reset_buckets()
        del items

    def memory_usage(self) -> int:
        """Bytes held by this wheel: the object, its handle table and bucket vectors."""
        cdef Py_ssize_t total = (type(self).__basicsize__
                                 + <Py_ssize_t>self.capacity * <Py_ssize_t>sizeof(Slot)
                                 + <Py_ssize_t>self.chunks_cap * <Py_ssize_t>sizeof(Slot*)
                                 + self.out_cap * <Py_ssize_t>sizeof(Entry)
                                 + <Py_ssize_t>(self.capacity >> 6) * 8
                                 + <Py_ssize_t>(((self.capacity >> 6) + 63) >> 6) * 8)
        cdef int k
        for k in range(NBUCKETS):
            if self.vec[k] != NULL:
                total += sizeof(VHdr) + <Py_ssize_t>self.vec[k].cap * <Py_ssize_t>sizeof(Ent)
        for k in range(self.npool):
            total += sizeof(VHdr) + <Py_ssize_t>self.pool[k].cap * <Py_ssize_t>sizeof(Ent)
        return total

    @staticmethod
    def node_size() -> int:
        """Bytes per timer in C: one bucket entry plus one handle-table entry."""
        return sizeof(Ent) + sizeof(Slot)

    def __len__(self) -> int:
        return self.count
