# cython: language_level=3
"""A Linux timerfd: a file descriptor that becomes readable at an exact CLOCK_MONOTONIC instant.

Why: asyncio's selector rounds its sleep up to whole milliseconds and uvloop's timers count
whole milliseconds, so a loop timer cannot wake the timing wheel's driver a fraction of a tick
after a deadline.  A timerfd is an hrtimer: registered as a loop reader it ends the loop's
wait within tens of microseconds of the instant it is armed for, on either loop.
(Python 3.13 has os.timerfd_create; this module serves every supported Python.)
"""

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint64_t
from libc.math cimport isnan, floor, ceil
from posix.time cimport timespec, itimerspec, CLOCK_MONOTONIC
from posix.unistd cimport read, close
import os as _os

cdef extern from "<sys/timerfd.h>" nogil:
    enum:
        TFD_NONBLOCK
        TFD_CLOEXEC
        TFD_TIMER_ABSTIME
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec* new_value, itimerspec* old_value)


cdef int _raise_errno(str what) except -1:
    cdef int err = errno  # before any other call can change it
    raise OSError(err, f"{what}: {_os.strerror(err)}")


cdef class TimerFd:
    """One non-blocking timerfd on CLOCK_MONOTONIC (the clock of time.monotonic())."""

    cdef int fd

    def __cinit__(self):
        self.fd = -1

    def __init__(self):
        cdef int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            _raise_errno("timerfd_create")
        if self.fd >= 0:  # __init__ called again: do not leak the first descriptor
            close(self.fd)
        self.fd = fd

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd

    def arm_at(self, double when) -> None:
        """Become readable once time.monotonic() >= when (at once if that is already so)."""
        cdef itimerspec spec
        cdef double sec
        self._check_open()
        if isnan(when):
            raise ValueError("when must be a number of seconds, got nan")
        spec.it_interval.tv_sec = 0
        spec.it_interval.tv_nsec = 0
        if when < 1e-9:
            # An all-zero it_value would disarm; the smallest absolute time is long past.
            spec.it_value.tv_sec = 0
            spec.it_value.tv_nsec = 1
        elif when > 9.0e15:
            spec.it_value.tv_sec = <long>9.0e15
            spec.it_value.tv_nsec = 0
        else:
            sec = floor(when)
            spec.it_value.tv_sec = <long>sec
            spec.it_value.tv_nsec = <long>ceil((when - sec) * 1e9)  # never before `when`
            if spec.it_value.tv_nsec > 999999999:
                spec.it_value.tv_sec += 1
                spec.it_value.tv_nsec = 0
            if spec.it_value.tv_sec == 0 and spec.it_value.tv_nsec == 0:
                spec.it_value.tv_nsec = 1
        if timerfd_settime(self.fd, TFD_TIMER_ABSTIME, &spec, NULL) < 0:
            _raise_errno("timerfd_settime")

    def disarm(self) -> None:
        cdef itimerspec spec
        self._check_open()
        spec.it_interval.tv_sec = 0
        spec.it_interval.tv_nsec = 0
        spec.it_value.tv_sec = 0
        spec.it_value.tv_nsec = 0
        if timerfd_settime(self.fd, 0, &spec, NULL) < 0:
            _raise_errno("timerfd_settime")

    def consume(self) -> int:
        """Clear readability; the number of expirations since the last call (0 if none)."""
        cdef uint64_t n = 0
        cdef Py_ssize_t r
        self._check_open()
        while True:
            r = read(self.fd, &n, sizeof(n))
            if r == sizeof(n):
                return n
            if r < 0 and errno == EINTR:
                continue
            if r < 0 and errno == EAGAIN:
                return 0
            _raise_errno("timerfd read")

    def close(self) -> None:
        """Close the descriptor; idempotent."""
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    cdef int _check_open(self) except -1:
        if self.fd < 0:
            raise ValueError("TimerFd is closed")
        return 0
