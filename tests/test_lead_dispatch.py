"""Lead dispatch (protocol 5): fires sent ahead of their time, started by the worker's own wheel on time.

The rules run in one process (memory store, fake time, fake sessions: tests/fakes.py) at the
exact instants they speak of; the end-to-end cases run a real server process and a real worker.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakes import APP, FakeSession, Scene
from harness import FAST_CLUSTER_ARGS, next_event, wait_until

from fastjob import Worker
from fastjob.models import JobSpec, ScheduleType, Status
from fastjob.protocol import KILL_REASON, WITHDRAW_REASON
from fastjob.server.cluster import Origin
from fastjob.server.recovery import recovery_window
from fastjob.worker_link import ClockOffset

EVERY_10S = dict(schedule_type=ScheduleType.FIXED_RATE, schedule_expr="10.0")


@pytest.fixture
async def scene() -> AsyncIterator[Scene]:
    scene = await Scene(lead_time=1.0).start()
    try:
        yield scene
    finally:
        await scene.close()


def sent(session: FakeSession, kind: str) -> list[dict[str, Any]]:
    return [body for k, body in session.sent if k == kind]


async def status_of(scene: Scene, job: int, instance_id: int) -> Status:
    return next(r.status for r in await scene.rows(job) if r.id == instance_id)


def lose(scene: Scene, session: FakeSession, by_peer: bool) -> None:
    """The session ends now: closed by the worker (it died, or reconnects) or by the server."""
    session.closed_by_peer = by_peer
    session.last_received = asyncio.get_running_loop().time()
    scene.sessions.remove(session)
    scene.scheduler.worker_left(session)


async def second_fire(scene: Scene, worker: FakeSession, **fields: Any) -> tuple[int, int]:
    """A job every 10 s whose first fire (due at once) has run; returns (job id, second fire's id),
    the second fire written to the WAL and not yet at its lead time (8.5 s from its first)."""
    job = await scene.job("j", **{**EVERY_10S, **fields})
    await scene.scan()
    await scene.advance(0.001)
    first = (await scene.rows(job))[0]
    scene.result(worker, first.id)
    await scene.advance(8.5)
    await scene.scan()
    second = [r for r in await scene.rows(job) if r.status is Status.WAITING]
    assert len(second) == 1
    return job, second[0].id


@pytest.mark.rules
@pytest.mark.parametrize("version", [4, 5])
async def test_a_fire_goes_ahead_only_to_a_version_5_worker_and_takes_its_slot_only_when_it_starts(
        scene: Scene, version: int) -> None:
    worker = scene.worker("w1", capacity=1, version=version)
    _, fire = await second_fire(scene, worker)
    await scene.advance(0.5)  # its lead time: 1 s before it is due
    lead = [d for d in worker.dispatched() if d["instance_id"] == fire]
    if version == 4:
        assert lead == [], "an older worker gets each fire when it is due"
        await scene.advance(1.0)
        assert [d for d in worker.dispatched() if d["instance_id"] == fire][0].get("start_at") is None
        return
    assert lead and lead[0]["start_at"] == lead[0]["scheduled_at"]
    assert worker.has_room(), "a lead fire takes no slot before it starts"
    scene.scheduler.on_start(worker, {"instance_id": fire, "started_at": scene.clock.wall()})
    assert not worker.has_room()


@pytest.mark.rules
async def test_a_lead_fire_whose_worker_closed_its_connection_goes_elsewhere_at_once(scene: Scene) -> None:
    w1 = scene.worker("w1", version=5)
    _, fire = await second_fire(scene, w1)
    await scene.advance(0.5)
    assert [d["instance_id"] for d in w1.dispatched()][-1] == fire
    w2 = scene.worker("w2", version=5)
    lose(scene, w1, by_peer=True)  # it died, or reconnects: it starts nothing of this connection
    await scene.advance(0.001)
    again = [d for d in w2.dispatched() if d["instance_id"] == fire]
    assert again and again[0]["start_at"] == again[0]["scheduled_at"], "sent ahead again, 1 s early"
    # the first worker comes back naming it: it must not start there
    back = scene.worker_rejoins("w1", leading=[fire])
    assert sent(back, "CANCEL") == [{"instance_id": fire, "reason": WITHDRAW_REASON}]


@pytest.mark.rules
async def test_a_lead_fire_whose_start_may_be_on_its_way_waits_for_its_worker(scene: Scene) -> None:
    w1 = scene.worker("w1", version=5)
    job, fire = await second_fire(scene, w1)
    await scene.advance(1.45)  # 0.05 s before its time: within the clock-skew margin
    w2 = scene.worker("w2", version=5)
    lose(scene, w1, by_peer=True)
    await scene.advance(0.1)
    assert not [d for d in w2.dispatched() if d["instance_id"] == fire], "never two copies at once"
    await scene.advance(10.5)  # the lost worker's run lease (10 s) is surely out: run again
    assert await status_of(scene, job, fire) is Status.INTERRUPTED


@pytest.mark.rules
async def test_a_lead_fire_of_a_worker_we_closed_waits_and_is_confirmed_when_it_comes_back(scene: Scene) -> None:
    w1 = scene.worker("w1", version=5)
    _, fire = await second_fire(scene, w1)
    await scene.advance(0.5)
    lose(scene, w1, by_peer=False)  # closed by us (say its heartbeat was late): it may not know yet
    w2 = scene.worker("w2", version=5)
    await scene.advance(0.1)
    assert not [d for d in w2.dispatched() if d["instance_id"] == fire]
    back = scene.worker_rejoins("w1", leading=[fire])
    confirmed = [d for d in back.dispatched() if d["instance_id"] == fire]
    assert confirmed and confirmed[0]["start_at"] == confirmed[0]["scheduled_at"]


@pytest.mark.rules
async def test_a_stale_answer_to_a_withdrawal_does_not_move_a_confirmed_lead_fire(scene: Scene) -> None:
    """A worker that names its lead fires while the app's WAL is still loading gets a withdrawal (the fire
    is unknown yet), then a confirmation: its answer to the withdrawal must not send the fire elsewhere."""
    w1 = scene.worker("w1", version=5)
    _, fire = await second_fire(scene, w1)
    await scene.advance(0.5)
    w2 = scene.worker("w2", version=5)
    scene.scheduler.on_ack(w1, {"instance_id": fire, "accepted": False, "reason": WITHDRAW_REASON})
    await scene.advance(1.1)
    assert [d for d in w2.dispatched() if d["instance_id"] == fire] == [], "one copy: the first worker holds it"
    assert [d["instance_id"] for d in w1.dispatched()].count(fire) == 1


@pytest.mark.rules
@pytest.mark.parametrize("change", ["params", "pause"])
async def test_a_changed_job_withdraws_its_lead_fire_and_fires_as_it_now_says(scene: Scene, change: str) -> None:
    worker = scene.worker("w1", version=5)
    job, fire = await second_fire(scene, worker, params={"v": 1})
    await scene.advance(0.5)
    assert [d["params"] for d in worker.dispatched() if d["instance_id"] == fire] == [{"v": 1}]
    spec = JobSpec(app=APP, name="j", handler="j", params={"v": 2}, enabled=change != "pause", **EVERY_10S)
    row = await scene.store.upsert_job(spec, None, scene.clock.wall())
    scene.scheduler.job_changed(row)
    assert sent(worker, "CANCEL") == [{"instance_id": fire, "reason": WITHDRAW_REASON}]
    scene.scheduler.on_ack(worker, {"instance_id": fire, "accepted": False, "reason": WITHDRAW_REASON})
    await scene.advance(1.0)  # its planned time
    again = [d for d in worker.dispatched() if d["instance_id"] == fire][1:]
    if change == "pause":
        assert again == [] and await status_of(scene, job, fire) is Status.CANCELLED
    else:
        assert [d["params"] for d in again] == [{"v": 2}] and "start_at" not in again[0]


@pytest.mark.rules
@pytest.mark.parametrize("overlap", ["queue", "skip", "allow"])
async def test_a_lead_fire_waits_for_its_line_and_goes_ahead_when_the_run_before_it_ends(overlap: str) -> None:
    scene = await Scene(lead_time=0.5).start()
    try:
        worker = scene.worker("w1", version=5)
        job = await scene.job("j", schedule_type=ScheduleType.FIXED_RATE, schedule_expr="1.0", overlap=overlap)
        await scene.scan()
        await scene.advance(0.001)
        first = (await scene.rows(job))[0]
        await scene.advance(0.6)  # the second fire's lead time came (at 0.5): the first still runs
        rows = await scene.rows(job)
        if overlap == "allow":  # nothing to wait for: it went ahead at its lead time
            assert [d["instance_id"] for d in worker.dispatched()] == [first.id, rows[1].id]
            return
        assert len(worker.dispatched()) == 1, "the line is held: nothing goes ahead"
        scene.result(worker, first.id)
        await scene.advance(0.001)
        ahead = worker.dispatched()[-1]
        assert ahead["instance_id"] == rows[1].id and ahead["start_at"] == rows[1].planned_ms / 1000.0
    finally:
        await scene.close()


@pytest.mark.rules
async def test_a_fire_goes_ahead_at_most_half_the_gap_after_the_fire_before_it(scene: Scene) -> None:
    """A per-second job's fire goes 0.5 s ahead, not the full 1 s lead time: at its lead time the fire
    before it has had half a second to end, so the line is usually free and nothing waits twice."""
    worker = scene.worker("w1", version=5)
    job = await scene.job("j", schedule_type=ScheduleType.FIXED_RATE, schedule_expr="1.0")
    await scene.scan()
    await scene.advance(0.001)
    first = (await scene.rows(job))[0]
    scene.result(worker, first.id)
    await scene.advance(0.45)
    assert [d["instance_id"] for d in worker.dispatched()] == [first.id], "not a full second ahead"
    await scene.advance(0.1)
    second = (await scene.rows(job))[1]
    assert worker.dispatched()[-1]["instance_id"] == second.id and worker.dispatched()[-1]["start_at"]


@pytest.mark.rules
async def test_a_fire_never_goes_ahead_of_an_earlier_fire_of_its_job() -> None:
    """The first two fires find no free worker at their lead times and wait for their planned times;
    the third's lead time finds one free: it must not go ahead of them (a skip job would then skip
    the first for an overlap with a fire planned after it)."""
    scene = await Scene(lead_time=2.5).start()
    try:
        worker = scene.worker("w1", capacity=1, version=5)
        busy = await scene.job("busy", schedule_type=ScheduleType.API)
        await scene.scheduler.trigger(APP, await scene.store.get_job(busy), None)  # type: ignore[arg-type]
        await scene.advance(0.001)
        assert not worker.has_room()
        job = await scene.job("j", schedule_type=ScheduleType.CRON, schedule_expr="* * * * * *", overlap="skip")
        await scene.scan()
        await scene.advance(0.2)
        scene.result(worker, worker.dispatched()[0]["instance_id"])
        await scene.advance(0.4)  # the third fire's lead time: the worker has room again
        rows = await scene.rows(job)
        assert [d["instance_id"] for d in worker.dispatched()][1:] == []
        await scene.advance(0.5)  # the first fire's planned time
        assert [r.status for r in (await scene.rows(job))[:1]] == [Status.DISPATCHED]
        assert worker.dispatched()[1]["instance_id"] == rows[0].id
    finally:
        await scene.close()


@pytest.mark.rules
@pytest.mark.parametrize("other_worker", [True, False])
async def test_a_lead_fire_given_back_ahead_of_its_time_goes_ahead_elsewhere_or_waits_for_its_time(
        scene: Scene, other_worker: bool) -> None:
    w1 = scene.worker("w1", version=5)
    job, fire = await second_fire(scene, w1)
    await scene.advance(0.5)
    w2 = scene.worker("w2", version=5) if other_worker else None
    w1.draining = True  # a stopping worker gives its lead fires back
    scene.scheduler.on_ack(w1, {"instance_id": fire, "accepted": False, "reason": "worker stopping"})
    await scene.advance(0.001)
    if w2 is not None:
        again = [d for d in w2.dispatched() if d["instance_id"] == fire]
        assert again and again[0]["start_at"] == again[0]["scheduled_at"], "ahead again, on another worker"
        return
    w1.draining = False
    assert [d for d in w1.dispatched() if d["instance_id"] == fire][1:] == [], "not now: it is not due"
    await scene.advance(1.0)  # its planned time: sent as any due fire
    again = [d for d in w1.dispatched() if d["instance_id"] == fire][1:]
    assert again and "start_at" not in again[0]


@pytest.mark.rules
async def test_an_operator_kills_a_lead_fire_before_it_starts(scene: Scene) -> None:
    worker = scene.worker("w1", version=5)
    job, fire = await second_fire(scene, worker)
    await scene.advance(0.5)
    row = await scene.store.get_instance(fire)
    assert row is not None
    status = scene.scheduler.interventions.kill(row, await scene.store.get_job(job))
    assert status is Status.KILLED and sent(worker, "CANCEL")[-1] == {"instance_id": fire, "reason": KILL_REASON}
    scene.scheduler.on_ack(worker, {"instance_id": fire, "accepted": False, "reason": KILL_REASON})
    await scene.advance(2.0)
    assert await status_of(scene, job, fire) is Status.CANCELLED
    assert [d for d in worker.dispatched() if d["instance_id"] == fire][1:] == [], "it never runs"


@pytest.mark.rules
def test_a_new_owner_holds_back_fires_up_to_the_lead_time_past_the_old_owners_lease() -> None:
    origin = Origin(prev_owner="s0", prev_last_heartbeat=1000.0, left_clean=False)
    plain, _ = recovery_window(origin, 1030.0, heartbeat_timeout=10.0, run_lease=10.0, lease_margin=1.0)
    led, _ = recovery_window(origin, 1030.0, heartbeat_timeout=10.0, run_lease=10.0, lease_margin=1.0,
                             lead_time=2.0)
    assert led - plain == 2000


def test_the_clock_offset_is_taken_from_the_answer_with_the_shortest_round_trip() -> None:
    clock = ClockOffset()
    clock.sample(sent=100.0, server_now=105.30, received=100.4)  # slow: offset 5.1 +- 0.2
    clock.sample(sent=101.0, server_now=106.01, received=101.02)  # fast: offset 5.0 +- 0.01
    clock.sample(sent=102.0, server_now=107.6, received=102.8)
    assert clock.offset == pytest.approx(5.0) and clock.error == pytest.approx(0.01)
    assert clock.to_local(110.0) == pytest.approx(105.0)
    assert clock.surely_after(110.0) == pytest.approx(105.01), "late by the error bound rather than early"


# ---- end to end ----------------------------------------------------------------------------------
async def test_a_lead_fire_arrives_early_and_starts_on_time_not_before(servers, sqlite_url) -> None:
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, "--second-level-threshold", "0",
                                 "--scan-horizon", "3", "--lead-time", "1.0")
    worker = Worker(app="lead", servers=[server.address], reconnect_max=0.5)
    arrivals: dict[int, tuple[float, float | None]] = {}
    started: asyncio.Queue[tuple[int, float, float]] = asyncio.Queue()
    receive = worker._on_dispatch

    def watch(conn: Any, body: dict[str, Any]) -> None:
        arrivals.setdefault(body["instance_id"], (time.time(), body.get("start_at")))
        receive(conn, body)

    worker._on_dispatch = watch  # type: ignore[method-assign]

    @worker.handler("tick")
    async def tick(ctx: Any) -> None:
        started.put_nowait((ctx.instance_id, time.time(), ctx.scheduled_at))

    planned = time.time() + 3.0
    worker.schedule("once", handler="tick", at=planned)
    async with worker:
        await wait_until(lambda: worker._link.clock.error < 1.0, 10, "a clock offset measurement")
        instance_id, began, scheduled = await next_event(started, timeout=15)
        arrived, start_at = arrivals[instance_id]
        assert start_at == pytest.approx(planned, abs=0.002) and scheduled == pytest.approx(planned, abs=0.002)
        assert planned - arrived > 0.5, f"sent only {planned - arrived:.3f}s ahead"
        # one machine, one clock: the planned time (whole milliseconds) is one instant for server and worker
        assert began >= scheduled, f"started {scheduled - began:.6f}s before its planned time"
        assert began - scheduled < 0.5


# ---- the worker's side: InstanceRunner with a stand-in link ---------------------------------------
class FakeConn:
    """A connection to the server as the runner sees it: it records what is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.closed = False

    def send(self, kind: str, body: dict[str, Any]) -> None:
        self.sent.append((kind, body))

    def acks(self) -> list[dict[str, Any]]:
        return [body for kind, body in self.sent if kind == "ACK"]


class FakeLink:
    """The runner's RunLink: one current connection, a held run lease, a measured clock offset."""

    def __init__(self, offset: float = 0.0) -> None:
        self.worker_id = "w1"
        self.conn: FakeConn | None = FakeConn()
        self.version = 5
        self.frame_limit = 1 << 20
        self.stopping = False
        self.alive_at = 0.0
        self.run_lease = 10.0
        self.heartbeat_timeout = 3.0
        self.clock = ClockOffset()
        self.clock.offset = offset

    def lease_held(self) -> bool:
        return True

    def send(self, kind: str, body: dict[str, Any]) -> bool:
        if self.conn is None:
            return False
        self.conn.send(kind, body)
        return True

    def ping(self, conn: Any) -> None:
        pass


def lead_body(instance_id: int, start_at: float) -> dict[str, Any]:
    return {"instance_id": instance_id, "job_id": 1, "job": "j", "handler": "h", "params": None, "attempt": 1,
            "scheduled_at": start_at, "timeout": None, "start_at": start_at}


def runner_with(link: FakeLink, starts: asyncio.Queue[tuple[int, float]]) -> Any:
    from fastjob.worker_runs import InstanceRunner

    async def handler(ctx: Any) -> None:
        starts.put_nowait((ctx.instance_id, time.time()))

    runner = InstanceRunner(link, {"h": handler}, capacity=lambda: 1, abandoned=lambda: False)  # type: ignore[arg-type]
    return runner


@pytest.mark.parametrize("offset", [0.0, 0.3])
async def test_the_worker_holds_a_lead_fire_and_starts_it_at_its_time_on_the_servers_clock(offset: float) -> None:
    link, starts = FakeLink(offset), asyncio.Queue[tuple[int, float]]()
    runner = runner_with(link, starts)
    start_at = time.time() + offset + 0.2  # 0.2 s from now, on the server's clock
    runner.on_dispatch(link.conn, lead_body(7, start_at))
    runner.on_dispatch(link.conn, lead_body(8, start_at))  # capacity 1: a lead fire takes no slot until it starts
    assert runner.hello_state()["leading"] == [7, 8]
    await asyncio.sleep(0)
    assert [body for kind, body in link.conn.sent if kind == "HELD"] == [{"instance_ids": [7, 8]}], \
        "acknowledged on receipt, in one frame"
    instance_id, began = await next_event(starts, timeout=5)
    assert began >= start_at - offset, "never before its time"
    assert began - (start_at - offset) < 0.1
    await asyncio.sleep(0.05)  # the other one found the only slot taken at its start: given back
    other = 15 - instance_id
    assert link.conn.acks()[-1] == {"instance_id": other, "accepted": False, "reason": "at max_concurrency"}
    runner.close()


async def test_a_lead_fire_of_a_closed_connection_waits_for_the_servers_word() -> None:
    link, starts = FakeLink(), asyncio.Queue[tuple[int, float]]()
    runner = runner_with(link, starts)
    first = link.conn
    runner.on_dispatch(first, lead_body(7, time.time() + 0.1))
    runner.on_dispatch(first, lead_body(8, time.time() + 0.1))
    first.closed = True
    link.conn = None
    assert runner.hello_state()["leading"] == [7, 8]  # the next session's HELLO names both
    await asyncio.sleep(0.3)
    assert starts.empty(), "its time passed, but the server may have sent it elsewhere"
    second = FakeConn()  # the new session, its handshake not yet over (the link has no connection yet)
    runner.cancel(8, WITHDRAW_REASON)  # sent elsewhere meanwhile: dropped
    runner.on_dispatch(second, lead_body(7, time.time() + 5))  # confirmed: it keeps its first start time
    instance_id, _ = await next_event(starts, timeout=5)  # at once, handshake over or not
    link.conn = second
    assert instance_id == 7 and runner.leading == {}, "8 was dropped, 7 started"
    runner.close()


async def test_a_withdrawal_never_stops_a_run() -> None:
    link, starts = FakeLink(), asyncio.Queue[tuple[int, float]]()
    from fastjob.worker_runs import InstanceRunner

    release = asyncio.Event()

    async def slow(ctx: Any) -> None:
        starts.put_nowait((ctx.instance_id, time.time()))
        await release.wait()

    runner = InstanceRunner(link, {"h": slow}, capacity=lambda: 4, abandoned=lambda: False)  # type: ignore[arg-type]
    runner.on_dispatch(link.conn, lead_body(7, time.time()))
    await next_event(starts, timeout=5)
    runner.cancel(7, WITHDRAW_REASON)
    await asyncio.sleep(0.05)
    assert 7 in runner.running and not runner.running[7].done()
    release.set()
    await asyncio.wait_for(asyncio.shield(runner.running[7]), 5)
    assert [body["status"] for kind, body in link.conn.sent if kind == "RESULT"] == ["succeeded"]
    runner.close()
