# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Hierarchical timing wheel in C structures (the compiled core of fastjob.timewheel).

Layout and why
--------------
* Time is cut into ticks (default 1 ms: the granularity of uvloop's clock and of epoll timeouts,
  so a finer tick buys nothing for a driver on an event loop).
* ``LEVELS`` = 6 levels of 64 slots.  64 slots per level means one ``uint64`` "pending" bitmap per
  level, so the next non-empty slot is found with one count-trailing-zeros instruction (Linux's
  timer wheel uses the same 6-bit levels).  Level ``l`` slots are ``64**l`` ticks wide; six
  levels cover 2**36 ticks (about 795 days at 1 ms).  Deadlines further away wait in an overflow
  list and are re-inserted when the wheel's current block of 2**36 ticks reaches them: kept,
  never clamped.
* The wheel is a "digital clock" (Varghese/Kafka style): a node sits at the lowest level that
  can hold its tick relative to the current tick.  Levels 0-2 are double-buffered: 128 slots,
  the current block of 64 and the next one, so the slot the current tick enters next at
  levels 1-3 already has a place to go one level down.  That slot is cascaded ahead of time,
  a share per visited tick sized to empty it just in time (``_precascade``), instead of all
  at once when time enters it (64k nodes, a 6-9 ms stall, every 64 ms under a 1e6/s burst);
  ``next_wakeup()`` tells a driver when to visit for that.  Levels 3-5 are plain 64-slot
  digits; slots of levels 4 and 5 (4.7 hours, 12 days) are still cascaded whole on entry.  Each node keeps its exact
  float deadline, so cascading loses no precision; ``advance(now)`` fires exactly the nodes
  whose deadline is ``<= now`` (never early, and never later than the call that follows the
  deadline).  Empty time is skipped with the bitmaps.
* Cancel is O(1) and touches only the timer's node: it releases the item and bumps the
  generation; the node stays linked as a "zombie" until its slot is next walked, or until the
  slab would grow while a quarter of it is zombies (then one sequential pass frees them).
* A level-0 slot is sorted once when time is inside its tick, so repeated advances within
  one tick take the due prefix instead of walking the slot; each keeps its earliest deadline.
* Nodes are 40-byte C structs in a slab of 1024-node chunks (never moved, no realloc copy; at
  most one chunk of slack), addressed by 32-bit indices so links cost 4 bytes, with an
  intrusive free list.
  Bucket lists are doubly linked through node indices, so cancel is O(1).  The only Python
  object per timer is the caller's item, whose reference the wheel owns while it is pending.
* Handles are ``gen << 32 | index``; a node's generation is bumped whenever it is freed, so a
  stale, fired or cancelled handle can never cancel a later timer that reuses the node.
* Due nodes of one tick are sorted by (deadline, insertion sequence) when they fire; ticks are
  visited in order, so the whole batch comes out in deadline order, ties in insertion order.
* ``next_deadline()`` is cached; the cache survives schedules (min update) and advances that
  fire nothing, and is recomputed from the first non-empty slot only when needed.
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

import time as _time

cdef extern from *:
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
    NCOUNTED = 448             # buckets 0..447 (levels 0-3) keep a node count
    PREP_BATCH = 256           # nodes one visit may cascade ahead before a wake-up is asked for
    NIL = -1                   # "no node" in links and list heads
    B_FREE = -1                # node.bucket of a node on the free list
    B_FIRED = -2               # node.bucket of a node on the private fired chain
    GROUP_START = -2           # node.prev on the fired chain: first node of one tick's run
    CHUNK_BITS = 10            # 1024 nodes (40 KiB) per slab chunk
    CHUNK = 1024
    CHUNK_MASK = 1023
    MAX_GEN = 0x7fffffff       # keeps handles below 2**63

# Ticks are clamped to [-1, MAX_TICK]; clamping is monotonic, so order is preserved, and the
# exact float deadline still decides when a node fires.
cdef int64_t MAX_TICK = (<int64_t>1) << 62
cdef double MAX_TICK_F = <double>MAX_TICK


ctypedef struct Node:
    double deadline
    uint64_t seq           # global insertion counter: tie-break for equal deadlines
    PyObject* item         # owned reference while pending
    int32_t next
    int32_t prev
    uint32_t gen
    int32_t bucket         # level * 64 + slot, OVERFLOW, B_FREE or B_FIRED


ctypedef struct Entry:
    double deadline
    uint64_t seq
    PyObject* item


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


cdef inline bint _lt(const Entry* a, const Entry* b) noexcept nogil:
    return a.deadline < b.deadline or (a.deadline == b.deadline and a.seq < b.seq)


cdef void _insertion_sort(Entry* e, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef Entry tmp
    for i in range(1, n):
        tmp = e[i]
        j = i
        while j > 0 and _lt(&tmp, &e[j - 1]):
            e[j] = e[j - 1]
            j -= 1
        e[j] = tmp


cdef void _quicksort(Entry* e, Py_ssize_t n, int depth) noexcept nogil:
    """Median-of-three quicksort with inlined compares (libc qsort's indirect calls cost
    several times more); past the depth limit it hands over to qsort, so no O(n**2)."""
    cdef Py_ssize_t i, j, mid
    cdef Entry pivot, tmp
    while n > 16:
        if depth == 0:
            qsort(e, n, sizeof(Entry), _cmp_entry)
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
    _insertion_sort(e, n)


cdef void _sort_run(Entry* e, Py_ssize_t n) noexcept nogil:
    """Sort one tick's run in place; most runs are already sorted and cost one pass."""
    cdef Py_ssize_t i
    cdef int depth = 0
    for i in range(1, n):
        if _lt(&e[i], &e[i - 1]):
            break
    else:
        return
    i = n
    while i:
        depth += 2
        i >>= 1
    _quicksort(e, n, depth)


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


cdef class TimingWheel:
    """Hierarchical timing wheel; see the module docstring for the layout."""

    cdef Node** chunks            # slab: table of 1024-node blocks, never moved once allocated
    cdef int32_t nchunks
    cdef int32_t chunks_cap
    cdef int32_t capacity
    cdef int32_t free_head
    cdef Py_ssize_t count         # live (pending) timers
    cdef Py_ssize_t zombies       # cancelled nodes still linked in a bucket (item == NULL)
    cdef uint64_t seq
    cdef int64_t cur              # current tick: every node with a tick < cur has fired
    cdef int64_t ov_min           # lower bound of the overflow list's ticks
    cdef double origin
    cdef double tick_s
    cdef double inv_tick
    cdef bint min_valid
    cdef double min_deadline
    cdef uint64_t pending[NPEND]
    cdef uint64_t svalid[2]       # level-0 slots whose smin is the exact minimum
    cdef uint64_t ssorted[2]      # level-0 slots whose list is in (deadline, seq) order
    cdef int32_t head[NBUCKETS]
    cdef int32_t tail[RING]       # level 0 only (its lists are spliced whole onto the fired chain)
    cdef int32_t cnt[NCOUNTED]    # linked nodes (live and cancelled) per bucket of levels 0-3
    cdef double smin[RING]        # earliest deadline per level-0 slot (when svalid)

    def __cinit__(self):
        self.chunks = NULL
        self.nchunks = 0
        self.chunks_cap = 0
        self.capacity = 0
        self.free_head = NIL
        self.count = 0
        self.zombies = 0
        self.seq = 0
        self.cur = 0
        self._reset_buckets()

    def __init__(self, tick=0.001, now=None):
        # (no annotations here: Cython would turn `tick: float` into an unchecked C double)
        cdef double t = _as_seconds(tick, "tick")
        if t <= 0.0:
            raise ValueError(f"tick must be > 0 seconds, got {tick!r}")
        cdef double n = _time.monotonic() if now is None else _as_seconds(now, "now")
        if self.count or self.zombies:
            self.clear()
        self.tick_s = t
        self.inv_tick = 1.0 / t
        self.origin = n
        self.cur = 0

    def __dealloc__(self):
        cdef int32_t i
        if self.chunks != NULL:
            for i in range(self.capacity):
                if self._n(i).bucket >= 0:
                    _xdecref(self._n(i).item)
            for i in range(self.nchunks):
                PyMem_Free(self.chunks[i])
            PyMem_Free(self.chunks)
            self.chunks = NULL

    # ---- internals -------------------------------------------------------------------------

    cdef void _reset_buckets(self) noexcept:
        cdef int k
        for k in range(NBUCKETS):
            self.head[k] = NIL
        for k in range(RING):
            self.tail[k] = NIL
        for k in range(NCOUNTED):
            self.cnt[k] = 0
        for k in range(NPEND):
            self.pending[k] = 0
        self.svalid[0] = 0
        self.svalid[1] = 0
        self.ssorted[0] = 0
        self.ssorted[1] = 0
        self.ov_min = INT64_MAX
        self.min_valid = False

    cdef inline int64_t _tick_of(self, double d) noexcept:
        # Monotonic in d (IEEE subtraction/multiplication round monotonically), which is all
        # the wheel needs: d > now implies tick(d) >= tick(now).
        cdef double x = (d - self.origin) * self.inv_tick
        if x >= MAX_TICK_F:
            return MAX_TICK
        if x < 0.0:
            return -1
        return <int64_t>x

    cdef inline Node* _n(self, int32_t i) noexcept:
        return self.chunks[i >> CHUNK_BITS] + (i & CHUNK_MASK)

    cdef int _grow(self) except -1:
        """Add one chunk of CHUNK free nodes.

        Chunks instead of one realloc'ed array: no copy (a 40 MB realloc would stall the event
        loop), and the slack is at most one chunk, which keeps bytes per timer near 40.
        """
        cdef int32_t i, base
        cdef Node* p
        cdef Node** t
        cdef int32_t new_tab
        if self.capacity > 0x7fffffff - CHUNK:
            raise MemoryError("TimingWheel: too many pending timers")
        if self.nchunks == self.chunks_cap:
            new_tab = self.chunks_cap * 2 if self.chunks_cap else 8
            t = <Node**>PyMem_Realloc(self.chunks, <size_t>new_tab * sizeof(Node*))
            if t == NULL:
                raise MemoryError()
            self.chunks = t
            self.chunks_cap = new_tab
        p = <Node*>PyMem_Malloc(CHUNK * sizeof(Node))
        if p == NULL:
            raise MemoryError()
        self.chunks[self.nchunks] = p
        self.nchunks += 1
        base = self.capacity
        for i in range(CHUNK):
            p[i].item = NULL
            p[i].gen = 1
            p[i].bucket = B_FREE
            p[i].prev = NIL
            p[i].next = base + i + 1
        p[CHUNK - 1].next = self.free_head
        self.free_head = base
        self.capacity = base + CHUNK
        return 0

    cdef inline void _free(self, int32_t i) noexcept:
        cdef Node* n = self._n(i)
        n.item = NULL
        n.bucket = B_FREE
        n.gen = n.gen + 1 if n.gen < MAX_GEN else 1
        n.next = self.free_head
        self.free_head = i

    cdef inline void _link(self, int32_t i, int32_t b) noexcept:
        """Level 0 appends (its lists are spliced whole); other buckets prepend."""
        cdef Node* n = self._n(i)
        cdef int32_t t
        cdef uint64_t bit = (<uint64_t>1) << (b & 63)
        n.bucket = b
        if b < RING:
            t = self.tail[b]
            n.next = NIL
            n.prev = t
            if t == NIL:
                self.head[b] = i
                self.pending[b >> 6] |= bit
                self.smin[b] = n.deadline
                self.svalid[b >> 6] |= bit
                self.ssorted[b >> 6] |= bit
            else:
                self._n(t).next = i
                if n.deadline < self.smin[b]:
                    self.smin[b] = n.deadline
                if n.deadline < self._n(t).deadline:   # (seq only grows on schedule)
                    self.ssorted[b >> 6] &= ~bit
            self.tail[b] = i
        else:
            t = self.head[b]
            n.prev = NIL
            n.next = t
            if t == NIL:
                if b < OVERFLOW:
                    self.pending[b >> 6] |= bit
            else:
                self._n(t).prev = i
            self.head[b] = i
        if b < NCOUNTED:
            self.cnt[b] += 1

    cdef inline void _unlink(self, int32_t i) noexcept:
        cdef Node* n = self._n(i)
        cdef int32_t b = n.bucket
        if n.prev != NIL:
            self._n(n.prev).next = n.next
        else:
            self.head[b] = n.next
        if n.next != NIL:
            self._n(n.next).prev = n.prev
        elif b < RING:
            self.tail[b] = n.prev
        if b < NCOUNTED:
            self.cnt[b] -= 1
        if b < RING and n.deadline <= self.smin[b]:
            self.svalid[b >> 6] &= ~((<uint64_t>1) << (b & 63))
        if self.head[b] == NIL and b < OVERFLOW:
            self.pending[b >> 6] &= ~((<uint64_t>1) << (b & 63))

    cdef inline void _place(self, int32_t i) noexcept:
        """Put node i in the lowest level that can hold its tick, relative to the current tick.

        Levels 0-2 hold their current block of 64 slots and the next one (a node may sit one
        block early), levels 3-5 only their current block (the classic digital clock).
        """
        cdef int64_t t = self._tick_of(self._n(i).deadline)
        cdef int64_t c = self.cur
        if t < c:
            t = c           # already due: fires at the next advance
        if (t >> 6) - (c >> 6) <= 1:
            self._link(i, <int32_t>(t & RING_MASK))
        elif (t >> 12) - (c >> 12) <= 1:
            self._link(i, 128 + <int32_t>((t >> 6) & RING_MASK))
        elif (t >> 18) - (c >> 18) <= 1:
            self._link(i, 256 + <int32_t>((t >> 12) & RING_MASK))
        elif (t >> 24) == (c >> 24):
            self._link(i, 384 + <int32_t>((t >> 18) & SLOT_MASK))
        elif (t >> 30) == (c >> 30):
            self._link(i, 448 + <int32_t>((t >> 24) & SLOT_MASK))
        elif (t >> 36) == (c >> 36):
            self._link(i, 512 + <int32_t>((t >> 30) & SLOT_MASK))
        else:
            if t < self.ov_min:
                self.ov_min = t
            self._link(i, OVERFLOW)

    cdef inline int _first(self, int level) noexcept:
        """Distance from the current block to the first non-empty slot of a level, or -1."""
        cdef int shift = level * SLOT_BITS
        cdef int w = LBASE[level] >> 6
        cdef uint64_t b
        if level < RING_LEVELS:
            return _ring128_first(self.pending[w], self.pending[w + 1],
                                  <int>((self.cur >> shift) & RING_MASK))
        b = self.pending[w] >> ((self.cur >> shift) & SLOT_MASK)
        return __builtin_ctzll(b) if b else -1

    cdef inline int64_t _slot_start(self, int level, int d) noexcept:
        """First tick of the slot d blocks after the current one (the current tick for d=0)."""
        cdef int shift = level * SLOT_BITS
        if d == 0:
            return self.cur
        return ((self.cur >> shift) + d) << shift

    cdef inline int32_t _slot_bucket(self, int level, int d) noexcept:
        cdef int shift = level * SLOT_BITS
        return LBASE[level] + <int32_t>(((self.cur >> shift) + d) & LMASK[level])

    cdef int64_t _next_event(self) noexcept:
        """Smallest tick >= cur at which a slot fires or cascades (INT64_MAX if none)."""
        cdef int64_t best = INT64_MAX
        cdef int64_t e
        cdef int level, d
        for level in range(LEVELS):
            d = self._first(level)
            if d >= 0:
                e = self._slot_start(level, d)
                if e < best:
                    best = e
        if self.head[OVERFLOW] != NIL:
            e = (self.ov_min >> TOP_BITS) << TOP_BITS
            if e < self.cur:
                e = self.cur
            if e < best:
                best = e
        return best

    cdef void _replace_list(self, int32_t b) noexcept:
        """Detach bucket b and re-place its nodes (cascading); cancelled ones are freed."""
        cdef int32_t i = self.head[b]
        cdef int32_t nxt
        self.head[b] = NIL
        if b < RING:
            self.tail[b] = NIL
        if b < NCOUNTED:
            self.cnt[b] = 0
        if b < OVERFLOW:
            self.pending[b >> 6] &= ~((<uint64_t>1) << (b & 63))
        else:
            self.ov_min = INT64_MAX
        while i != NIL:
            nxt = self._n(i).next
            if self._n(i).item == NULL:
                self._free(i)
                self.zombies -= 1
            else:
                self._place(i)
            i = nxt

    cdef void _cascade(self) noexcept:
        """Bring down every upper-level slot (and the overflow list) the current tick entered."""
        cdef int level
        cdef int32_t b
        cdef int64_t cur = self.cur
        if self.head[OVERFLOW] != NIL and (cur >> TOP_BITS) >= (self.ov_min >> TOP_BITS):
            self._replace_list(OVERFLOW)
        for level in range(LEVELS - 1, 0, -1):
            b = self._slot_bucket(level, 0)
            if self.head[b] != NIL:
                self._replace_list(b)

    cdef void _precascade(self) noexcept:
        """Spread the next cascade over the ticks before it.

        For levels 1-3, the slot the current tick enters next already belongs one level down
        (levels 0-2 keep a second block of slots for it).  Each visited tick moves a share of
        it, sized so that it is empty when its time comes: no 64k-node stall at a boundary.
        """
        cdef int level, shift
        cdef int32_t b, i
        cdef int64_t y1, left, q
        for level in range(1, RING_LEVELS + 1):
            shift = level * SLOT_BITS
            b = self._slot_bucket(level, 1)
            if self.cnt[b]:
                y1 = (self.cur >> shift) + 1
                left = (y1 << shift) - self.cur
                q = (self.cnt[b] + left - 1) // left
                while q > 0:
                    i = self.head[b]
                    if i == NIL:
                        break
                    self._unlink(i)
                    if self._n(i).item == NULL:
                        self._free(i)
                        self.zombies -= 1
                    else:
                        self._place(i)
                    q -= 1

    cdef void _sort_slot(self, int32_t slot) noexcept:
        """Re-link a level-0 slot in (deadline, seq) order, freeing its cancelled nodes.
        (Entry.item carries the node index here.)  On MemoryError the slot stays unsorted."""
        cdef Py_ssize_t k = 0, j
        cdef int32_t i, nxt, prev
        cdef Node* n
        cdef Entry* e = <Entry*>PyMem_Malloc(<size_t>(self.cnt[slot] + 1) * sizeof(Entry))
        if e == NULL:
            return
        i = self.head[slot]
        while i != NIL:
            n = self._n(i)
            nxt = n.next
            if n.item == NULL:
                self._unlink(i)
                self._free(i)
                self.zombies -= 1
            else:
                e[k].deadline = n.deadline
                e[k].seq = n.seq
                e[k].item = <PyObject*><size_t>i
                k += 1
            i = nxt
        _sort_run(e, k)
        prev = NIL
        for j in range(k):
            i = <int32_t><size_t>e[j].item
            n = self._n(i)
            n.prev = prev
            n.next = NIL
            if prev == NIL:
                self.head[slot] = i
            else:
                self._n(prev).next = i
            prev = i
        self.tail[slot] = prev
        PyMem_Free(e)
        self.ssorted[slot >> 6] |= (<uint64_t>1) << (slot & 63)
        if k:
            self.smin[slot] = self._n(self.head[slot]).deadline
            self.svalid[slot >> 6] |= (<uint64_t>1) << (slot & 63)

    cdef Py_ssize_t _collect(self, int32_t slot, double now, bint partial,
                             int32_t* fh, int32_t* ft) noexcept:
        """Move the due nodes of a level-0 slot to the fired chain, as one run; returns how
        many nodes (live or cancelled) it moved."""
        cdef int32_t i, nxt, first
        cdef Py_ssize_t moved = 0
        cdef Node* n
        cdef double m = 0.0
        cdef bint any_left = False
        if partial and not (self.ssorted[slot >> 6] >> (slot & 63)) & 1:
            self._sort_slot(slot)
        if partial and (self.ssorted[slot >> 6] >> (slot & 63)) & 1:
            # Sorted: the due nodes are a prefix (repeated advances within one tick cost
            # O(due), not a walk of the whole slot each time).
            first = 1
            while True:
                i = self.head[slot]
                if i == NIL:
                    break
                n = self._n(i)
                if n.item != NULL and n.deadline > now:
                    break
                self._unlink(i)
                if n.item == NULL:
                    self._free(i)
                    self.zombies -= 1
                    continue
                n.bucket = B_FIRED
                n.next = NIL
                n.prev = GROUP_START if first else NIL
                first = 0
                if ft[0] == NIL:
                    fh[0] = i
                else:
                    self._n(ft[0]).next = i
                ft[0] = i
                moved += 1
            i = self.head[slot]
            if i != NIL:   # (a live node: cancelled ones at the head were popped above)
                self.smin[slot] = self._n(i).deadline
                self.svalid[slot >> 6] |= (<uint64_t>1) << (slot & 63)
        elif partial:
            i = self.head[slot]
            first = 1
            while i != NIL:
                n = self._n(i)
                nxt = n.next
                if n.item == NULL:
                    self._unlink(i)
                    self._free(i)
                    self.zombies -= 1
                elif n.deadline <= now:
                    self._unlink(i)
                    n.bucket = B_FIRED
                    n.next = NIL
                    n.prev = GROUP_START if first else NIL
                    first = 0
                    if ft[0] == NIL:
                        fh[0] = i
                    else:
                        self._n(ft[0]).next = i
                    ft[0] = i
                    moved += 1
                elif not any_left or n.deadline < m:
                    m = n.deadline
                    any_left = True
                i = nxt
            if any_left:
                self.smin[slot] = m
                self.svalid[slot >> 6] |= (<uint64_t>1) << (slot & 63)
        else:
            # Every node of the slot is due: splice the whole list in O(1).
            i = self.head[slot]
            self._n(i).prev = GROUP_START
            if ft[0] == NIL:
                fh[0] = i
            else:
                self._n(ft[0]).next = i
            ft[0] = self.tail[slot]
            moved = self.cnt[slot]
            self.cnt[slot] = 0
            self.head[slot] = NIL
            self.tail[slot] = NIL
            self.pending[slot >> 6] &= ~((<uint64_t>1) << (slot & 63))
        return moved

    cdef void _restore_chain(self, int32_t fh) noexcept:
        """Put the fired chain back where the next advance finds it (after a MemoryError)."""
        cdef int32_t i = fh, nxt
        while i != NIL:
            nxt = self._n(i).next
            if self._n(i).item == NULL:
                self._free(i)
                self.zombies -= 1
            else:
                self._place(i)
            i = nxt

    cdef list _deliver(self, int32_t fh, Py_ssize_t nmax):
        """Turn the fired chain into the result list (sorted per tick run), freeing nodes."""
        cdef Py_ssize_t k = 0, start = 0, z = 0
        cdef int32_t i, nxt
        cdef Node* n
        cdef Entry* entries
        cdef list result
        entries = <Entry*>PyMem_Malloc(<size_t>(nmax if nmax > 0 else 1) * sizeof(Entry))
        if entries == NULL:
            self._restore_chain(fh)
            raise MemoryError()
        i = fh
        while i != NIL:
            n = self._n(i)
            if n.prev == GROUP_START and k > start:
                _sort_run(entries + start, k - start)
                start = k
            if n.item != NULL:
                entries[k].deadline = n.deadline
                entries[k].seq = n.seq
                entries[k].item = n.item
                k += 1
            i = n.next
        _sort_run(entries + start, k - start)
        try:
            result = PyList_New(k)
        except BaseException:
            self._restore_chain(fh)
            PyMem_Free(entries)
            raise
        i = fh
        while i != NIL:
            nxt = self._n(i).next
            if self._n(i).item == NULL:
                z += 1
            self._free(i)
            i = nxt
        self.zombies -= z
        for start in range(k):
            _list_set_item(result, start, entries[start].item)   # the wheel's reference moves to the list
        PyMem_Free(entries)
        self.count -= k
        self.min_valid = False
        return result

    cdef bint _slot_min(self, int32_t b, double* out) noexcept:
        """Earliest live deadline of bucket b (freeing cancelled nodes met on the way)."""
        cdef int32_t i, nxt
        cdef Node* n
        cdef double m = 0.0
        cdef bint found = False
        if b < RING and (self.svalid[b >> 6] >> (b & 63)) & 1:
            out[0] = self.smin[b]
            return True
        i = self.head[b]
        while i != NIL:
            n = self._n(i)
            nxt = n.next
            if n.item == NULL:
                self._unlink(i)
                self._free(i)
                self.zombies -= 1
            elif not found or n.deadline < m:
                m = n.deadline
                found = True
            i = nxt
        if found and b < RING:
            self.smin[b] = m
            self.svalid[b >> 6] |= (<uint64_t>1) << (b & 63)
        out[0] = m
        return found

    cdef double _compute_min(self) noexcept:
        """Exact earliest live deadline (count > 0).  Levels are visited bottom-up and a level
        whose first slot starts after the best tick found so far is not looked into."""
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
        if self.head[OVERFLOW] != NIL and (not found or self.ov_min <= best_tick):
            if self._slot_min(OVERFLOW, &m) and (not found or m < best):
                best = m
        return best

    cdef void _purge_all(self) noexcept:
        """Free every linked node (all cancelled: count == 0)."""
        cdef int32_t b, i, nxt
        for b in range(NBUCKETS):
            i = self.head[b]
            while i != NIL:
                nxt = self._n(i).next
                self._free(i)
                i = nxt
        self.zombies = 0
        self._reset_buckets()

    cdef void _compact(self) noexcept:
        """Free the cancelled nodes: one sequential pass over the slab re-links the live ones
        (order inside a bucket does not matter: runs are sorted when they fire)."""
        cdef int32_t i, b
        cdef int64_t t
        cdef Node* n
        self._reset_buckets()
        for i in range(self.capacity):
            n = self._n(i)
            b = n.bucket
            if b >= 0:
                if n.item == NULL:
                    self._free(i)
                else:
                    if b == OVERFLOW:
                        t = self._tick_of(n.deadline)
                        if t < self.ov_min:
                            self.ov_min = t
                    self._link(i, b)
        self.zombies = 0

    # ---- public API ------------------------------------------------------------------------

    @property
    def tick(self) -> float:
        return self.tick_s

    def schedule(self, deadline, item) -> int:
        """Keep a reference to item until it fires at deadline or is cancelled; return a handle."""
        cdef double d = _as_seconds(deadline, "deadline")
        cdef int32_t i
        cdef Node* n
        if self.free_head == NIL:
            # Cancelled nodes are freed lazily; reuse them before growing the slab.
            if self.zombies * 4 >= self.capacity and self.zombies > 0:
                self._compact()
            else:
                self._grow()
        i = self.free_head
        n = self._n(i)
        self.free_head = n.next
        n.deadline = d
        self.seq += 1
        n.seq = self.seq
        Py_INCREF(item)
        n.item = <PyObject*>item
        self._place(i)
        self.count += 1
        if self.count == 1:
            self.min_deadline = d
            self.min_valid = True
        elif self.min_valid and d < self.min_deadline:
            self.min_deadline = d
        return ((<uint64_t>n.gen) << 32) | <uint64_t>i

    def cancel(self, handle) -> bool:
        """Drop a pending timer; False (and no effect) for any handle that is not pending.

        O(1) and touching only the timer's own node: the item is released and the handle
        made stale now; the node stays linked (a "zombie") until its slot is next walked, or
        until the slab would otherwise grow.
        """
        cdef uint64_t h
        cdef uint32_t i
        cdef int32_t b
        cdef Node* n
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
        n = self._n(i)
        if n.bucket < 0 or n.item == NULL or <uint64_t>n.gen != (h >> 32):
            return False
        item = n.item
        n.item = NULL
        n.gen = n.gen + 1 if n.gen < MAX_GEN else 1
        b = n.bucket
        if b < RING and n.deadline <= self.smin[b]:
            self.svalid[b >> 6] &= ~((<uint64_t>1) << (b & 63))
        if self.min_valid and n.deadline <= self.min_deadline:
            self.min_valid = False
        self.count -= 1
        self.zombies += 1
        _decref(item)   # last: a __del__ it triggers sees a consistent wheel
        return True

    def advance(self, now) -> list:
        """Remove and return the items with deadline <= now, in deadline order (ties: FIFO)."""
        cdef double n = _as_seconds(now, "now")
        cdef int64_t T = self._tick_of(n)
        cdef int64_t E
        cdef int32_t fh = NIL, ft = NIL
        cdef int32_t slot
        cdef Py_ssize_t moved = 0
        if self.count == 0:
            if self.zombies:
                self._purge_all()
            if T > self.cur:
                self.cur = T
            return []
        if T <= self.cur:
            if self.min_valid and self.min_deadline > n:
                return []
            slot = <int32_t>(self.cur & RING_MASK)
            if self.head[slot] != NIL:
                moved += self._collect(slot, n, True, &fh, &ft)
        else:
            while True:
                E = self._next_event()
                if E > T:
                    break
                self.cur = E
                self._cascade()
                slot = <int32_t>(E & RING_MASK)
                if self.head[slot] != NIL:
                    moved += self._collect(slot, n, E == T, &fh, &ft)
                if E == T:
                    break
                self._precascade()
                self.cur = E + 1
            self.cur = T
            self._precascade()
        if fh == NIL:
            return []
        return self._deliver(fh, moved)

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
        cdef int64_t entry, x, best = INT64_MAX
        if self.count == 0:
            return None
        nd = self.next_deadline()
        for level in range(1, RING_LEVELS + 1):
            shift = level * SLOT_BITS
            d = self._first(level)
            while d >= 1:
                b = self._slot_bucket(level, d)
                if self.cnt[b] > PREP_BATCH:
                    entry = self._slot_start(level, d)
                    x = entry - (self.cnt[b] + PREP_BATCH - 1) // PREP_BATCH
                    if x < entry - ((<int64_t>1) << shift):
                        x = entry - ((<int64_t>1) << shift)
                    if x <= self.cur:
                        x = self.cur + 1
                    if x < best:
                        best = x
                    break
                # next non-empty slot of this level, if any before the ring wraps
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
        if self.count == 0 and self.zombies == 0:
            return
        items = PyList_New(self.count)
        for i in range(self.capacity):
            if self._n(i).bucket >= 0:
                if self._n(i).item != NULL:
                    _list_set_item(items, k, self._n(i).item)   # reference moves to the list
                    k += 1
                self._free(i)
        self.count = 0
        self.zombies = 0
        self._reset_buckets()
        del items   # DECREFs run only now, against a consistent, empty wheel

    def memory_usage(self) -> int:
        """Bytes held by this wheel: the object itself plus its node slab (items not included)."""
        return (type(self).__basicsize__ + <Py_ssize_t>self.capacity * <Py_ssize_t>sizeof(Node)
                + <Py_ssize_t>self.chunks_cap * <Py_ssize_t>sizeof(Node*))

    @staticmethod
    def node_size() -> int:
        return sizeof(Node)

    def __len__(self) -> int:
        return self.count
