"""Sub-tasks across an app's workers: ``ctx.map`` batches, broadcast sub-runs and workflow steps.

A running handler (the *parent*) sends its items in batches (TASKS). Each batch is written to the
store before it goes to a worker (RUN_TASKS), and its results are written before they go back to
the parent's worker (TASK_RESULTS): a parent that resubmits a batch (after a reconnect, or in a
re-run of its fire) gets the stored results instead of a second run. Only failed items of an
earlier attempt of the parent run again.

The owner of the app alone tracks its batches (:attr:`TaskBroker.live`). A batch runs on one
worker at a time and takes one of its slots; a parent waiting for its map (PARK) takes none, so
nested maps cannot starve their own sub-tasks. A batch whose worker is lost is sent again after
the run lease, as an instance would be (its worker may still be running it until then); one that
no worker takes within ``dispatch_wait`` fails, item by item. A broadcast sub-run is pinned to its
worker: if that worker is lost, the sub-run fails.

Execution is at least once per item (a worker killed mid-batch loses its batch's results, which
run again elsewhere); recording is exactly once (the first result of a batch wins, by key).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..models import FINAL_TASK_STATUSES, JobRow, Routing, TaskBatch, TaskStatus, root_of, task_key
from ..store import Store, StoreError
from ..tasks import BackgroundTasks
from .dispatch import choose
from .metrics import Metrics

if TYPE_CHECKING:
    from .session import WorkerSession

log = logging.getLogger("fastjob.subtasks")

#: Longest task key a parent may name (nested maps append to it), and the deepest nesting.
MAX_KEY = 400
MAX_DEPTH = 8
#: Items per batch a worker may send, and sub-runs per broadcast.
MAX_ITEMS = 10_000
#: Seconds before a failed write of batches is tried again.
WRITE_RETRY = 0.5
_SUCCEEDED = TaskStatus.SUCCEEDED.value
_FAILED = TaskStatus.FAILED.value
_WAITING = TaskStatus.WAITING.value
_RUNNING = TaskStatus.RUNNING.value


class TaskRefused(ValueError):
    """A TASKS or BROADCAST the broker cannot take; ``str()`` is the one-line reason (a ValueError,
    so that the session answers it without knowing this module)."""


@dataclass(slots=True, eq=False)
class LiveBatch:
    """A batch the owner tracks until its results are written and delivered."""

    row: TaskBatch
    origin: str  # the worker whose parent waits for its results
    session: WorkerSession | None = None  # the worker running it
    only: list[int] | None = None  # the items to run (a re-run parent's failed items); None: all
    refused_by: set[str] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None  # its dispatch_wait, or a lost worker's run lease

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class TaskBroker:
    """Writes, routes and tracks the sub-task batches of the apps this server owns."""

    def __init__(
        self,
        *,
        store: Store,
        workers_of: Callable[[str], list[WorkerSession]],
        tasks: BackgroundTasks,
        run_lease: float,
        lease_margin: float,
        dispatch_wait: float,
        room_freed: Callable[[str], None] = lambda app: None,
        jobs: Mapping[int, JobRow] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``room_freed(app)`` is called when a parent parks (its slot is free for instances);
        ``jobs`` (the scheduler's cache, by id) gives a batch its fire's job's routing."""
        self.store = store
        self.workers_of = workers_of
        self.tasks = tasks
        self.run_lease = run_lease
        self.lease_margin = lease_margin  # a worker's clock and ours may disagree this much on its lease
        self.dispatch_wait = dispatch_wait
        self.room_freed = room_freed
        self.jobs: Mapping[int, JobRow] = jobs if jobs is not None else {}
        self.metrics = metrics or Metrics()
        self.live: dict[str, LiveBatch] = {}
        self.pending: dict[str, list[LiveBatch]] = {}  # app -> batches waiting for a worker, in order
        self._new: list[LiveBatch] = []  # to write (add_task_batches)
        self._dirty: dict[str, LiveBatch] = {}  # to save; a final one is delivered once saved
        self._flushing = False
        self._rr: dict[str, int] = {}

    # ---- what workers send -------------------------------------------------------------------
    def on_tasks(self, session: WorkerSession, body: dict[str, Any]) -> None:
        """TASKS: a parent's batch of items. Written, then sent to a worker; a resubmission of a
        batch already known only says where its results go."""
        parent, call, start = body["parent"], body["call"], body["start"]
        try:
            _check_parent(parent)
            if len(body["items"]) > MAX_ITEMS or call < 0 or start < 0:
                raise TaskRefused(f"a batch holds at most {MAX_ITEMS} items, at a call and index >= 0")
        except TaskRefused as exc:
            session.send("ERROR", {"code": "invalid", "message": f"TASKS refused: {exc}"})
            return
        key = task_key(parent, call, start)
        live = self.live.get(key)
        if live is not None:
            live.origin = session.worker_id
            live.row.parent_attempt = max(live.row.parent_attempt, int(body.get("attempt") or 1))
            return
        extra = {name: body[name] for name in ("retries", "timeout", "job", "upstream") if body.get(name) is not None}
        row = TaskBatch(key, session.app, root_of(parent), parent, call, start, str(body["handler"])[:255],
                        list(body["items"]), parent_attempt=int(body.get("attempt") or 1), extra=extra or None,
                        created_at=time.time())
        self._add(LiveBatch(row, session.worker_id))

    async def broadcast(self, session: WorkerSession, body: dict[str, Any]) -> dict[str, Any]:
        """BROADCAST: one sub-run of the handler per connected worker of the app (with the tags),
        each pinned to its worker and told its shard. A re-run parent gets the sub-runs of its
        fire's earlier attempt (only the failed ones run again)."""
        parent, call = body["parent"], body["call"]
        _check_parent(parent)
        attempt = int(body.get("attempt") or 1)
        stored = await self.store.list_task_batches(root_of(parent), parent=parent, call=call, limit=MAX_ITEMS)
        tracked = self._tracked(parent, call)  # after the read: made here meanwhile, or not yet written
        if stored or tracked:  # asked again (a reconnect, a re-run): the sub-runs made the first time
            for row in stored:
                if row.key not in self.live:
                    self._adopt(LiveBatch(row, session.worker_id), row, attempt)
            rows = {row.key: row for row in stored} | {row.key: row for row in tracked}
            for key in rows:
                if key in self.live:
                    self.live[key].origin = session.worker_id
            total = max(int(((row.extra or {}).get("shard") or (0, len(rows)))[1]) for row in rows.values())
            return {"total": total, "workers": [(row.extra or {}).get("pin") for row in
                                                sorted(rows.values(), key=lambda r: r.start)]}
        handler, tags = str(body["handler"]), list(body.get("tags") or ())
        targets = [s for s in self.workers_of(session.app) if _takes_tasks(s) and _has_handler(s, handler)
                   and s.has_tags(tags)][:MAX_ITEMS]
        if not targets:
            raise TaskRefused(f"no connected worker of app {session.app!r} has handler {handler!r}"
                              + (f" and tags {tags}" if tags else ""))
        now = time.time()
        for index, target in enumerate(targets):
            extra: dict[str, Any] = {"pin": target.worker_id, "shard": [index, len(targets)]}
            if body.get("timeout") is not None:
                extra["timeout"] = body["timeout"]
            self._add(LiveBatch(TaskBatch(task_key(parent, call, index), session.app, root_of(parent), parent, call,
                                          index, handler, [body.get("params")], parent_attempt=attempt,
                                          extra=extra, created_at=now), session.worker_id))
        return {"total": len(targets), "workers": [t.worker_id for t in targets]}

    def _tracked(self, parent: str, call: int) -> list[TaskBatch]:
        return sorted((live.row for live in self.live.values() if live.row.parent == parent and live.row.call == call),
                      key=lambda row: row.start)

    def on_done(self, session: WorkerSession, body: dict[str, Any]) -> None:
        """TASKS_DONE: a worker ran a batch (or refused it). The first answer wins; any session of
        the app may bring it (its worker reconnected meanwhile)."""
        live = self.live.get(body["key"])
        if live is None and body.get("refused") is None:
            # not tracked here (yet): an earlier owner sent it, and its parent has not resubmitted
            self.tasks.spawn(self._record_late(session, body), "fastjob-late-batch")
            return
        if live is None or live.row.status in FINAL_TASK_STATUSES or live.row.app != session.app:
            return
        if live.session is not None:
            live.session.tasks.discard(live.row.key)
            live.session = None
        live.stop_timer()
        refused = body.get("refused")
        if refused is not None and _pin(live.row) is not None:  # no other worker may run a sub-run
            self._fail(live, f"worker {session.worker_id} did not run its sub-run: {str(refused)[:200]}")
        elif refused is not None:
            log.info("batch %s: worker %s refused it (%s)", live.row.key, session.worker_id, refused)
            live.refused_by.add(session.worker_id)
            live.row.status = _WAITING
            self._queue(live)
        else:
            self._record(live, session.worker_id, body)
        self._pump(session.app)

    async def _record_late(self, session: WorkerSession, body: dict[str, Any]) -> None:
        """A batch's answer that reached a new owner before its parent resubmitted it: recorded on
        the stored batch (the parent then gets it from the store), never run again."""
        key = str(body["key"])
        parent, _, rest = key.rpartition("|")
        parent, _, call = parent.rpartition("|")
        if not parent or not call.isdigit() or not rest.isdigit():
            return
        stored = [b for b in await self.store.list_task_batches(root_of(parent), parent=parent, call=int(call),
                                                                limit=MAX_ITEMS) if b.key == key]
        if not stored or stored[0].app != session.app or stored[0].status in FINAL_TASK_STATUSES:
            return
        if key in self.live:  # its parent resubmitted meanwhile: the usual way
            self.on_done(session, body)
            return
        live = LiveBatch(stored[0], origin="")
        if stored[0].errors and stored[0].results:
            live.only = sorted(int(index) for index, _ in stored[0].errors)
        self.live[key] = live
        self._record(live, session.worker_id, body)

    def on_abandon(self, session: WorkerSession, body: dict[str, Any]) -> None:
        """TASKS_ABANDON: the parent's run was timed out or killed. Its batches (and those of its
        items' nested maps) that have not ended are recorded failed; running ones are stopped."""
        parent = str(body["parent"])
        reason = f"cancelled: {str(body.get('reason') or 'its parent ended')[:200]}"
        nested = parent + "|"
        for live in list(self.live.values()):
            row = live.row
            if row.app != session.app or row.status in FINAL_TASK_STATUSES:
                continue
            if row.parent == parent or row.parent.startswith(nested):
                if live.session is not None:
                    live.session.send("TASKS_STOP", {"key": row.key, "reason": reason})
                self._fail(live, reason)

    def on_park(self, session: WorkerSession, body: dict[str, Any]) -> None:
        """PARK: a parent waits for its sub-tasks (its slot is free) or goes on (it takes it again)."""
        parent = str(body["parent"])[:MAX_KEY]
        if body["waiting"]:
            session.park(parent)
            self.room_freed(session.app)
            self._pump(session.app)
        else:
            session.unpark(parent)

    # ---- sessions and ownership ------------------------------------------------------------------
    def worker_joined(self, session: WorkerSession, running: list[str]) -> None:
        """A worker (re)connected; the batches its HELLO names as running are its own again."""
        for key in running:
            live = self.live.get(key)
            if live is not None and live.row.status == _RUNNING and live.session is None:
                live.stop_timer()
                self._attach(live, session)
        self._pump(session.app)

    def worker_left(self, session: WorkerSession) -> None:
        """Its batches run again elsewhere once its run lease is out; a pinned sub-run fails now."""
        for key in list(session.tasks):
            live = self.live.get(key)
            if live is None or live.session is not session:
                continue
            live.session = None
            if _pin(live.row) is not None:
                self._fail(live, f"worker {session.worker_id} left before its sub-run ended")
            else:  # its run lease counts from its last frame at the latest: surely out by then
                self._hold(live, session.last_received + self.run_lease + self.lease_margin
                           - asyncio.get_running_loop().time())
        session.tasks.clear()

    def app_lost(self, app: str) -> None:
        """The app moved: its batches are the new owner's (their parents resubmit them there)."""
        self.pending.pop(app, None)
        for key, live in list(self.live.items()):
            if live.row.app == app:
                live.stop_timer()
                del self.live[key]

    # ---- writing ---------------------------------------------------------------------------------
    def _add(self, live: LiveBatch) -> None:
        self.live[live.row.key] = live
        self._new.append(live)
        self._kick()

    def _save(self, live: LiveBatch) -> None:
        self._dirty[live.row.key] = live
        self._kick()

    def _kick(self) -> None:
        if not self._flushing:
            self._flushing = True
            self.tasks.spawn(self._flush(), "fastjob-task-batches")

    async def _flush(self) -> None:
        """Write what this loop turn produced, in one transaction per kind, until nothing is left."""
        try:
            while self._new or self._dirty:
                await asyncio.sleep(0)  # the rest of this turn's frames join the write
                new, self._new = self._new, []
                if new:
                    await self._write_new(new)
                dirty, self._dirty = self._dirty, {}
                if dirty:
                    await self._write_dirty(dirty)
        finally:
            self._flushing = False

    async def _write_new(self, new: list[LiveBatch]) -> None:
        await self._resolve_jobs(new)
        try:
            stored = await self.store.add_task_batches([live.row for live in new if live.row.handler])
        except StoreError as exc:
            log.warning("writing %d task batches failed (%s); trying again", len(new), exc)
            await asyncio.sleep(WRITE_RETRY)
            self._new[:0] = new
            return
        for live in new:
            if self.live.get(live.row.key) is not live:
                continue  # the app moved meanwhile
            if live.row.status in FINAL_TASK_STATUSES:
                continue  # its answer came while it was written (a worker that ran it for an earlier owner)
            if not live.row.handler:
                self._fail(live, f"no job named {(live.row.extra or {}).get('job')!r} in app {live.row.app!r}")
                continue
            found = stored.get(live.row.key)
            if found is None:
                self._queue(live)
            else:
                self._adopt(live, found, live.row.parent_attempt)

    async def _write_dirty(self, dirty: dict[str, LiveBatch]) -> None:
        try:
            await self.store.save_task_batches([live.row for live in dirty.values()])
        except StoreError as exc:
            log.warning("saving %d task batches failed (%s); trying again", len(dirty), exc)
            await asyncio.sleep(WRITE_RETRY)
            for key, live in dirty.items():
                self._dirty.setdefault(key, live)
            return
        for live in dirty.values():
            if live.row.status in FINAL_TASK_STATUSES:
                self._deliver(live)

    async def _resolve_jobs(self, new: list[LiveBatch]) -> None:
        """A workflow step that names a job runs that job's handler with its params and settings
        (the job's own schedule is not touched); an unknown job leaves the handler empty."""
        for live in new:
            extra = live.row.extra or {}
            if live.row.handler or not extra.get("job"):
                continue
            try:
                job = await self.store.get_job_by_name(live.row.app, str(extra["job"]))
            except StoreError:
                job = None
            if job is not None and not job.is_delete:
                _take_job(live.row, job)

    def _adopt(self, live: LiveBatch, stored: TaskBatch, attempt: int) -> None:
        """A batch stored already: delivered as it is, run again for a newer attempt's failed items,
        or (unfinished: its earlier owner died) held for its worker's run lease."""
        items = live.row.items
        live.row = stored
        self.live[stored.key] = live
        if stored.status == _SUCCEEDED or (stored.status == _FAILED and attempt <= stored.parent_attempt):
            self._deliver(live)
            return
        if stored.status == _FAILED:  # a re-run of the fire: its failed items run again
            live.only = sorted(int(index) for index, _ in stored.errors or ())
            stored.status, stored.parent_attempt, stored.finished_at = _WAITING, attempt, None
            stored.items = stored.items or items
            self._save(live)
            self._queue(live)
            return
        stored.parent_attempt = max(stored.parent_attempt, attempt)
        if stored.errors and stored.results:  # re-opened for a re-run's failed items: only those run
            live.only = sorted(int(index) for index, _ in stored.errors)
        holder = self._session_of(stored.app, stored.worker) if stored.status == _RUNNING else None
        if holder is not None and stored.key in holder.hello_tasks:
            self._attach(live, holder)
        elif stored.status == _RUNNING:
            self._hold(live)
        else:
            self._queue(live)

    # ---- routing ---------------------------------------------------------------------------------
    def _queue(self, live: LiveBatch) -> None:
        live.row.status = _WAITING
        self.pending.setdefault(live.row.app, []).append(live)
        live.stop_timer()
        live.timer = asyncio.get_running_loop().call_later(self.dispatch_wait, self._expired, live)
        self._pump(live.row.app)

    def _pump(self, app: str) -> None:
        """Send the app's waiting batches to workers with room, in order."""
        queue = self.pending.get(app)
        if not queue:
            return
        keep: list[LiveBatch] = []
        for live in queue:
            if self.live.get(live.row.key) is not live or live.row.status != _WAITING:
                continue
            session = self._route(app, live)
            if session is None:
                keep.append(live)
            else:
                self._send(session, live)
        if keep:
            self.pending[app] = keep
        else:
            del self.pending[app]

    def _route(self, app: str, live: LiveBatch) -> WorkerSession | None:
        pin = _pin(live.row)
        candidates = [s for s in self.workers_of(app) if _takes_tasks(s) and s.task_room()
                      and (pin is None or s.worker_id == pin) and s.worker_id not in live.refused_by
                      and _has_handler(s, live.row.handler)]
        return choose(candidates, self._routing(live.row.root), self._rr, app, lambda s: s.task_load())

    def _routing(self, root: str) -> str:
        """The routing of the job whose fire the batch belongs to (round robin if not known here)."""
        job_id, _, _ = root.partition(":")
        job = self.jobs.get(int(job_id)) if job_id.isdigit() else None
        return job.routing if job is not None else Routing.ROUND_ROBIN.value

    def _send(self, session: WorkerSession, live: LiveBatch) -> None:
        row = live.row
        extra = row.extra or {}
        body: dict[str, Any] = {"key": row.key, "handler": row.handler, "items": row.items, "start": row.start,
                                "attempt": row.attempt + 1}
        for name in ("retries", "timeout", "shard", "upstream", "job"):
            if extra.get(name) is not None:
                body[name] = extra[name]
        if live.only is not None:
            body["only"] = live.only
        session.send("RUN_TASKS", body)
        self.metrics.subtask_batches[(row.app, "resent" if row.attempt or live.refused_by else "sent")] += 1
        live.stop_timer()
        row.status, row.worker, row.attempt = _RUNNING, session.worker_id, row.attempt + 1
        self._attach(live, session)
        self._save(live)

    def _attach(self, live: LiveBatch, session: WorkerSession) -> None:
        live.session = session
        session.tasks.add(live.row.key)

    def _hold(self, live: LiveBatch, wait: float | None = None) -> None:
        """Its worker is gone but may still run it until its run lease is out (``wait`` seconds; a
        whole lease and its margin if not known): then it runs elsewhere."""
        live.stop_timer()
        wait = self.run_lease + self.lease_margin if wait is None else max(0.0, wait)
        live.timer = asyncio.get_running_loop().call_later(wait, self._lease_out, live)

    def _lease_out(self, live: LiveBatch) -> None:
        live.timer = None
        if self.live.get(live.row.key) is live and live.row.status == _RUNNING and live.session is None:
            log.info("batch %s: its worker %s did not come back within the run lease; sent again",
                     live.row.key, live.row.worker)
            self._queue(live)

    def _expired(self, live: LiveBatch) -> None:
        live.timer = None
        if self.live.get(live.row.key) is live and live.row.status == _WAITING:
            pin = _pin(live.row)
            who = f"worker {pin}" if pin else f"no worker of app {live.row.app!r} with handler {live.row.handler!r}"
            self._fail(live, f"{who} took it within {self.dispatch_wait:.0f}s")

    # ---- ending ----------------------------------------------------------------------------------
    def _record(self, live: LiveBatch, worker: str, body: dict[str, Any]) -> None:
        row = live.row
        indexes = live.only if live.only is not None else list(range(row.size))
        results = list(body.get("results") or ())
        if len(results) != len(indexes):
            self._fail(live, f"worker {worker} sent {len(results)} results for {len(indexes)} items")
            return
        merged = list(row.results or [None] * row.size)
        for index, result in zip(indexes, results, strict=True):
            merged[index] = result
        rerun = set(indexes)
        errors = [e for e in row.errors or () if int(e[0]) not in rerun]
        errors += [[int(i), str(text)[:4000]] for i, text in body.get("errors") or () if int(i) in rerun]
        row.results, row.errors = merged, sorted(errors) or None
        row.logs = ((row.logs or []) + list(body.get("logs") or ()))[-1000:] or None
        row.status, row.worker, row.finished_at = _FAILED if errors else _SUCCEEDED, worker, time.time()
        failed_now = sum(1 for e in errors if int(e[0]) in rerun)
        self._count_items(row.app, len(indexes) - failed_now, failed_now)
        live.only = None
        self._save(live)

    def _fail(self, live: LiveBatch, error: str) -> None:
        row = live.row
        indexes = live.only if live.only is not None else range(row.size)
        live.stop_timer()
        if live.session is not None:
            live.session.tasks.discard(row.key)
            live.session = None
        kept = [e for e in row.errors or () if int(e[0]) not in set(indexes)]
        row.errors = sorted(kept + [[i, error] for i in indexes])
        row.results = row.results or [None] * row.size
        row.status, row.finished_at = _FAILED, time.time()
        self._count_items(row.app, 0, len(indexes))
        live.only = None
        self._save(live)

    def _count_items(self, app: str, succeeded: int, failed: int) -> None:
        if succeeded:
            self.metrics.subtask_items[(app, "succeeded")] += succeeded
        if failed:
            self.metrics.subtask_items[(app, "failed")] += failed

    def open_counts(self) -> dict[tuple[str, str], int]:
        """Batches tracked here that have not ended, by (app, waiting or running): a /metrics gauge."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter(
            (live.row.app, live.row.status) for live in self.live.values()
            if live.row.status not in FINAL_TASK_STATUSES)
        return dict(counts)

    def _deliver(self, live: LiveBatch) -> None:
        """Results written: to the parent's worker, if connected (else it resubmits and gets them)."""
        row = live.row
        if self.live.get(row.key) is live:
            del self.live[row.key]
        live.stop_timer()
        session = self._session_of(row.app, live.origin)
        if session is not None:
            body: dict[str, Any] = {"parent": row.parent, "call": row.call, "start": row.start,
                                    "results": row.results or [None] * row.size}
            if row.errors:
                body["errors"] = row.errors
            session.send("TASK_RESULTS", body)

    def _session_of(self, app: str, worker_id: str | None) -> WorkerSession | None:
        for session in self.workers_of(app):
            if session.worker_id == worker_id and session.role == "worker" and not session.closed:
                return session
        return None

    # ---- reading (admin API) ---------------------------------------------------------------------
    async def batches_of(self, root: str, limit: int = 1000) -> list[TaskBatch]:
        """A fire's batches as stored, with the owner's newer view of those it tracks."""
        stored = await self.store.list_task_batches(root, limit=limit)
        return [self.live[b.key].row if b.key in self.live else b for b in stored]


def _check_parent(parent: str) -> None:
    if not parent or len(parent) > MAX_KEY or parent.count("|") > 2 * MAX_DEPTH:
        raise TaskRefused(f"a parent key is 1 to {MAX_KEY} characters, nested at most {MAX_DEPTH} deep")


def _takes_tasks(session: WorkerSession) -> bool:
    return session.accepts_jobs and session.version >= 6


def _has_handler(session: WorkerSession, handler: str) -> bool:
    return not session.handler_kinds or handler in session.handler_kinds


def _pin(row: TaskBatch) -> str | None:
    pin = (row.extra or {}).get("pin")
    return None if pin is None else str(pin)


def _take_job(row: TaskBatch, job: JobRow) -> None:
    """Fill a step that names a job with the job's handler, params and settings (its own win)."""
    extra = dict(row.extra or {})
    row.handler = job.handler
    if row.items == [None]:
        row.items = [job.params]
    extra.setdefault("retries", job.retry_times)
    if job.timeout is not None:
        extra.setdefault("timeout", job.timeout)
    row.extra = extra

