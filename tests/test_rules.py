"""Rules of the fire contract that no other test reaches, each checked against a real server.

Every test runs in-process :class:`FastJobServer` objects on 127.0.0.1 (port 0) over a temporary
SQLite file, with real :class:`fastjob.Worker` objects in the same event loop talking to them
over loopback TCP (one test starts a worker process). Nothing is mocked: a "database outage" is
another sqlite3 connection holding the write lock (BEGIN IMMEDIATE), a "network cut" is an
aborted transport, a "crash" is a state written into the SQLite file before a server starts.

Every wait is a bounded wait on a condition (``harness.wait_until``) or an event. A fixed sleep
outside a handler appears only as a stimulus (a busy worker) or as the observation window of a
"nothing happened meanwhile" assertion, and says so.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import db_rows, wait_until

from fastjob import RemoteError, Worker
from fastjob.models import InstanceUpdate, JobSpec, LogLine, ScheduleType, Status
from fastjob.protocol import Message
from fastjob.server.app import FastJobServer, ServerConfig
from fastjob.server.writer import StatusWriter
from fastjob.store import StoreError
from fastjob.store.sqlite import SQLiteStore

APP = "rules"
WAIT = 10.0  # bound of a wait for something that should happen promptly (generous for a loaded 2-core box)
FINAL = {"succeeded", "failed", "timed_out", "interrupted", "killed", "skipped", "cancelled"}
INSTANCE_COLS = ("id", "job_id", "app", "planned_ms", "attempt", "status", "trigger_kind", "worker", "error",
                 "result", "reruns", "dispatched_at", "started_at", "finished_at")


# ---- a scene: servers and workers of one test, always stopped --------------------------------


class Scene:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.db_path = tmp_path / "x.db"
        self.servers: list[FastJobServer] = []
        self.workers: list[Worker] = []

    @property
    def db(self) -> str:
        return f"sqlite:///{self.db_path}"

    async def server(self, **config: Any) -> FastJobServer:
        settings: dict[str, Any] = {
            "host": "127.0.0.1", "port": 0, "http_port": 0, "db": self.db,
            "heartbeat_interval": 0.2, "heartbeat_timeout": 3.0, "handshake_timeout": 5.0,
            "scan_horizon": 1.0,
        }
        settings.update(config)
        server = FastJobServer(ServerConfig(**settings))
        await server.start()
        self.servers.append(server)
        return server

    def worker(self, server: FastJobServer, app: str = APP, **kw: Any) -> Worker:
        kw.setdefault("servers", [server.address])
        kw.setdefault("reconnect_min", 0.05)
        kw.setdefault("reconnect_max", 0.3)
        worker = Worker(app=app, **kw)
        self.workers.append(worker)
        return worker

    async def close(self) -> None:
        for worker in self.workers:
            await asyncio.wait_for(worker.stop(grace=0), 15)
        for server in reversed(self.servers):
            await asyncio.wait_for(server.stop(), 20)

    # -- reading the database as an operator would --
    def instance(self, instance_id: int) -> dict[str, Any] | None:
        rows = db_rows(self.db, f"SELECT {', '.join(INSTANCE_COLS)} FROM instances WHERE id = ?", (instance_id,))
        return dict(zip(INSTANCE_COLS, rows[0], strict=True)) if rows else None

    def status(self, instance_id: int) -> str | None:
        row = self.instance(instance_id)
        return row["status"] if row else None

    def job_instances(self, app: str, job: str) -> list[dict[str, Any]]:
        cols = ", ".join(f"i.{c}" for c in INSTANCE_COLS)
        rows = db_rows(self.db, f"SELECT {cols} FROM instances i JOIN jobs j ON j.id = i.job_id"
                       " WHERE j.app = ? AND j.name = ? ORDER BY i.planned_ms, i.attempt", (app, job))
        return [dict(zip(INSTANCE_COLS, r, strict=True)) for r in rows]

    def logs(self, instance_id: int) -> list[str]:
        return [r[0] for r in db_rows(self.db, "SELECT message FROM job_logs WHERE instance_id = ? ORDER BY id",
                                      (instance_id,))]

    async def final(self, instance_id: int, timeout: float = WAIT) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            row = self.instance(instance_id)
            return row if row is not None and row["status"] in FINAL else None

        return await wait_until(done, timeout, f"instance {instance_id} to be final")


@pytest.fixture
async def scene(tmp_path: Path):
    s = Scene(tmp_path)
    try:
        yield s
    finally:
        await s.close()


def spy_frames(worker: Worker, kinds: set[str]) -> list[Message]:
    """Record the frames of these types that reach the worker (it still handles them as usual)."""
    seen: list[Message] = []
    handle = worker._on_message

    def spy(conn: Any, msg: Message) -> None:
        if msg.type in kinds:
            seen.append(msg)
        handle(conn, msg)

    worker._on_message = spy  # type: ignore[method-assign]
    return seen


def locked(path: Path) -> sqlite3.Connection:
    """Another connection holding the database's write lock: every writer waits, readers do not (WAL)."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def unlock(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def api_job(name: str, handler: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "handler": handler, "schedule_type": "api", **fields}


# ---- 1. the status writer keeps a batch the database refused ----------------------------------


class CountingStore(SQLiteStore):
    """The real SQLite store, counting the batches of status updates it could not write."""

    refused = 0

    async def write_statuses(self, updates: Any, lines: Any, finished: Any, alarms: Any = ()) -> None:
        try:
            await super().write_statuses(updates, lines, finished, alarms)
        except StoreError:
            self.refused += 1
            raise


async def _store_with_instances(path: Path, n: int) -> tuple[SQLiteStore, int, list[int]]:
    # fail fast while the file is locked: 50 ms busy timeout, retries for at most 0.2 s
    store = CountingStore(str(path), busy_timeout=0.05, retry_total=0.2, retry_initial=0.02)
    await store.open()
    await store.ensure_app(APP)
    epoch = await store.claim_app(APP, "server-1", 0)
    assert epoch is not None
    job = await store.upsert_job(JobSpec(app=APP, name="j", handler="h", schedule_type=ScheduleType.API),
                                 None, time.time())
    ids = []
    for i in range(n):
        row = await store.insert_instance("server-1", APP, epoch, job.id, 1_000 + i, 1, "api", None, time.time())
        assert row is not None
        ids.append(row.id)
    return store, job.id, ids


async def test_status_writer_keeps_a_batch_the_database_refused_and_writes_it_on_a_later_flush(scene):
    store, job_id, (a, b, untouched) = await _store_with_instances(scene.db_path, 3)
    try:
        writer = StatusWriter(store)
        t = time.time()
        writer.update(InstanceUpdate(a, Status.RUNNING, worker="w-1", started_at=t))
        writer.logs([LogLine(a, t, "INFO", "first line")])
        lock = locked(scene.db_path)
        try:
            assert await writer.flush() is False
            # more changes come while the database still refuses; the kept batch goes first
            writer.update(InstanceUpdate(a, Status.SUCCEEDED, finished_at=t + 1, result={"ok": 1}))
            writer.update(InstanceUpdate(b, Status.FAILED, finished_at=t + 1, error="boom"))
            writer.logs([LogLine(a, t + 0.5, "WARNING", "second line")])
            writer.job_finished(job_id, t + 1)
            assert await writer.flush() is False
            assert store.refused == 2
            # nothing of it reached the database
            assert [scene.status(i) for i in (a, b, untouched)] == ["waiting", "waiting", "waiting"]
            assert scene.logs(a) == []
        finally:
            unlock(lock)
        assert await writer.flush() is True
        row_a, row_b = scene.instance(a), scene.instance(b)
        assert row_a is not None and row_b is not None
        # the first refused update's fields survived two failed flushes and merged with the later ones
        assert (row_a["status"], row_a["worker"], row_a["started_at"], row_a["finished_at"], row_a["result"]) == (
            "succeeded", "w-1", t, t + 1, '{"ok":1}')
        assert (row_b["status"], row_b["error"]) == ("failed", "boom")
        assert scene.status(untouched) == "waiting"
        assert scene.logs(a) == ["first line", "second line"]
        assert db_rows(scene.db, "SELECT last_finished_time FROM jobs WHERE id = ?", (job_id,)) == [(t + 1,)]
        # written once: a further flush has nothing left to write
        assert await writer.flush() is True
        assert scene.logs(a) == ["first line", "second line"]
    finally:
        await store.close()


async def test_status_writer_loop_retries_a_refused_batch_by_itself(scene):
    store, _, (a, b) = await _store_with_instances(scene.db_path, 2)
    writer = StatusWriter(store)
    writer.start()
    try:
        lock = locked(scene.db_path)
        try:
            writer.update(InstanceUpdate(a, Status.SUCCEEDED, finished_at=time.time(), result="kept"))
            await wait_until(lambda: store.refused >= 1, WAIT, "the writer's flush to be refused")
            assert scene.status(a) == "waiting"
            writer.update(InstanceUpdate(b, Status.FAILED, finished_at=time.time(), error="later"))
        finally:
            unlock(lock)
        await wait_until(lambda: scene.status(a) == "succeeded" and scene.status(b) == "failed", WAIT,
                         "the kept batch to be written once the lock is gone")
        row = scene.instance(a)
        assert row is not None and row["result"] == '"kept"'
    finally:
        assert await writer.stop() is True
        await store.close()


# ---- 2. recovery of instances already dispatched or running -----------------------------------


async def test_running_instance_reattaches_to_its_reconnecting_worker_and_runs_once(scene):
    server = await scene.server()
    worker = scene.worker(server, worker_id="w-1")
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    @worker.handler("long")
    async def long(ctx):
        calls.append(ctx.instance_id)
        started.set()
        await release.wait()
        return {"ran": ctx.instance_id}

    worker.schedule("long")
    await worker.start()
    iid = await worker.trigger("long")
    await asyncio.wait_for(started.wait(), WAIT)
    await wait_until(lambda: scene.status(iid) == "running", WAIT, "the instance to be running")

    old = worker._conn
    assert old is not None and old.transport is not None
    old.transport.abort()  # a network cut; the worker reconnects by itself and names its run in HELLO
    await wait_until(lambda: worker.connected and worker._conn is not old, WAIT, "the worker to reconnect")
    assert scene.status(iid) == "running"  # not interrupted while its worker was away
    release.set()

    row = await scene.final(iid)
    assert (row["status"], row["result"], row["worker"], row["attempt"]) == (
        "succeeded", f'{{"ran":{iid}}}', "w-1", 1)
    assert calls == [iid]  # it ran once
    assert [r["id"] for r in scene.job_instances(APP, "long")] == [iid]  # no re-run was written


class OneSidedCut:
    """A TCP forwarder for workers. ``cut()`` silences the server-to-worker direction of the links
    open now and never passes their close on: the worker hears nothing and gives up on the link,
    while the server keeps receiving its PINGs and then sees a quiet, still open connection (an
    asymmetric partition). Links opened after the cut are forwarded normally."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.address = ""
        self._server: asyncio.base_events.Server | None = None
        self._links: list[dict[str, bool]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    def cut(self) -> None:
        for link in self._links:
            link["cut"] = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        link = {"cut": False}
        self._links.append(link)
        self._writers += [writer, up_writer]
        for src, dst, down in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, link, down))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: dict[str, bool], down: bool) -> None:
        try:
            while data := await src.read(65536):
                if down and link["cut"]:
                    continue  # lost on the way to the worker
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not link["cut"]:
                dst.transport.abort()


class Premise(Exception):
    """The scene did not come about as planned: a failure of the test, never the expected one."""


async def test_running_instance_reattaches_when_its_worker_reconnects_before_the_server_saw_the_cut(scene):
    """Rule 2 when the worker gives up on its connection first: the server still holds the old,
    quiet session when the worker's HELLO names the instance on a new one."""
    heartbeat_timeout, run_lease = 1.5, 2.5
    server = await scene.server(heartbeat_timeout=heartbeat_timeout, run_lease=run_lease)
    link = OneSidedCut(server.address)
    await link.start()
    release = asyncio.Event()
    try:
        worker = scene.worker(server, worker_id="w-1", servers=[link.address])
        started = asyncio.Event()
        calls: list[tuple[int, int]] = []

        @worker.handler("long")
        async def long(ctx):
            calls.append((ctx.instance_id, ctx.attempt))
            started.set()
            await release.wait()
            return "once"

        worker.schedule("long")
        await worker.start()
        iid = await worker.trigger("long")
        await asyncio.wait_for(started.wait(), WAIT)
        await wait_until(lambda: scene.status(iid) == "running", WAIT, "the instance to be running")
        old = worker._conn
        old_sessions = list(server.sessions[APP])
        superseded: list[Any] = []  # old sessions closed because the new one replaced them
        for session in old_sessions:
            def supersede(session: Any = session, close: Any = session.supersede) -> None:
                superseded.append(session)
                close()
            session.supersede = supersede
        link.cut()  # the worker hears nothing for its heartbeat timeout, gives up and reconnects
        try:
            await wait_until(lambda: worker.connected and worker._conn is not old, WAIT, "the worker to reconnect")
        except AssertionError as exc:
            raise Premise(str(exc)) from None
        if any(session.closed and session not in superseded for session in old_sessions):
            raise Premise("the server swept the old session before the worker came back")
        release.set()  # the run ends; its RESULT goes out on the new connection

        row = await scene.final(iid)
        assert (row["status"], row["result"], row["attempt"]) == ("succeeded", '"once"', 1), row
        assert calls == [(iid, 1)]
        # Observation window, not a wait for an event: the old session times out and the run lease
        # passes after it; nothing may re-run the instance meanwhile.
        await wait_until(lambda: all(s.closed for s in old_sessions), WAIT, "the server to drop the old session")
        await asyncio.sleep(run_lease + 0.5)
        assert calls == [(iid, 1)]
        assert [r["id"] for r in scene.job_instances(APP, "long")] == [iid]
    finally:
        release.set()
        await link.close()


@pytest.mark.parametrize("stage", ["dispatched", "running"])
async def test_instance_whose_worker_comes_back_without_it_is_rerun_at_once(scene, stage):
    # a 30 s run lease: a re-run that waited for the lease would miss every bound below
    server = await scene.server(run_lease=30.0)
    api = scene.worker(server, worker_id="api", role="client")
    first = scene.worker(server, worker_id="w-1", reconnect_min=30.0, reconnect_max=30.0)
    reached = asyncio.Event()

    @first.handler("job")
    async def hang(ctx):
        reached.set()
        await asyncio.Event().wait()

    if stage == "dispatched":
        def lose_it(conn: Any, body: dict[str, Any]) -> None:  # the DISPATCH arrives, then the network goes
            reached.set()
            conn.transport.abort()

        first._on_dispatch = lose_it  # type: ignore[method-assign]

    first.schedule("job")
    await first.start()
    await api.start()
    iid = await api.trigger("job")
    await asyncio.wait_for(reached.wait(), WAIT)
    await wait_until(lambda: scene.status(iid) == stage, WAIT, f"the instance to be {stage}")
    conn = first._conn
    if stage == "running":
        assert conn is not None and conn.transport is not None
        conn.transport.abort()
    if conn is not None:
        await asyncio.wait_for(conn.wait_closed(), WAIT)
    await first.stop(grace=0)  # this process never reconnects: its copy (if any) is gone
    assert scene.status(iid) == stage

    second = scene.worker(server, worker_id="w-1")  # the same worker id comes back, without the instance
    ran: list[tuple[int, int]] = []

    @second.handler("job")
    async def quick(ctx):
        ran.append((ctx.instance_id, ctx.attempt))
        return "again"

    await second.start()
    first_row = await scene.final(iid)
    assert first_row["status"] == "interrupted"
    assert first_row["error"] == "worker w-1 came back without it"

    def rerun_done() -> dict[str, Any] | None:
        rows = [r for r in scene.job_instances(APP, "job") if r["attempt"] == 2 and r["status"] in FINAL]
        return rows[0] if rows else None

    rerun = await wait_until(rerun_done, WAIT, "the re-run to finish")
    assert (rerun["trigger_kind"], rerun["reruns"], rerun["planned_ms"], rerun["status"], rerun["worker"]) == (
        "rerun", 1, first_row["planned_ms"], "succeeded", "w-1")
    assert ran == [(rerun["id"], 2)]
    assert len(scene.job_instances(APP, "job")) == 2


# ---- 3. the server-side timeout safety net and its CANCEL -------------------------------------


async def test_server_times_out_an_instance_whose_result_never_comes_and_cancels_it(scene):
    timeout, heartbeat_timeout = 0.2, 3.0
    server = await scene.server(heartbeat_timeout=heartbeat_timeout)
    worker = scene.worker(server)
    cancels = spy_frames(worker, {"CANCEL"})
    release = asyncio.Event()
    swallowed: list[float] = []

    @worker.handler("stubborn")
    async def stubborn(ctx):
        while not release.is_set():  # ignores every cancellation: the worker's own timeout cannot stop it
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                swallowed.append(time.time())
        return "too late"

    worker.schedule("stubborn", timeout=timeout)
    await worker.start()
    conn = worker._conn
    try:
        iid = await worker.trigger("stubborn")
        row = await scene.final(iid, timeout=timeout + heartbeat_timeout + WAIT)
        assert row["status"] == "timed_out"
        assert row["error"] == f"no result within the {timeout}s timeout"
        assert row["dispatched_at"] is not None and row["finished_at"] is not None
        # not before the worker had the timeout plus a heartbeat timeout to answer (timer slack allowed)
        assert row["finished_at"] - row["dispatched_at"] >= timeout + heartbeat_timeout - 0.02
        assert swallowed, "the worker's own timeout never reached the handler"
        assert worker._conn is conn and worker.connected  # the worker stayed connected all along
        await wait_until(lambda: cancels, WAIT, "the CANCEL to reach the worker")
        assert [m.body for m in cancels] == [{"instance_id": iid, "reason": "timeout"}]
        # the worker answers the CANCEL with its own RESULT; the server's final record stands
        await wait_until(lambda: iid in worker._sent_results, WAIT, "the worker's answer to the CANCEL")
        assert worker._sent_results[iid]["status"] == "timed_out"
        await wait_until(lambda: not server.scheduler.tasks, WAIT, "the late result to be handled")
        await server.scheduler.writer.flush()
        assert scene.instance(iid)["error"] == f"no result within the {timeout}s timeout"  # type: ignore[index]
    finally:
        release.set()


# ---- 5. a fire whose job was deleted or disabled before it came due ----------------------------


async def test_a_written_fire_of_a_job_deleted_or_disabled_before_it_came_due_is_cancelled(scene):
    server = await scene.server(scan_horizon=5.0)
    worker = scene.worker(server)
    ran: collections.Counter[str] = collections.Counter()

    @worker.handler("h")
    async def h(ctx):
        ran[ctx.job] += 1

    await worker.start()
    at = time.time() + 3.0  # within the 5 s horizon: written to the WAL at once
    names = {"deleted": at, "disabled": at, "control": at + 0.3}
    for name, when in names.items():
        await worker.call("JOB_UPSERT", {"job": {"name": name, "handler": "h", "schedule_type": "once",
                                                 "schedule_expr": repr(when)}})

    def written() -> dict[str, int] | None:
        found = {n: [r for r in scene.job_instances(APP, n) if r["status"] == "waiting"] for n in names}
        return {n: rows[0]["id"] for n, rows in found.items()} if all(found.values()) else None

    ids = await wait_until(written, WAIT, "the three fires to be written")
    assert time.time() < at - 0.3, "the fires came due before the test could change their jobs"
    assert await worker.delete_job("deleted") is True
    assert await worker.set_enabled("disabled", False) is True

    await wait_until(lambda: ran["control"] == 1, WAIT, "the control fire to run")  # due after the other two
    for name in ("deleted", "disabled"):
        row = await scene.final(ids[name])
        assert (row["status"], row["error"]) == ("cancelled", "job deleted or disabled before its fire"), name
        assert row["worker"] is None and row["started_at"] is None
    assert (await scene.final(ids["control"]))["status"] == "succeeded"
    assert ran == {"control": 1}


# ---- 6. isolation between apps ----------------------------------------------------------------


async def test_a_worker_of_another_app_cannot_report_on_or_read_an_instance(scene):
    server = await scene.server()
    a = scene.worker(server, app="app-a", worker_id="wa", max_concurrency=1)
    b = scene.worker(server, app="app-b", worker_id="wb")
    release = asyncio.Event()

    @a.handler("hold")
    async def hold(ctx):
        ctx.log.info("line from a")
        await release.wait()
        return "a"

    @a.handler("other")
    async def other(ctx):
        ctx.log.info("other line from a")
        return "a2"

    @b.handler("own")
    async def own(ctx):
        return "b"

    a.schedule("hold")
    a.schedule("other")
    b.schedule("own", tags=["nowhere"])  # no worker has this tag: b's own fire waits, untracked by any session
    await a.start()
    await b.start()
    running = await a.trigger("hold")
    await wait_until(lambda: scene.status(running) == "running", WAIT, "a's instance to run")
    waiting = await a.trigger("other")  # a's only slot is taken: it waits for a worker
    own_id = await b.trigger("own")

    assert b._conn is not None
    now = time.time()
    for iid in (running, waiting):
        b._conn.send("ACK", {"instance_id": iid, "accepted": False, "reason": "forged by b"})
        b._conn.send("START", {"instance_id": iid, "started_at": now})
        b._conn.send("LOG", {"instance_id": iid, "lines": [[now, "ERROR", "forged by b"]]})
        b._conn.send("RESULT", {"instance_id": iid, "status": "failed", "error": "forged by b",
                                "started_at": now, "finished_at": now})
    # the same late RESULT for b's own waiting instance is recorded: once it is, the frames sent
    # before it on the same connection were handled too
    b._conn.send("RESULT", {"instance_id": own_id, "status": "succeeded", "result": "late",
                            "started_at": now, "finished_at": now})
    await wait_until(lambda: scene.status(own_id) == "succeeded", WAIT, "b's own late result to be recorded")

    row = scene.instance(running)
    assert row is not None and (row["status"], row["worker"], row["error"]) == ("running", "wa", None)
    row = scene.instance(waiting)
    assert row is not None and (row["status"], row["worker"], row["error"]) == ("waiting", None, None)
    # b's client calls do not see a's instance; a's do
    for call in (b.get_instance(running), b.get_logs(running)):
        with pytest.raises(RemoteError) as err:
            await call
        assert err.value.code == "not_found"
    assert (await a.get_instance(running))["id"] == running

    release.set()
    assert (await scene.final(running))["result"] == '"a"'
    assert (await scene.final(waiting))["result"] == '"a2"'
    assert [line[2] for line in await a.get_logs(running)] == ["line from a"]
    assert [line[2] for line in await a.get_logs(waiting)] == ["other line from a"]
    for iid in (running, waiting):
        row = scene.instance(iid)
        assert row is not None and (row["status"], row["worker"], row["error"]) == ("succeeded", "wa", None)


# ---- 7. reacting to being fenced --------------------------------------------------------------


async def test_a_server_whose_app_moved_behind_its_back_drops_it_and_sends_its_workers_away(scene):
    # heartbeats every 30 s: within this test only a scan (every 0.1 s) can notice the move
    slow_heartbeat = {"heartbeat_interval": 30.0, "heartbeat_timeout": 120.0, "scan_horizon": 0.5}
    both = [await scene.server(**slow_heartbeat), await scene.server(**slow_heartbeat)]
    worker = scene.worker(both[0], servers=[s.address for s in both])
    errors = spy_frames(worker, {"ERROR"})
    ran: list[str | None] = []

    @worker.handler("job")
    async def job(ctx):
        ran.append(worker.server_id)

    worker.schedule("job")
    await worker.start()
    owner = next(s for s in both if APP in s.cluster.owned)  # the app went to the less loaded (by id)
    other = next(s for s in both if s is not owner)
    assert worker.server_id == owner.cluster.server_id and APP not in other.cluster.owned
    epoch = owner.cluster.owned[APP]

    store = SQLiteStore(str(scene.db_path))
    await store.open()
    try:
        assert await store.claim_app(APP, other.cluster.server_id, epoch) == epoch + 1
    finally:
        await store.close()

    await wait_until(lambda: APP not in owner.cluster.owned, WAIT, "the fenced server to drop the app")
    await wait_until(lambda: worker.connected and worker.server_id == other.cluster.server_id, WAIT,
                     "the worker to land on the new owner")
    assert [(m.body["code"], m.body.get("fatal")) for m in errors] == [("not_owner", True)]
    assert owner.sessions.get(APP, []) == []
    assert other.cluster.owned[APP] > epoch + 1  # the new owner adopted it (a claim of its own)
    iid = await worker.trigger("job")
    row = await scene.final(iid)
    assert row["status"] == "succeeded"
    assert ran == [other.cluster.server_id]
    assert db_rows(scene.db, "SELECT server FROM instances WHERE id = ?", (iid,)) == [(other.cluster.server_id,)]


async def _one_shot_in_wal(scene: Scene, worker: Worker, name: str, handler: str, at: float) -> int:
    """Declare a one-shot job due at ``at`` (within the server's horizon) and wait until its fire is
    in the WAL; its instance id."""
    await worker.call("JOB_UPSERT", {"job": {"name": name, "handler": handler, "schedule_type": "once",
                                             "schedule_expr": repr(at)}})
    rows = await wait_until(lambda: [r for r in scene.job_instances(APP, name) if r["status"] == "waiting"],
                            WAIT, "the fire to be written")
    return int(rows[0]["id"])


async def test_a_server_whose_heartbeats_fail_holds_fires_until_its_lease_is_renewed(scene):
    # failing store calls give up after 0.3 s; the lease is stale 0.8 s after the last heartbeat
    server = await scene.server(db=f"{scene.db}?busy_timeout=0.05&retry_total=0.3", heartbeat_interval=0.2,
                                heartbeat_timeout=1.0, scan_horizon=5.0)
    worker = scene.worker(server)
    ran: list[float] = []

    @worker.handler("h")
    async def h(ctx):
        ran.append(time.time())

    await worker.start()
    at = time.time() + 4.0  # within the 5 s horizon: written to the WAL at once
    iid = await _one_shot_in_wal(scene, worker, "late", "h", at)
    epoch = server.cluster.owned[APP]

    lock = locked(scene.db_path)
    try:
        await wait_until(lambda: not server.cluster.lease_valid(), WAIT, "the lease to go stale")
        assert time.time() < at, "the fire came due before the lease went stale"
        await wait_until(lambda: any(row.id == iid for row, _ in server.scheduler.held), at - time.time() + WAIT,
                         "the due fire to be held")
        assert ran == []
        assert server.cluster.owned.get(APP) == epoch  # it keeps its app through its own outage
        assert not server.cluster.lease_valid()
        assert scene.status(iid) == "waiting"
    finally:
        released_at = time.time()
        unlock(lock)

    await wait_until(lambda: ran, WAIT, "the held fire to run once the lease is renewed")
    assert ran[0] >= released_at
    assert (await scene.final(iid))["status"] == "succeeded"
    assert server.cluster.owned.get(APP) == epoch and server.cluster.lease_valid()
    assert len(ran) == 1


async def test_held_fires_go_out_when_the_renewal_itself_outlived_the_lease(scene):
    """The database comes back in the middle of a lease renewal that began while it was away: the
    renewal succeeds, but the lease it earns (counted from when it was sent) is already stale.
    The held fires must still go out once a renewal gives a valid lease, not stay held for good."""
    # a patient store: the renewal waits (retrying) for the lock instead of failing
    server = await scene.server(db=f"{scene.db}?busy_timeout=0.05&retry_total=30", heartbeat_interval=0.2,
                                heartbeat_timeout=1.0, scan_horizon=5.0)
    worker = scene.worker(server)
    ran: list[float] = []

    @worker.handler("h")
    async def h(ctx):
        ran.append(time.time())

    await worker.start()
    at = time.time() + 3.0
    await _one_shot_in_wal(scene, worker, "late", "h", at)
    lock = locked(scene.db_path)
    try:
        await wait_until(lambda: server.scheduler.held, at - time.time() + WAIT, "the due fire to be held")
        # the stimulus, not a wait for an event: the renewal started by the hold stays blocked for
        # longer than the 0.8 s lease it will earn
        await asyncio.sleep(1.5)
        assert ran == []
    finally:
        unlock(lock)
    await wait_until(lambda: ran, WAIT, "the held fire to run once a renewal gives a valid lease")
    assert len(ran) == 1


async def test_a_dispatch_right_after_an_outage_is_not_cut_by_the_workers_lapsed_run_lease(scene):
    """During the outage the server's PONGs say lease false, so the worker's run lease lapses. The
    first fires after the outage come from a server whose lease is valid again: the worker must run
    them to the end (it waits for a vouching PONG first), not interrupt them as soon as they start."""
    server = await scene.server(db=f"{scene.db}?busy_timeout=0.05&retry_total=0.3", heartbeat_interval=0.2,
                                heartbeat_timeout=1.0, run_lease=1.0, scan_horizon=5.0)
    worker = scene.worker(server)
    runs: list[tuple[int, int]] = []

    @worker.handler("h")
    async def h(ctx):
        runs.append((ctx.instance_id, ctx.attempt))
        await asyncio.sleep(0.6)  # longer than the worker's lease check period
        return "done"

    await worker.start()
    at = time.time() + 3.0
    iid = await _one_shot_in_wal(scene, worker, "after", "h", at)
    loop = asyncio.get_running_loop()
    # From the outage on, PONGs reach the worker late: only half a second after the first DISPATCH
    # (network delay, as when the server's pings queue behind a burst). Without that, a PONG racing
    # the DISPATCH could renew the lease first and hide the rule.
    dispatched_at: list[float] = []
    real_on_message = worker._on_message

    def delayed_pongs(conn: Any, msg: Message) -> None:
        if msg.type == "DISPATCH" and not dispatched_at:
            dispatched_at.append(loop.time())
        if msg.type == "PONG" and (not dispatched_at or loop.time() < dispatched_at[0] + 0.5):
            return
        real_on_message(conn, msg)

    lock = locked(scene.db_path)
    try:
        await wait_until(lambda: server.scheduler.held, at - time.time() + WAIT, "the due fire to be held")
        await wait_until(lambda: loop.time() - worker._server_alive_at > worker.run_lease, WAIT,
                         "the worker's run lease to lapse")
        worker._on_message = delayed_pongs  # type: ignore[method-assign]
    finally:
        unlock(lock)
    row = await scene.final(iid)
    assert (row["status"], row["attempt"]) == ("succeeded", 1), row
    assert runs == [(iid, 1)]
    assert [r["attempt"] for r in scene.job_instances(APP, "after")] == [1]


# ---- 9. a fixed-delay chain lost in a crash ------------------------------------------------------


async def test_fixed_delay_chain_lost_in_a_crash_restarts_when_a_server_gains_the_app(scene):
    delay, hold = 0.3, 0.1
    store = SQLiteStore(str(scene.db_path))
    await store.open()
    try:
        # what a crash between a finish and the next-fire write leaves: the last link finished,
        # next_trigger_ms NULL, nothing in flight, the app still owned by the dead server
        spec = JobSpec(app=APP, name="chain", handler="chain", schedule_type=ScheduleType.FIXED_DELAY,
                       schedule_expr=repr(delay))
        job = await store.upsert_job(spec, None, time.time())
        await store.ensure_app(APP)
        epoch = await store.claim_app(APP, "crashed-server", 0)
        assert epoch is not None
        last = await store.insert_instance("crashed-server", APP, epoch, job.id, int(time.time() * 1000) - 5_000, 1,
                                           "schedule", None, time.time() - 5)
        assert last is not None
        await store.update_instances([InstanceUpdate(last.id, Status.SUCCEEDED, finished_at=time.time() - 4)])
        assert (await store.get_job(job.id)).next_trigger_ms is None  # type: ignore[union-attr]
    finally:
        await store.close()

    gained_from = time.time()
    server = await scene.server(second_level_threshold=0)
    worker = scene.worker(server)
    runs: list[tuple[float, float, float]] = []  # (planned, started, ended)

    @worker.handler("chain")
    async def chain(ctx):
        started = time.time()
        await asyncio.sleep(hold)
        runs.append((ctx.scheduled_at, started, time.time()))

    await worker.start()
    await wait_until(lambda: len(runs) >= 4, WAIT + 5, "the chain to run four times")
    assert APP in server.cluster.owned
    assert runs[0][0] >= gained_from - 0.001  # a fresh fire, planned when the server gained the app
    for (_, _, ended0), (planned1, started1, _) in itertools.pairwise(runs):
        assert planned1 >= ended0 + delay - 0.001, runs  # the delay counts from the previous finish
        assert started1 >= planned1 - 0.002, runs
        assert abs(planned1 * 1000 - round(planned1 * 1000)) < 1e-3  # planned on the millisecond grid
    rows = scene.job_instances(APP, "chain")
    assert rows[0]["id"] == last.id and all(r["trigger_kind"] == "schedule" for r in rows)


# ---- 10a. a fire refused by one worker runs on another ------------------------------------------


async def test_a_fire_refused_by_a_worker_without_the_handler_runs_on_another(scene):
    server = await scene.server()
    bare = scene.worker(server, worker_id="w-bare")  # registers no handler for the job
    sent_to_bare = spy_frames(bare, {"DISPATCH"})
    able = scene.worker(server, worker_id="w-able")
    ran: list[int] = []

    @able.handler("job")
    async def job(ctx):
        ran.append(ctx.instance_id)
        return "ok"

    able.schedule("job")
    await bare.start()
    await able.start()
    ids = []
    # round robin over two workers: of any two triggers in a row, one goes to the bare worker first
    for _ in range(3):
        iid = await able.trigger("job")
        ids.append(iid)
        row = await scene.final(iid)
        assert (row["status"], row["worker"], row["attempt"]) == ("succeeded", "w-able", 1)
    assert ran == ids
    refused = [m.body["instance_id"] for m in sent_to_bare]
    assert refused and set(refused) <= set(ids)
    assert len(scene.job_instances(APP, "job")) == 3  # re-routed, not retried


# ---- 10b. random routing, within the job's tags ----------------------------------------------------


async def test_random_routing_spreads_fires_over_the_workers_that_have_the_jobs_tags(scene):
    server = await scene.server()
    ran: dict[int, str] = {}
    workers = {}
    for wid, tags in (("gpu-1", ["gpu"]), ("gpu-2", ["gpu", "eu"]), ("cpu-1", ["cpu"])):
        w = workers[wid] = scene.worker(server, worker_id=wid, tags=tags)

        def record(ctx, wid: str = wid) -> None:
            ran[ctx.instance_id] = wid

        w.handler("train")(record)
    workers["cpu-1"].schedule("train", tags=["gpu"], routing="random")
    for w in workers.values():
        await w.start()
    n = 24
    ids = []
    for _ in range(n):
        ids.append(await workers["cpu-1"].trigger("train"))
        await scene.final(ids[-1])
    assert sorted(ran) == sorted(ids)
    counts = collections.Counter(ran.values())
    # 24 fair coin flips: all on one side, or a strict alternation, has odds of about 1e-7
    assert counts["cpu-1"] == 0, counts
    assert counts["gpu-1"] >= 1 and counts["gpu-2"] >= 1, counts
    order = [ran[i] for i in ids]
    assert any(x == y for x, y in itertools.pairwise(order)), f"a fixed rotation, not random: {order}"


# ---- 10c. second-level jobs on the worker ----------------------------------------------------------

# Stats are written every 1 s (5 heartbeat intervals); a worker's lease on its second-level jobs is
# 1.5 s (0.75 heartbeat timeouts), and a newly gained app hands its jobs out after one lease (+ margin).
SL = {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0}


async def _sl_job_id(worker: Worker, name: str) -> int:
    job_id = (await worker.get_job(name))["id"]
    await wait_until(lambda: job_id in worker.second_level.jobs, WAIT, f"{name} to be handed to the worker")
    return job_id


async def _sl_stats(worker: Worker, name: str, skipped_at_least: int) -> dict[str, Any]:
    async def stats() -> dict[str, Any] | None:
        got = (await worker.get_job(name))["stats"]
        return got if got and got.get("skipped", 0) >= skipped_at_least else None

    return await wait_until(stats, WAIT, f"a stored report of {name} with {skipped_at_least}+ skipped", poll=0.1)


async def test_second_level_fixed_delay_starts_a_period_after_the_previous_run_ended(scene):
    delay = 0.25
    server = await scene.server(**SL)
    worker = scene.worker(server)
    runs: list[tuple[float, float, float]] = []

    @worker.handler("tick")
    async def tick(ctx):
        started = time.time()
        await asyncio.sleep(0.15)
        runs.append((ctx.scheduled_at, started, time.time()))

    worker.schedule("tick", delay=delay)
    await worker.start()
    await _sl_job_id(worker, "tick")
    await wait_until(lambda: len(runs) >= 4, WAIT, "four runs")
    assert scene.job_instances(APP, "tick") == []  # run by the worker, not through the WAL
    for (_, _, ended0), (planned1, started1, _) in itertools.pairwise(runs):
        assert planned1 >= ended0 + delay - 1e-6, runs
        assert started1 >= planned1 - 0.002, runs


async def test_second_level_fixed_rate_skips_and_counts_periods_missed_while_the_worker_was_busy(scene):
    period = 0.1
    server = await scene.server(**{**SL, "heartbeat_timeout": 3.0})  # a 2.25 s lease outlasts the busy second
    worker = scene.worker(server)
    planned: list[float] = []

    @worker.handler("rate")
    async def rate(ctx):
        planned.append(ctx.scheduled_at)

    worker.schedule("rate", interval=period, overlap="allow")  # no overlap skips: only missed periods
    await worker.start()
    await _sl_job_id(worker, "rate")
    await wait_until(lambda: len(planned) >= 3, WAIT, "three runs")
    # The stimulus, not a wait: the worker's event loop (shared with this test) is busy for 1 s.
    busy_from = time.time()
    time.sleep(1.0)  # noqa: ASYNC251 - blocking the loop is the point
    busy_to = time.time()
    seen = len(planned)
    await wait_until(lambda: len(planned) >= seen + 3, WAIT, "runs after the busy second")
    # at most the one fire that was due when the worker got busy runs late; the rest are skipped
    late = [p for p in planned if busy_from < p < busy_to - period / 2]
    assert len(late) <= 1, (late, busy_from, busy_to)
    # the first run comes at once, the rest on the job's grid; epoch-second floats resolve to ~2e-7 s:
    # compare on the grid to 1e-3 of a period
    grid = planned[1]
    assert all(abs((p - grid) / period - round((p - grid) / period)) < 1e-3 for p in planned[1:]), planned
    stats = await _sl_stats(worker, "rate", 7)  # ~9 periods of the busy second were missed
    assert stats["runs"] >= 3


async def test_second_level_run_longer_than_its_period_skips_the_overlapping_fires(scene):
    period, hold = 0.1, 0.35
    server = await scene.server(**SL)
    worker = scene.worker(server)
    spans: list[tuple[float, float, float]] = []
    active = [0, 0]  # now, most at once

    @worker.handler("slow")
    async def slow(ctx):
        active[0] += 1
        active[1] = max(active[1], active[0])
        started = time.time()
        try:
            await asyncio.sleep(hold)
        finally:
            active[0] -= 1
        spans.append((ctx.scheduled_at, started, time.time()))

    worker.schedule("slow", interval=period)  # overlap queue (the default): no two runs at once
    await worker.start()
    await _sl_job_id(worker, "slow")
    await wait_until(lambda: len(spans) >= 3, WAIT, "three runs")
    assert active[1] == 1  # never two runs at once
    for (p0, _, ended0), (p1, started1, _) in itertools.pairwise(spans):
        assert started1 >= ended0, spans
        assert p1 - p0 >= 3 * period - 1e-5, spans  # the fires that came due meanwhile did not run
    stats = await _sl_stats(worker, "slow", 4)  # ... and were counted: 3 fall inside each 0.35 s run
    assert stats["runs"] >= 3


async def test_second_level_period_change_reaches_the_runner(scene):
    server = await scene.server(**SL)
    worker = scene.worker(server)
    planned: list[float] = []

    @worker.handler("rate")
    async def rate(ctx):
        planned.append(ctx.scheduled_at)

    worker.schedule("rate", interval=0.2)
    await worker.start()
    job_id = await _sl_job_id(worker, "rate")
    await wait_until(lambda: len(planned) >= 4, WAIT, "four runs")
    # the first run comes at once, the rest every period on the job's grid
    assert all(abs(b - a - 0.2) < 1e-5 for a, b in itertools.pairwise(planned[1:])), planned
    version = worker.second_level.jobs[job_id].spec["version"]
    reply = await worker.call("JOB_UPSERT", {"job": {"name": "rate", "handler": "rate",
                                                     "schedule_type": "fixed_rate", "schedule_expr": "0.5"}})
    assert reply["job"]["version"] > version
    await wait_until(lambda: worker.second_level.jobs[job_id].spec["period"] == 0.5, WAIT,
                     "the new period to reach the runner")
    seen = len(planned)
    # a new schedule starts anew: one run at once, then every new period
    await wait_until(lambda: len(planned) >= seen + 4, WAIT, "runs at the new period")
    tail = planned[-3:]
    assert all(abs(b - a - 0.5) < 1e-5 for a, b in itertools.pairwise(tail)), planned


# ---- 10d. Worker.run() in its own process -----------------------------------------------------------

RUN_SCRIPT = """
import sys
from fastjob import Worker

server, out = sys.argv[1], sys.argv[2]
worker = Worker(app="proc-app", servers=[server], worker_id="proc-worker", reconnect_max=0.5)

@worker.handler("once")
async def once(ctx):
    with open(out, "a") as f:
        f.write(f"{ctx.instance_id}\\n")
    return "done"

worker.schedule("once", run_once=True)
worker.run()
"""


async def test_worker_run_registers_runs_a_job_and_exits_cleanly_on_sigterm(scene):
    server = await scene.server()
    script = scene.tmp_path / "run_worker.py"
    script.write_text(RUN_SCRIPT)
    out = scene.tmp_path / "ran.txt"
    log_path = scene.tmp_path / "run_worker.log"
    with open(log_path, "wb") as log_file:  # noqa: ASYNC230 - a local file, opened once
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), server.address, str(out),
                                                    stdout=log_file, stderr=log_file)
    try:
        text = await wait_until(lambda: out.exists() and out.read_text().strip(), 30,
                                "the worker process to run its job")
        iid = int(text.split()[0])
        row = await scene.final(iid)
        assert (row["status"], row["worker"], row["result"]) == ("succeeded", "proc-worker", '"done"')
        assert [s.worker_id for s in server.sessions.get("proc-app", [])] == ["proc-worker"]
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
        assert code == 0, log_path.read_text(errors="replace")[-3000:]
        await wait_until(lambda: not server.sessions.get("proc-app"), WAIT, "the server to see it go")
        assert out.read_text().split() == [str(iid)]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
