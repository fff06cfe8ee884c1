"""The scheduler's rules, one by one, in one process: memory store, fake time, fake workers.

Each test states a rule of the fire contract and checks it at the exact instants it speaks of
(a run lease of 10 s is passed by 0.1 s, not waited out). The subprocess tests (test_failover,
test_server_worker) check the same rules end to end, with real processes and databases.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fakes import APP, Scene

from fastjob.models import InstanceRow, JobSpec, ScheduleType, Status
from fastjob.protocol import KILL_REASON
from fastjob.schedule import retry_delay
from fastjob.server.cluster import Origin
from fastjob.testing import wait_until

pytestmark = pytest.mark.rules

RATE = dict(schedule_type=ScheduleType.FIXED_RATE, schedule_expr="1.0")


@pytest.fixture
async def scene() -> AsyncIterator[Scene]:
    scene = await Scene().start()
    try:
        yield scene
    finally:
        await scene.close()


def statuses(rows: list[InstanceRow]) -> list[str]:
    return [row.status.value for row in rows]


async def test_a_fire_is_written_before_it_is_due_and_sent_at_its_planned_time(scene: Scene) -> None:
    worker = scene.worker("w1")
    job = await scene.job("j", schedule_type=ScheduleType.FIXED_RATE, schedule_expr="10.0")
    await scene.scan()
    await scene.advance(0.001)
    rows = await scene.rows(job)
    assert len(rows) == 1 and rows[0].status is Status.DISPATCHED  # planned now: due at once
    scene.result(worker, rows[0].id)
    await scene.advance(9.9)
    await scene.scan()
    waiting = [r for r in await scene.rows(job) if r.status is Status.WAITING]
    assert len(waiting) == 1, "the next fire is in the WAL before it is due"
    assert len(worker.dispatched()) == 1
    await scene.advance(0.1)
    assert [d["instance_id"] for d in worker.dispatched()] == [rows[0].id, waiting[0].id]


@pytest.mark.parametrize(("overlap", "expected"), [
    ("allow", ["dispatched", "dispatched", "dispatched"]),
    ("queue", ["dispatched", "queued", "queued"]),
    ("skip", ["dispatched", "skipped", "skipped"]),
    ("buffer_one", ["dispatched", "queued", "skipped"]),
])
async def test_overlap_policy_decides_a_fire_due_while_the_previous_one_runs(
        scene: Scene, overlap: str, expected: list[str]) -> None:
    worker = scene.worker("w1")
    job = await scene.job("j", overlap=overlap, **RATE)
    await scene.scan()
    await scene.advance(2.5)
    rows = (await scene.rows(job))[:3]
    assert statuses(rows) == expected
    if overlap == "queue":  # the first run ends: the next in line starts, in planned order
        scene.result(worker, rows[0].id)
        await scene.advance(0.001)
        assert statuses((await scene.rows(job))[:3]) == ["succeeded", "dispatched", "queued"]
        assert worker.dispatched()[-1]["instance_id"] == rows[1].id


async def test_a_failed_attempt_is_retried_after_its_backoff_until_the_retries_are_used(scene: Scene) -> None:
    worker = scene.worker("w1")
    job_id = await scene.job("j", schedule_type=ScheduleType.API, retry_times=2, retry_backoff=1.0)
    job = await scene.store.get_job(job_id)
    assert job is not None
    await scene.scheduler.trigger(APP, job, None)
    await scene.advance(0.001)
    for attempt in (1, 2):
        sent = worker.dispatched()[-1]
        assert sent["attempt"] == attempt
        scene.result(worker, sent["instance_id"], Status.FAILED, "boom")
        backoff = retry_delay(job, attempt)
        await scene.advance(backoff - 0.01)
        assert len(worker.dispatched()) == attempt, "not before the backoff"
        await scene.advance(0.02)
        assert len(worker.dispatched()) == attempt + 1
    scene.result(worker, worker.dispatched()[-1]["instance_id"], Status.FAILED, "boom")
    await scene.advance(60)
    rows = await scene.rows(job_id)
    assert [(r.attempt, r.trigger, r.status.value) for r in rows] == [
        (1, "api", "failed"), (2, "retry", "failed"), (3, "retry", "failed")]


async def test_a_fire_due_while_the_lease_is_stale_is_held_until_it_is_renewed(scene: Scene) -> None:
    worker = scene.worker("w1")
    job = await scene.job("j", **RATE)
    scene.cluster.lease_ok = scene.cluster.renew_ok = False
    await scene.scan()
    await scene.advance(0.001)
    assert worker.dispatched() == [] and len(scene.scheduler.held) == 1
    scene.cluster.renew_ok = True  # the database answers again
    await wait_until(lambda: worker.dispatched(), 5.0, "the held fire to be sent after the renewal")
    assert not scene.scheduler.held
    assert (await scene.rows(job))[0].status is Status.DISPATCHED


async def test_a_fire_of_an_app_lost_meanwhile_is_left_to_its_new_owner(scene: Scene) -> None:
    worker = scene.worker("w1")
    job = await scene.job("j", **RATE)
    await scene.scan()
    del scene.cluster.owned[APP]
    await scene.scheduler.app_lost(APP)
    await scene.advance(3)
    assert worker.dispatched() == [] and worker.redirected
    assert set(statuses(await scene.rows(job))) == {"waiting"}


async def test_a_worker_that_left_gets_its_run_lease_before_its_instance_runs_elsewhere(scene: Scene) -> None:
    first = scene.worker("w1", capacity=1)
    job = await scene.job("j", schedule_type=ScheduleType.API)
    row = await scene.scheduler.trigger(APP, (await scene.store.get_job(job)), None)  # type: ignore[arg-type]
    await scene.advance(0.001)
    assert first.dispatched()[0]["instance_id"] == row.id
    first.last_received = asyncio.get_running_loop().time()
    scene.sessions.remove(first)
    scene.scheduler.worker_left(first)
    second = scene.worker("w2")
    grace = scene.scheduler.run_lease + scene.scheduler.lease_margin
    await scene.advance(grace - 0.1)
    assert second.dispatched() == [], "not while the first worker may still run it"
    await scene.advance(0.2)
    rows = await scene.rows(job)
    assert [(r.attempt, r.trigger, r.status.value) for r in rows] == [(1, "api", "interrupted"),
                                                                     (2, "rerun", "dispatched")]
    assert second.dispatched()[0]["instance_id"] == rows[1].id


async def test_a_worker_back_within_its_lease_keeps_its_instance(scene: Scene) -> None:
    first = scene.worker("w1")
    job = await scene.job("j", schedule_type=ScheduleType.API)
    row = await scene.scheduler.trigger(APP, (await scene.store.get_job(job)), None)  # type: ignore[arg-type]
    await scene.advance(0.001)
    first.last_received = asyncio.get_running_loop().time()
    scene.scheduler.worker_left(first)
    await scene.advance(5)
    scene.scheduler.worker_joined(first, [row.id], [])
    await scene.advance(30)
    assert statuses(await scene.rows(job)) == ["dispatched"]
    scene.result(first, row.id)
    assert statuses(await scene.rows(job)) == ["succeeded"]


async def test_a_fire_no_worker_can_take_fails_after_the_dispatch_wait(scene: Scene) -> None:
    job = await scene.job("j", schedule_type=ScheduleType.API)
    await scene.scheduler.trigger(APP, (await scene.store.get_job(job)), None)  # type: ignore[arg-type]
    await scene.advance(scene.scheduler.dispatcher.dispatch_wait - 0.1)
    assert statuses(await scene.rows(job)) == ["waiting"]
    await scene.advance(0.2)
    rows = await scene.rows(job)
    assert statuses(rows) == ["failed"] and "no worker" in (rows[0].error or "")


async def test_a_worker_that_joins_takes_the_fires_waiting_for_one(scene: Scene) -> None:
    job = await scene.job("j", schedule_type=ScheduleType.API)
    row = await scene.scheduler.trigger(APP, (await scene.store.get_job(job)), None)  # type: ignore[arg-type]
    await scene.advance(1)
    worker = scene.worker("w1")
    assert worker.dispatched()[0]["instance_id"] == row.id


async def test_a_run_past_its_timeout_with_no_answer_is_timed_out_and_cancelled(scene: Scene) -> None:
    worker = scene.worker("w1")
    job = await scene.job("j", schedule_type=ScheduleType.API, timeout=5.0)
    row = await scene.scheduler.trigger(APP, (await scene.store.get_job(job)), None)  # type: ignore[arg-type]
    await scene.advance(5.0 + scene.scheduler.heartbeat_timeout - 0.1)
    assert statuses(await scene.rows(job)) == ["dispatched"]
    await scene.advance(0.2)
    assert statuses(await scene.rows(job)) == ["timed_out"]
    assert ("CANCEL", {"instance_id": row.id, "reason": "timeout"}) in worker.sent


@pytest.mark.parametrize(("policy", "runs"), [("fire_once", 1), ("skip", 0), ("fire_all", 5)])
async def test_fires_missed_while_no_server_ran_the_app_follow_the_misfire_policy(
        scene: Scene, policy: str, runs: int) -> None:
    scene.worker("w1", capacity=100)
    job = await scene.job("j", misfire_policy=policy, catch_up_window=10.0, overlap="allow", **RATE)
    now_ms = int(scene.clock.wall() * 1000)
    await scene.store.set_next_trigger("s1", APP, scene.epoch, job, now_ms - 60_000)
    await scene.scan()
    await scene.advance(0.001)
    rows = await scene.rows(job)
    missed = [r for r in rows if r.planned_ms < now_ms - 5_000]  # older than the misfire threshold
    assert len(missed) == 55
    ran = [r for r in missed if r.status is not Status.SKIPPED]
    assert len(ran) == runs and {(r.trigger, r.status) for r in ran} <= {("catch_up", Status.DISPATCHED)}
    if policy == "fire_once":  # the last missed fire runs for all of them
        assert ran[0].planned_ms == now_ms - 6_000
    recent = [r for r in rows if r.planned_ms >= now_ms - 5_000]
    assert recent and all(r.trigger == "schedule" for r in recent), "fires within the threshold run as planned"


async def test_a_failover_holds_what_the_previous_owner_may_have_sent_until_its_workers_are_back(
        scene: Scene) -> None:
    job = await scene.job("j", schedule_type=ScheduleType.API)
    await scene.store.register_worker(APP, "w1", "s0", scene.clock.wall(), None)
    # the previous owner s0 wrote this fire, and may have sent it just before it died
    prev = await scene.store.insert_instance("s1", APP, scene.epoch, job, int(scene.clock.wall() * 1000) - 500,
                                             1, "api", None, scene.clock.wall())
    assert prev is not None
    await scene.scheduler.app_lost(APP)
    epoch = await scene.store.claim_app(APP, "s1", scene.epoch)
    assert epoch is not None
    scene.epoch = scene.cluster.owned[APP] = epoch
    other = scene.worker("w2")
    await scene.scheduler.app_gained(APP, epoch, Origin("s0", False, scene.clock.wall()))
    await scene.advance(1)
    assert other.dispatched() == [], "held: the worker it may have been sent to has not re-attached"
    returning = scene.worker("w1")  # it names nothing: it never got the fire
    await scene.advance(0.001)
    sent = [d["instance_id"] for d in returning.dispatched() + other.dispatched()]
    assert sent == [prev.id]


async def test_a_rate_job_the_server_runs_now_gets_a_fire_and_one_a_worker_runs_now_loses_it(scene: Scene) -> None:
    """Who runs a rate job follows --second-level-threshold: one stored without a next fire (a worker
    ran it, before an upgrade lowered the threshold) starts at once when the app is gained."""
    worker = scene.worker("w1")
    spec = JobSpec(app=APP, name="was_worker_run", handler="h", **RATE)
    job = await scene.store.upsert_job(spec, None, scene.clock.wall())  # as a worker-run job is stored
    await _regain(scene, clean=False)
    await scene.scan()
    await scene.advance(0.001)
    rows = await scene.rows(job.id)
    assert rows[0].status is Status.DISPATCHED and rows[0].planned_ms == job.created_time * 1000  # at once
    assert [d["instance_id"] for d in worker.dispatched()] == [rows[0].id]
    # and the other way: a job a worker runs now is no longer fired by the server
    scene.scheduler.follow_ups.is_second_level = lambda job: True
    await _regain(scene, clean=True)
    stored = await scene.store.get_job(job.id)
    assert stored is not None and stored.next_trigger_ms is None


async def _regain(scene: Scene, clean: bool) -> None:
    """The app lost and gained again (from s0), as after a failover or a hand-over."""
    await scene.scheduler.app_lost(APP)
    epoch = await scene.store.claim_app(APP, "s1", scene.epoch)
    assert epoch is not None
    scene.epoch = scene.cluster.owned[APP] = epoch
    await scene.scheduler.app_gained(APP, epoch, Origin("s0", clean, scene.clock.wall()))


async def test_a_killed_run_ends_killed_whatever_its_worker_reports(scene: Scene) -> None:
    """An older worker answers an operator's CANCEL with interrupted: the run must not run again."""
    worker = scene.worker("w1")
    worker.handler_kinds = {"j": "async"}  # type: ignore[attr-defined]
    worker.version = 4  # type: ignore[attr-defined]
    job_id = await scene.job("j", schedule_type=ScheduleType.API)
    job = await scene.store.get_job(job_id)
    assert job is not None
    row = await scene.scheduler.trigger(APP, job, None)
    await scene.advance(0.001)
    assert scene.scheduler.interventions.kill(row, job) is Status.KILLED
    assert ("CANCEL", {"instance_id": row.id, "reason": KILL_REASON}) in worker.sent
    scene.result(worker, row.id, Status.INTERRUPTED)
    await scene.advance(1.0)
    assert [r.status for r in await scene.rows(job_id)] == [Status.KILLED]
