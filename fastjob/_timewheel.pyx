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
* The wheel is a "digital clock" (Varghese/Kafka style): a node sits at the level of the highest
  6-bit digit in which its tick differs from the current tick.  When the current tick enters a
  slot of an upper level, that slot is cascaded: its nodes are re-placed on lower levels.  Each
  node keeps its exact float deadline, so cascading loses no precision; ``advance(now)`` fires
  exactly the nodes whose deadline is ``<= now`` (never early, and never later than the call
  that follows the deadline).  Empty time is skipped with the bitmaps, so advancing over hours
  costs a handful of bit operations.
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
    SLOTS = 64
    SLOT_MASK = 63
    TOP_BITS = 36              # LEVELS * SLOT_BITS
    OVERFLOW = 384             # LEVELS * SLOTS: bucket index of the overflow list
    NBUCKETS = 385
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


cdef class TimingWheel:
    """Hierarchical timing wheel; see the module docstring for the layout."""

    cdef Node** chunks            # slab: fixed-size chunks, never moved once allocated
    cdef int32_t nchunks
    cdef int32_t chunks_cap
    cdef int32_t capacity
    cdef int32_t free_head
    cdef Py_ssize_t count
    cdef uint64_t seq
    cdef int64_t cur              # current tick: every node with a tick < cur has fired
    cdef int64_t ov_min           # lower bound of the overflow list's ticks
    cdef double origin
    cdef double tick_s
    cdef double inv_tick
    cdef bint min_valid
    cdef double min_deadline
    cdef uint64_t pending[LEVELS]
    cdef int32_t head[NBUCKETS]
    cdef int32_t tail[NBUCKETS]

    def __cinit__(self):
        self.chunks = NULL
        self.nchunks = 0
        self.chunks_cap = 0
        self.capacity = 0
        self.free_head = NIL
        self.count = 0
        self.seq = 0
        self.cur = 0
        self._reset_buckets()

    def __init__(self, tick=0.001, now=None):
        # (no annotations here: Cython would turn `tick: float` into an unchecked C double)
        cdef double t = _as_seconds(tick, "tick")
        if t <= 0.0:
            raise ValueError(f"tick must be > 0 seconds, got {tick!r}")
        cdef double n = _time.monotonic() if now is None else _as_seconds(now, "now")
        if self.count:
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
            self.tail[k] = NIL
        for k in range(LEVELS):
            self.pending[k] = 0
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
        cdef Node* n = self._n(i)
        cdef int32_t t = self.tail[b]
        n.bucket = b
        n.next = NIL
        n.prev = t
        if t == NIL:
            self.head[b] = i
            if b < OVERFLOW:
                self.pending[b >> SLOT_BITS] |= (<uint64_t>1) << (b & SLOT_MASK)
        else:
            self._n(t).next = i
        self.tail[b] = i

    cdef inline void _unlink(self, int32_t i) noexcept:
        cdef Node* n = self._n(i)
        cdef int32_t b = n.bucket
        if n.prev != NIL:
            self._n(n.prev).next = n.next
        else:
            self.head[b] = n.next
        if n.next != NIL:
            self._n(n.next).prev = n.prev
        else:
            self.tail[b] = n.prev
        if self.head[b] == NIL and b < OVERFLOW:
            self.pending[b >> SLOT_BITS] &= ~((<uint64_t>1) << (b & SLOT_MASK))

    cdef inline void _place(self, int32_t i) noexcept:
        """Put node i in the bucket its tick belongs to, relative to the current tick."""
        cdef int64_t t = self._tick_of(self._n(i).deadline)
        cdef uint64_t x
        cdef int level
        if t < self.cur:
            t = self.cur           # already due: fires at the next advance
        x = <uint64_t>(t ^ self.cur)
        if x < SLOTS:
            self._link(i, <int32_t>(t & SLOT_MASK))
            return
        level = (63 - __builtin_clzll(x)) // SLOT_BITS
        if level >= LEVELS:
            if t < self.ov_min:
                self.ov_min = t
            self._link(i, OVERFLOW)
        else:
            self._link(i, level * SLOTS + <int32_t>((t >> (level * SLOT_BITS)) & SLOT_MASK))

    cdef int64_t _next_event(self) noexcept:
        """Smallest tick >= cur at which a slot fires or cascades (INT64_MAX if none)."""
        cdef int64_t cur = self.cur
        cdef int64_t best = INT64_MAX
        cdef int64_t e
        cdef uint64_t b
        cdef int level, shift, k
        b = self.pending[0] >> (cur & SLOT_MASK)
        if b:
            best = cur + __builtin_ctzll(b)
        for level in range(1, LEVELS):
            shift = level * SLOT_BITS
            b = self.pending[level] >> ((cur >> shift) & SLOT_MASK)
            if b:
                k = __builtin_ctzll(b)
                e = cur if k == 0 else ((cur >> shift) + k) << shift
                if e < best:
                    best = e
        if self.head[OVERFLOW] != NIL:
            e = (self.ov_min >> TOP_BITS) << TOP_BITS
            if e < cur:
                e = cur
            if e < best:
                best = e
        return best

    cdef void _replace_list(self, int32_t b) noexcept:
        """Detach bucket b and re-place its nodes (cascading, in list order)."""
        cdef int32_t i = self.head[b]
        cdef int32_t nxt
        self.head[b] = NIL
        self.tail[b] = NIL
        if b < OVERFLOW:
            self.pending[b >> SLOT_BITS] &= ~((<uint64_t>1) << (b & SLOT_MASK))
        else:
            self.ov_min = INT64_MAX
        while i != NIL:
            nxt = self._n(i).next
            self._place(i)
            i = nxt

    cdef void _cascade(self) noexcept:
        """Bring down every upper-level slot (and the overflow list) the current tick entered."""
        cdef int level, d
        cdef int64_t cur = self.cur
        if self.head[OVERFLOW] != NIL and (cur >> TOP_BITS) >= (self.ov_min >> TOP_BITS):
            self._replace_list(OVERFLOW)
        for level in range(LEVELS - 1, 0, -1):
            d = <int>((cur >> (level * SLOT_BITS)) & SLOT_MASK)
            if self.pending[level] & ((<uint64_t>1) << d):
                self._replace_list(level * SLOTS + d)

    cdef void _collect(self, int32_t slot, double now, bint partial,
                       int32_t* fh, int32_t* ft) noexcept:
        """Move the due nodes of a level-0 slot to the fired chain, as one run."""
        cdef int32_t i, nxt, first
        if partial:
            i = self.head[slot]
            first = 1
            while i != NIL:
                nxt = self._n(i).next
                if self._n(i).deadline <= now:
                    self._unlink(i)
                    self._n(i).bucket = B_FIRED
                    self._n(i).next = NIL
                    self._n(i).prev = GROUP_START if first else NIL
                    first = 0
                    if ft[0] == NIL:
                        fh[0] = i
                    else:
                        self._n(ft[0]).next = i
                    ft[0] = i
                i = nxt
        else:
            # Every node of the slot is due: splice the whole list in O(1).
            i = self.head[slot]
            self._n(i).prev = GROUP_START
            if ft[0] == NIL:
                fh[0] = i
            else:
                self._n(ft[0]).next = i
            ft[0] = self.tail[slot]
            self.head[slot] = NIL
            self.tail[slot] = NIL
            self.pending[0] &= ~((<uint64_t>1) << slot)

    cdef list _deliver(self, int32_t fh):
        """Turn the fired chain into the result list (sorted per tick run), freeing nodes."""
        cdef Py_ssize_t nf = 0, k, start
        cdef int32_t i = fh, nxt
        cdef Entry* entries
        cdef list result
        while i != NIL:
            nf += 1
            i = self._n(i).next
        entries = <Entry*>PyMem_Malloc(<size_t>nf * sizeof(Entry))
        try:
            if entries == NULL:
                raise MemoryError()
            result = PyList_New(nf)
        except BaseException:
            # Put the due nodes back where the next advance will find them, then report.
            i = fh
            while i != NIL:
                nxt = self._n(i).next
                self._place(i)
                i = nxt
            PyMem_Free(entries)
            raise
        i = fh
        k = 0
        start = 0
        while i != NIL:
            if self._n(i).prev == GROUP_START and k > start:
                _sort_run(entries + start, k - start)
                start = k
            entries[k].deadline = self._n(i).deadline
            entries[k].seq = self._n(i).seq
            entries[k].item = self._n(i).item
            nxt = self._n(i).next
            self._free(i)
            k += 1
            i = nxt
        _sort_run(entries + start, nf - start)
        for k in range(nf):
            _list_set_item(result, k, entries[k].item)   # the wheel's reference moves to the list
        PyMem_Free(entries)
        self.count -= nf
        self.min_valid = False
        return result

    cdef double _compute_min(self) noexcept:
        cdef int32_t b = NIL, i
        cdef int level, d
        cdef uint64_t bits
        cdef double m
        bits = self.pending[0] >> (self.cur & SLOT_MASK)
        if bits:
            b = <int32_t>((self.cur + __builtin_ctzll(bits)) & SLOT_MASK)
        else:
            for level in range(1, LEVELS):
                d = <int>((self.cur >> (level * SLOT_BITS)) & SLOT_MASK)
                bits = self.pending[level] >> d
                if bits:
                    b = level * SLOTS + d + __builtin_ctzll(bits)
                    break
            else:
                b = OVERFLOW
        i = self.head[b]
        m = self._n(i).deadline
        while i != NIL:
            if self._n(i).deadline < m:
                m = self._n(i).deadline
            i = self._n(i).next
        return m

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
        """Drop a pending timer; False (and no effect) for any handle that is not pending."""
        cdef uint64_t h
        cdef uint32_t i
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
        if n.bucket < 0 or <uint64_t>n.gen != (h >> 32):
            return False
        item = n.item
        if self.min_valid and n.deadline <= self.min_deadline:
            self.min_valid = False
        self._unlink(i)
        self._free(i)
        self.count -= 1
        _decref(item)   # last: a __del__ it triggers sees a consistent wheel
        return True

    def advance(self, now) -> list:
        """Remove and return the items with deadline <= now, in deadline order (ties: FIFO)."""
        cdef double n = _as_seconds(now, "now")
        cdef int64_t T = self._tick_of(n)
        cdef int64_t E
        cdef int32_t fh = NIL, ft = NIL
        cdef int32_t slot
        if self.count == 0:
            if T > self.cur:
                self.cur = T
            return []
        if self.min_valid and self.min_deadline > n:
            return []
        if T <= self.cur:
            slot = <int32_t>(self.cur & SLOT_MASK)
            if self.head[slot] != NIL:
                self._collect(slot, n, True, &fh, &ft)
        else:
            while True:
                E = self._next_event()
                if E > T:
                    break
                self.cur = E
                self._cascade()
                slot = <int32_t>(E & SLOT_MASK)
                if self.head[slot] != NIL:
                    self._collect(slot, n, E == T, &fh, &ft)
                if E == T:
                    break
                self.cur = E + 1
            self.cur = T
        if fh == NIL:
            return []
        return self._deliver(fh)

    def next_deadline(self):
        """Earliest pending deadline (exact), or None when empty."""
        if self.count == 0:
            return None
        if not self.min_valid:
            self.min_deadline = self._compute_min()
            self.min_valid = True
        return self.min_deadline

    def clear(self) -> None:
        """Drop every pending timer (their handles become stale)."""
        cdef int32_t i
        cdef Py_ssize_t k = 0
        cdef list items
        if self.count == 0:
            return
        items = PyList_New(self.count)
        for i in range(self.capacity):
            if self._n(i).bucket >= 0:
                _list_set_item(items, k, self._n(i).item)   # reference moves to the list
                k += 1
                self._free(i)
        self.count = 0
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
