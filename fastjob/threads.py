"""A thread pool whose threads never hold the process: where plain ``def`` handlers run.

Python cannot interrupt a thread. ThreadPoolExecutor joins its threads at interpreter exit, so
one handler stuck in a sleep, a lock or C code kept a stopped worker alive for as long as it
ran (28 s after SIGTERM in one report). Here the threads are daemons: once the worker has
stopped and reported such a run ``interrupted``, the process exits and the run dies with it.
Idle threads are reused, up to ``max_workers``, as in ThreadPoolExecutor.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Work = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(concurrent.futures.Executor):
    """``submit`` runs ``fn`` on one of at most ``max_workers`` daemon threads."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "fastjob") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a thread each time it waits for work
        self._threads: list[threading.Thread] = []
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._shut = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                thread = threading.Thread(target=self._serve, name=f"{self._prefix}-{next(self._names)}",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)
        return future

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to the awaiting side, as ThreadPoolExecutor does
                    future.set_exception(exc)
            del work, future, fn, args, kwargs  # a finished run's objects are not kept while idle
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            if cancel_futures:
                while True:
                    try:
                        work = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if work is not None:
                        work[0].cancel()
            for _ in self._threads:
                self._work.put(None)  # each thread ends after the run it is in, if any
        if wait:
            for thread in self._threads:
                thread.join()
