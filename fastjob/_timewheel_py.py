"""Pure-Python twin of the compiled timing wheel (selected with FASTJOB_PUREPYTHON=1).

Same API, same semantics (exact deadlines, deadline order, ties in insertion order), simpler
structure: a binary heap of (deadline, seq) plus a dict from handle to item.  In pure Python,
heapq's C push/pop beats any wheel written in Python, so the twin does not imitate the
compiled layout; it is the reference behaviour, not the fast path.  Cancelled entries are
left in the heap and skipped ("lazy deletion"); the heap is compacted when they outnumber
the live ones, so a schedule/cancel loop runs in bounded memory.
"""
from __future__ import annotations

import math
from heapq import heapify, heappop, heappush
from typing import Any

__all__ = ["TimingWheel"]

_MISSING: Any = object()


def _as_seconds(x: object, what: str) -> float:
    """Accept real numbers only: a str deadline is a bug, NaN/inf would corrupt the ordering."""
    if type(x) is float:
        v = x
    else:
        if isinstance(x, (str, bytes, bytearray)) or not (
            hasattr(type(x), "__float__") or hasattr(type(x), "__index__")
        ):
            raise TypeError(f"{what} must be a real number of seconds, got {type(x).__name__}")
        try:
            v = float(x)  # type: ignore[arg-type]
        except OverflowError:
            raise ValueError(f"{what} must be a finite number of seconds, got {x!r}") from None
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a real number of seconds, got {type(x).__name__}") from None
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{what} must be a finite number of seconds, got {v!r}")
    return v


class TimingWheel:
    """Heap-backed timer set with the TimingWheel API."""

    __slots__ = ("_tick", "_heap", "_live", "_seq")

    def __init__(self, tick: float = 0.001, now: float | None = None) -> None:
        t = _as_seconds(tick, "tick")
        if not t >= 1e-6:
            # (a vanishing tick would overflow the tick arithmetic and the slot sort's scale)
            raise ValueError(f"tick must be >= 1 microsecond (in seconds), got {tick!r}")
        if now is not None:
            _as_seconds(now, "now")
        self._tick = t
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, object] = {}
        self._seq = 0  # handles are the insertion sequence: unique forever, so never stale-reused

    @property
    def tick(self) -> float:
        return self._tick

    def schedule(self, deadline: float, item: object) -> int:
        d = _as_seconds(deadline, "deadline")
        self._seq += 1
        h = self._seq
        self._live[h] = item
        heappush(self._heap, (d, h))
        return h

    def cancel(self, handle: int) -> bool:
        if type(handle) is not int and (not isinstance(handle, int) or isinstance(handle, bool)):
            return False
        if self._live.pop(handle, _MISSING) is _MISSING:
            return False
        heap = self._heap
        if len(heap) > 2 * len(self._live) + 64:
            live = self._live
            heap[:] = [e for e in heap if e[1] in live]
            heapify(heap)
        return True

    def advance(self, now: float) -> list[Any]:
        n = _as_seconds(now, "now")
        heap = self._heap
        live = self._live
        out = []
        while heap and heap[0][0] <= n:
            item = live.pop(heappop(heap)[1], _MISSING)
            if item is not _MISSING:
                out.append(item)
        return out

    def next_deadline(self) -> float | None:
        heap = self._heap
        live = self._live
        while heap and heap[0][1] not in live:
            heappop(heap)
        return heap[0][0] if heap else None

    def next_wakeup(self) -> float | None:
        """When a driver should next call advance(): a heap has no cascades to prepare, so
        this is the earliest deadline."""
        return self.next_deadline()

    def clear(self) -> None:
        live = self._live
        self._live = {}
        self._heap = []
        live.clear()  # items are released after the wheel is already empty

    def memory_usage(self) -> int:
        """Rough container bytes (heap list + dict), for the benchmark; tuples not included."""
        import sys

        return sys.getsizeof(self._heap) + sys.getsizeof(self._live)

    def __len__(self) -> int:
        return len(self._live)
