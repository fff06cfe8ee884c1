"""Sub-tasks on the worker: the parent's side of ``ctx.map``, ``map_stream`` and ``broadcast``
(:class:`MapClient`: TASKS out, TASK_RESULTS in), and running the batches a server sends
(:class:`TaskRunner`: RUN_TASKS in, TASKS_DONE out).

The parent keeps the items of its unanswered batches (at most ``window`` of them) and sends them
again after a reconnect: the server knows each batch by its key, so a resubmission only says where
the results go. While a parent waits for its map it is *parked* (PARK): its slot is free for other
runs, and above all for its own sub-tasks, so that nested maps cannot deadlock a worker.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import msgpack

from .context import Handler, JobContext, MapError, RunLog, TaskFailed
from .models import Status
from .protocol import Connection

log = logging.getLogger("fastjob.worker")

DEFAULT_BATCH = 256  # items per batch (fewer when their encoding would not fit a frame)
DEFAULT_WINDOW = 16  # batches of one map call out at once
FRAME_HEADROOM = 4096  # bytes of a TASKS or TASKS_DONE frame besides its items or results
RETRY_BACKOFF = 0.05  # seconds before an item's first retry, doubling, at most MAX_BACKOFF
MAX_BACKOFF = 2.0
BROADCAST_TIMEOUT = 30.0
STOPPING = "worker stopping"  # seconds to wait for the server's answer to BROADCAST
_SUCCEEDED = Status.SUCCEEDED.value
_INTERRUPTED = frozenset({Status.INTERRUPTED.value, Status.CANCELLED.value, Status.KILLED.value})
#: How a parent's run ends that cancels its sub-tasks (a stop or a lost server does not: it runs again).
_ABANDONED = frozenset({Status.TIMED_OUT.value, Status.KILLED.value})

RunHandler = Callable[..., Awaitable[tuple[str, Any, str | None]]]


class TaskLink(Protocol):
    """What sub-tasks use of the worker's link to its server."""

    @property
    def version(self) -> int: ...
    @property
    def frame_limit(self) -> int: ...
    @property
    def stopping(self) -> bool: ...
    def lease_held(self) -> bool: ...
    def send(self, kind: str, body: dict[str, Any]) -> bool: ...
    async def call(self, kind: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]: ...


class _Call:
    """One map or broadcast call of a parent: its unanswered batches and the answers not yet taken."""

    __slots__ = ("base", "outstanding", "done", "wake", "broadcast")

    def __init__(self, base: dict[str, Any], broadcast: bool = False) -> None:
        self.base = base  # what every TASKS of the call carries (or the BROADCAST request)
        self.outstanding: dict[int, list[Any]] = {}  # start -> items sent, not answered
        self.done: dict[int, tuple[list[Any], list[list[Any]]]] = {}  # start -> (results, errors)
        self.wake = asyncio.Event()
        self.broadcast = broadcast

    async def answer(self, start: int) -> tuple[list[Any], list[list[Any]]]:
        """The results and errors of the batch at ``start``, once they came."""
        while start not in self.done:
            self.wake.clear()
            await self.wake.wait()
        return self.done[start]


def _single(answer: tuple[list[Any], list[list[Any]]]) -> tuple[bool, Any]:
    """A one-item batch's answer: (True, its result) or (False, its error)."""
    results, errors = answer
    return (False, str(errors[0][1])) if errors else (True, (results or [None])[0])


class MapClient:
    """The parent's side of sub-tasks, for every run on this worker."""

    def __init__(self, link: TaskLink) -> None:
        self._link = link
        self._calls: dict[tuple[str, int], _Call] = {}
        self._parked: collections.Counter[str] = collections.Counter()  # parent -> its calls waiting
        self._resubmits: set[asyncio.Task[Any]] = set()

    @property
    def parked_runs(self) -> int:
        """Runs (fires) waiting for their sub-tasks: they take no slot."""
        return sum(1 for parent in self._parked if "|" not in parent)

    @property
    def parked_tasks(self) -> int:
        """Sub-tasks waiting for their own (nested) sub-tasks: they take no slot."""
        return sum(1 for parent in self._parked if "|" in parent)

    # ---- ctx.map_stream ------------------------------------------------------------------------
    async def stream(self, ctx: JobContext, call: int, items: Iterable[Any] | AsyncIterable[Any], handler: str, *,
                     retries: int, timeout: float | None, batch_size: int | None, window: int | None,
                     return_exceptions: bool) -> AsyncIterator[Any]:
        """Send ``items`` in batches, at most ``window`` out at once; yield their results in order."""
        self._check_version()
        size, limit = max(1, batch_size or DEFAULT_BATCH), max(1, window or DEFAULT_WINDOW)
        parent = ctx.key
        state = self._open(parent, call, {"parent": parent, "call": call, "handler": handler,
                                          "attempt": ctx.attempt, "retries": max(0, retries), "timeout": timeout})
        try:
            source = _slices(items, size)
            waiting: collections.deque[list[Any]] = collections.deque()  # read, not yet sent (split to fit)
            sent_upto = taken_upto = 0
            exhausted = False
            while True:
                while len(state.outstanding) < limit and (waiting or not exhausted):
                    if not waiting:
                        batch = await anext(source, None)
                        if batch is None:
                            exhausted = True
                            break
                        waiting.extend(self._fit(batch, sent_upto))
                    batch = waiting.popleft()
                    state.outstanding[sent_upto] = batch
                    self._link.send("TASKS", {**state.base, "start": sent_upto, "items": batch})
                    sent_upto += len(batch)
                if exhausted and not waiting and taken_upto >= sent_upto:
                    return
                results, errors = await state.answer(taken_upto)
                del state.done[taken_upto]
                count = len(state.outstanding.pop(taken_upto))
                failed = {int(i): str(e) for i, e in errors}
                for offset in range(count):
                    if offset in failed:
                        if not return_exceptions:
                            raise MapError({taken_upto + offset: failed[offset]})
                        yield TaskFailed(taken_upto + offset, failed[offset])
                    else:
                        yield results[offset] if offset < len(results) else None
                taken_upto += count
        finally:
            self._close(parent, call)

    def _fit(self, batch: list[Any], start: int) -> list[list[Any]]:
        """``batch`` as slices whose TASKS frame fits the frame limit (the same slices every time)."""
        try:
            encoded = len(msgpack.packb(batch))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"map items from index {start} cannot be sent: {exc}") from None
        if encoded <= self._link.frame_limit - FRAME_HEADROOM:
            return [batch]
        if len(batch) == 1:
            raise ValueError(f"map item {start} is {encoded} bytes encoded, more than the frame limit allows")
        half = len(batch) // 2
        return self._fit(batch[:half], start) + self._fit(batch[half:], start + half)

    # ---- ctx.broadcast and workflow steps ------------------------------------------------------
    async def broadcast(self, ctx: JobContext, call: int, handler: str, params: Any, *, tags: list[str],
                        timeout: float | None) -> list[Any]:
        """One sub-run per connected worker (the server decides which); results in shard order."""
        self._check_version()
        body = {"parent": ctx.key, "call": call, "handler": handler, "params": params, "tags": tags,
                "attempt": ctx.attempt, "timeout": timeout}
        state = self._open(ctx.key, call, body, broadcast=True)
        try:
            reply = await self._link.call("BROADCAST", body, timeout=BROADCAST_TIMEOUT)
            total = int(reply["total"])
            for start in range(total):
                if start not in state.done:
                    state.outstanding[start] = [params]
            out: list[Any] = []
            for start in range(total):
                ok, value = _single(await state.answer(start))
                out.append(value if ok else TaskFailed(start, value))
            return out
        finally:
            self._close(ctx.key, call)

    async def step(self, ctx: JobContext, call: int, target: dict[str, Any], params: Any,
                   upstream: dict[str, Any]) -> tuple[bool, Any]:
        """One workflow step, as a batch of one item: (True, its result) or (False, its error)."""
        self._check_version()
        base: dict[str, Any] = {"parent": ctx.key, "call": call, "handler": target.get("handler") or "",
                                "attempt": ctx.attempt, "retries": int(target.get("retries") or 0),
                                "timeout": target.get("timeout"), "upstream": upstream}
        if target.get("job"):
            base["job"] = target["job"]
        state = self._open(ctx.key, call, base)
        try:
            state.outstanding[0] = [params]
            self._link.send("TASKS", {**base, "start": 0, "items": [params]})
            return _single(await state.answer(0))
        finally:
            self._close(ctx.key, call)

    # ---- answers and reconnects ----------------------------------------------------------------
    def on_results(self, body: dict[str, Any]) -> None:
        """TASK_RESULTS: a batch's results, for the call that waits for them (if it still does)."""
        state = self._calls.get((body["parent"], body["call"]))
        start = body["start"]
        if state is not None and start in state.outstanding and start not in state.done:
            state.done[start] = (list(body["results"]), list(body.get("errors") or ()))
            state.wake.set()

    def abandon(self, parent: str, reason: str) -> None:
        """The parent's run was timed out or killed: its sub-tasks that have not ended are cancelled
        (not when its worker stops or loses its server: a re-run of the fire reuses them)."""
        self._link.send("TASKS_ABANDON", {"parent": parent, "reason": reason})

    def resubmit(self) -> None:
        """A new session: every unanswered batch again (the server dedupes by key), and the parks."""
        for parent in self._parked:
            self._link.send("PARK", {"parent": parent, "waiting": True})
        for state in self._calls.values():
            if state.broadcast:
                task = asyncio.get_running_loop().create_task(self._rebroadcast(state))
                self._resubmits.add(task)
                task.add_done_callback(self._resubmits.discard)
                continue
            for start, batch in state.outstanding.items():
                if start not in state.done:
                    self._link.send("TASKS", {**state.base, "start": start, "items": batch})

    async def _rebroadcast(self, state: _Call) -> None:
        try:
            await self._link.call("BROADCAST", state.base, timeout=BROADCAST_TIMEOUT)
        except Exception as exc:  # the next reconnect tries again; the call waits meanwhile
            log.info("broadcast %s/%s not resubmitted: %s", state.base["parent"], state.base["call"], exc)

    def _open(self, parent: str, call: int, base: dict[str, Any], broadcast: bool = False) -> _Call:
        if (parent, call) in self._calls:
            raise RuntimeError(f"map call {call} of {parent} is already open")
        state = self._calls[(parent, call)] = _Call(base, broadcast)
        self._parked[parent] += 1
        if self._parked[parent] == 1:
            self._link.send("PARK", {"parent": parent, "waiting": True})
        return state

    def _close(self, parent: str, call: int) -> None:
        self._calls.pop((parent, call), None)
        self._parked[parent] -= 1
        if self._parked[parent] <= 0:
            del self._parked[parent]
            self._link.send("PARK", {"parent": parent, "waiting": False})

    def _check_version(self) -> None:
        if self._link.version < 6:
            raise RuntimeError(f"sub-tasks need protocol version 6; this server speaks {self._link.version}")


async def _slices(items: Iterable[Any] | AsyncIterable[Any], size: int) -> AsyncIterator[list[Any]]:
    """``items`` (sync or async) in lists of ``size``, read only as far as asked."""
    batch: list[Any] = []
    if isinstance(items, AsyncIterable):
        async for item in items:
            batch.append(item)
            if len(batch) >= size:
                yield batch
                batch = []
    else:
        iterator = iter(items)
        while True:
            batch = [item for _, item in zip(range(size), iterator, strict=False)]
            if not batch:
                return
            yield batch
            if len(batch) < size:
                return
            batch = []
    if batch:
        yield batch


class TaskRunner:
    """Runs the batches the server sends: items in order, each with its retries, one slot a batch."""

    def __init__(self, link: TaskLink, handlers: Mapping[str, Handler], run_handler: RunHandler,
                 capacity: Callable[[], int], maps: MapClient, isolation: Mapping[str, str]) -> None:
        self._link = link
        self._handlers = handlers
        self._run_handler = run_handler
        self._capacity = capacity
        self._maps = maps
        self._isolation = isolation
        self.running: dict[str, asyncio.Task[None]] = {}
        self.unsent: dict[str, dict[str, Any]] = {}  # answers kept while disconnected
        self._reasons: dict[str, str] = {}

    def on_run(self, conn: Connection, body: dict[str, Any]) -> None:
        """RUN_TASKS: run it, or refuse it (TASKS_DONE with ``refused``) for the server to send elsewhere."""
        key = body["key"]
        if key in self.running or key in self.unsent:
            return  # ours already; its answer comes (or came: it is sent after a reconnect)
        reason = None
        if self._link.stopping:
            reason = STOPPING
        elif body["handler"] not in self._handlers:
            reason = f"unknown handler {body['handler']!r}"
        elif len(self.running) - self._maps.parked_tasks >= self._capacity():
            reason = "at max_concurrency"
        elif not self._link.lease_held():
            reason = "run lease lapsed"
        if reason is not None:
            conn.send("TASKS_DONE", {"key": key, "refused": reason})
            return
        self.running[key] = asyncio.get_running_loop().create_task(self._run(body))

    async def _run(self, body: dict[str, Any]) -> None:
        key, handler = body["key"], body["handler"]
        try:
            answer = await self._items(body, self._handlers[handler], RunLog(body.get("job") or handler))
        finally:
            self.running.pop(key, None)
            reason = self._reasons.pop(key, "")
        if answer is None and reason == STOPPING:
            answer = {"key": key, "refused": STOPPING}  # handed back: the server sends it elsewhere at once
        if answer is None:
            return  # interrupted (our run lease lapsed): the server sends it again once the lease is out
        if not self._link.send("TASKS_DONE", answer):
            self.unsent[key] = answer

    async def _items(self, body: dict[str, Any], fn: Handler, run_log: RunLog) -> dict[str, Any] | None:
        key, items = body["key"], body["items"]
        indexes: Iterable[int] = body["only"] if body.get("only") is not None else range(len(items))
        retries, timeout = int(body.get("retries") or 0), body.get("timeout")
        shard = body.get("shard") or (0, 1)
        upstream = body.get("upstream") or {}
        in_process = self._isolation.get(body["handler"]) == "process"
        results: list[Any] = []
        errors: list[list[Any]] = []
        for index in indexes:
            ctx = JobContext(0, body.get("job") or body["handler"], 0, items[index], body["attempt"], time.time(),
                             run_log, int(shard[0]), int(shard[1]), upstream, f"{key}.{index}", self._maps)
            status, result, error = await self._one(fn, ctx, retries, timeout, key, in_process)
            if ctx.fanned_out and status in _ABANDONED:  # an item that mapped timed out: its own sub-tasks end
                self._maps.abandon(ctx.key, error or status)
            if status in _INTERRUPTED:
                return None
            results.append(result if status == _SUCCEEDED else None)
            if status != _SUCCEEDED:
                errors.append([index, error or status])
        answer: dict[str, Any] = {"key": key, "results": results}
        try:
            size = len(msgpack.packb(results))
        except (TypeError, ValueError, OverflowError) as exc:
            size, why = -1, f"results not serialisable: {exc}"
        else:
            why = f"results too large: {size} bytes encoded, the frame limit is {self._link.frame_limit}"
        if size < 0 or size > self._link.frame_limit - FRAME_HEADROOM:
            answer["results"] = [None] * len(results)
            errors = [[index, why] for index in (body["only"] if body.get("only") is not None else range(len(items)))]
        if errors:
            answer["errors"] = errors
        if run_log.lines:
            answer["logs"] = run_log.lines
        return answer

    async def _one(self, fn: Handler, ctx: JobContext, retries: int, timeout: float | None, key: str,
                   in_process: bool) -> tuple[str, Any, str | None]:
        """One item, retried up to ``retries`` more times after a failure (with a growing backoff)."""
        attempt = 0
        while True:
            status, result, error = await self._run_handler(
                fn, ctx, timeout, lambda: self._reasons.get(key, "cancelled"), check_result=False,
                in_process=in_process)
            if status == _SUCCEEDED or status in _INTERRUPTED or attempt >= retries:
                return status, result, error
            await asyncio.sleep(min(MAX_BACKOFF, RETRY_BACKOFF * 2 ** attempt))
            attempt += 1

    def stop(self, key: str, reason: str) -> None:
        """TASKS_STOP: the batch's parent was abandoned; it is recorded already, nothing is answered."""
        task = self.running.get(key)
        if task is not None:
            self._reasons[key] = reason
            task.cancel()

    def hello_state(self) -> list[str]:
        """The batches running here, for a HELLO: the server keeps them ours instead of re-sending."""
        return sorted(self.running)

    def resend(self) -> None:
        """A new session: the answers kept while disconnected."""
        for key in list(self.unsent):
            if self._link.send("TASKS_DONE", self.unsent[key]):
                del self.unsent[key]

    def interrupt(self, reason: str) -> None:
        """Stop every batch (run lease lapsed: InstanceRunner.watch_run_lease calls it; worker
        stopping): each is sent again elsewhere."""
        for key, task in list(self.running.items()):
            self._reasons[key] = reason
            task.cancel()

    async def wind_down(self, grace: float) -> None:
        if self.running:
            asyncio.get_running_loop().call_later(grace, self.interrupt, STOPPING)
            await asyncio.wait(list(self.running.values()), timeout=grace + 2.0)


__all__ = ["MapClient", "TaskRunner"]
